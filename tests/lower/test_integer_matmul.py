"""`export.matmul: integer` on whole builds: the onnx target's MatMulInteger linears compute the
float form's bits (ops/linear.py; the primitive itself is checked in tests/ops/test_linear.py)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import yaml
from conftest import TEST_SPLIT

from quota_export import UserError
from quota_export.build import build
from quota_export.recipe import load_recipe
from quota_export.reference import DeployConfig


def _recipe(path, model, matmul: str, accumulation: str = "exact"):
    doc = {"name": f"int-{matmul}", "model": str(model),
           "quant": {"scheme": "w4a4kv4", "weights": {"bits": 4, "group_size": 32, "accumulation": accumulation}},
           "pruning": {"budget": 0.55, "n_visual": 144, "merge": "proportional",
                       "stages": [{"layer": 1, "keep": 72},
                                  {"layer": 3, "keep": 20, "weights": {"magnitude": 1.0, "attention": 1.0,
                                                                       "risk": 1.0, "diversity": 1.0}}]},
           "export": {"max_new_tokens": 4, "matmul": matmul}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.slow
def test_integer_build_matches_float_build_bit_for_bit(tiny_llava, tmp_path):
    """A merged, pruned W4A4KV4 build with export.matmul: integer passes its parity check, holds
    MatMulInteger instead of the 4-bit MatMul, and its prefill and decode outputs (logits, cache,
    kept indices, merge counts) equal the float build's bit for bit."""
    from quota_export.data import load_bench, load_image
    from quota_export.runtime.ort import OrtRunner

    res = {m: build(load_recipe(_recipe(tmp_path / f"{m}.yaml", tiny_llava, m)), tmp_path / m, str(TEST_SPLIT), 6,
                    threads=1) for m in ("float", "integer")}
    p = res["integer"].manifest["parity"]
    assert p["kept_index_agreement_per_stage"] == [1.0, 1.0] and p["answer_agreement"] == 1.0
    ops = collections.Counter(n.op_type for n in onnx.load(res["integer"].out / "prefill.onnx").graph.node)
    assert ops["MatMulInteger"] == 4 * 7 and ops["DequantizeLinear"] == 0
    runners = {m: OrtRunner(r.out, threads=1) for m, r in res.items()}
    for s in load_bench(TEST_SPLIT, limit=3):
        ids, pix = runners["float"].encode(load_image(s.image), s.question)
        emb = runners["float"].embeds(ids, pix)
        feeds = {"inputs_embeds": emb, "position_ids": runners["float"].positions(emb.shape[1])}
        outs = {m: r._run("prefill.onnx", feeds) for m, r in runners.items()}
        assert outs["float"].keys() == outs["integer"].keys()
        for k in outs["float"]:
            assert np.array_equal(outs["float"][k], outs["integer"][k]), k
        step = {"inputs_embeds": emb[:, -1:], "position_ids": runners["float"].positions(emb.shape[1] + 1)[..., -1:],
                **{k.replace("present.", "past.", 1): v for k, v in outs["float"].items() if k.startswith("present.")},
                **{k: v for k, v in outs["float"].items() if k.startswith("merge.")}}
        dec = {m: r._run("decode.onnx", step) for m, r in runners.items()}
        for k in dec["float"]:
            assert np.array_equal(dec["float"][k], dec["integer"][k]), k


def test_integer_needs_exact_accumulation(tiny_llava, tmp_path):
    r = load_recipe(_recipe(tmp_path / "r.yaml", tiny_llava, "integer", accumulation="float"))
    with pytest.raises(UserError, match=r"^export\.matmul: 'integer' needs quant\.weights\.accumulation: exact"):
        DeployConfig.from_recipe(r)


def test_tensorrt_target_ignores_integer(tiny_llava, tmp_path):
    """The tensorrt target's decoder graphs stay the float form whatever export.matmul says."""
    from quota_export.build import load_model
    from quota_export.lower.decoder import DecoderLowering
    from quota_export.reference import Deployed

    graphs = {}
    for m in ("float", "integer"):
        recipe = load_recipe(_recipe(tmp_path / f"{m}.yaml", tiny_llava, m))
        dep = Deployed(load_model(recipe), DeployConfig.from_recipe(recipe)).with_reductions(False)
        low = DecoderLowering(dep, 144, 5, target="tensorrt")
        graphs[m] = [low.prefill(21).SerializeToString(), low.decode(21).SerializeToString()]
    assert graphs["float"] == graphs["integer"]
