"""`python -m quota_export report --artifacts DIR [--image IMG] [--prompt TEXT] [--out DIR]`:
PNGs (allocation schedule, kept tokens on an image, parity histogram) and a short report.md."""

from __future__ import annotations

from pathlib import Path

from quota_export.__main__ import args, command


def _report_args(p):
    p.add_argument("--artifacts", required=True, type=Path, help="a folder written by `build`")
    p.add_argument("--image", type=Path, help="image for the kept-token figure (default, for 96x96 models: "
                   "the first image of calib_data/shapes/test.jsonl)")
    p.add_argument("--prompt", help="question asked with the image (default: the benchmark sample's question)")
    p.add_argument("--out", type=Path, help="output folder (default: <artifacts>/report)")


@command("report", "figures of a build: allocation schedule, kept tokens on an image, parity histogram")
@args(_report_args)
def cmd_report(a) -> int:
    from quota_export.report import write_report

    rep = write_report(a.artifacts, a.image, a.out, a.prompt)
    print(f"wrote {rep.md} and {', '.join(p.name for p in rep.pngs)}")
    return 0
