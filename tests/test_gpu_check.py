"""scripts/gpu_check.sh --dry-run: every CPU-possible step of the one-shot GPU check, on a tiny model
(the full run on the embedded default waits for a machine with an NVIDIA GPU, docs/gpu.md)."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import ROOT, make_tiny_llava
from test_build import S_WEIGHTED, TEST_SPLIT, write_recipe

from quota_export.build import build
from quota_export.lower.tensorrt_target import engine_unavailable_reason
from quota_export.recipe import load_recipe
from quota_export.runtime.runners import backend_unavailable_reason

pytestmark = pytest.mark.slow  # the gpu_check.sh dry run builds two targets (~35 s)


def test_gpu_check_dry_run(tmp_path):
    model = make_tiny_llava(tmp_path / "m", hidden=128, seed=3)  # INT4 blocks of 64: both targets
    r = write_recipe(tmp_path / "r.yaml", "tiny", model, {"scheme": "w4a4kv4", "weights": {"bits": 4, "group_size": 64}},
                     [{"layer": 1, "keep": 72}, {"layer": 3, "keep": 20, **S_WEIGHTED}], 0.55)
    out = tmp_path / "graphs"
    build(load_recipe(r), out / "tiny", str(TEST_SPLIT), 2, threads=1)  # already there: reused
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--recipe", str(r), "--samples", "2",
                        "--bench", str(TEST_SPLIT), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "gpu_check" / "summary.json").read_text())
    assert summary["dry_run"] and summary["ok"]
    rows = {(x["step"].strip(), x["backend"]): x for x in summary["rows"]}
    assert rows[("install", "-")]["status"] == "skipped" and "dry run" in rows[("install", "-")]["detail"]
    assert rows[("build onnx", "-")]["status"] == "reused"
    assert rows[("build tensorrt", "-")]["status"] == "ran"
    assert (out / "tiny-tensorrt" / "prefill.onnx").is_file()
    trt = engine_unavailable_reason()
    if trt:  # no engines here: said once, with the build's reason
        assert rows[("engines", "tensorrt")]["status"] == "skipped" and trt in rows[("engines", "tensorrt")]["detail"]
    assert rows[("pytest -m gpu", "-")]["status"] == "ran"
    for build_ in ("onnx build", "tensorrt build"):
        cpu = rows[(f"parity {build_}", "ort-cpu")]
        assert cpu["status"] == "ran" and "over 2 samples" in cpu["detail"], cpu
        assert "kept-index agreement 100.0%" in cpu["detail"] and "answer agreement 100.0%" in cpu["detail"]
        assert cpu["prefill_ms"] > 0 and cpu["decode_ms"] > 0
    for key in [("parity onnx build", "ort-cuda"), ("parity tensorrt build", "ort-cuda"),
                ("parity tensorrt build", "tensorrt")]:
        reason = backend_unavailable_reason(key[1])
        if reason:
            assert rows[key]["status"] == "skipped" and rows[key]["detail"] == reason, rows[key]
    # one table on stdout, the same in summary.md
    table = p.stdout.split("\n\n", 1)[1].strip()
    assert table.startswith("| step | backend | status | detail | prefill ms | decode ms/token |")
    assert len(table.splitlines()) == 2 + len(summary["rows"])
    assert table in (out / "gpu_check" / "summary.md").read_text()
