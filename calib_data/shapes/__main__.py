"""Write a split of the shapes benchmark: `python -m calib_data.shapes --seed S --n N --out F.jsonl`.

Images go to `images/<stem>/` next to the JSONL; each line is
`{"id", "image", "question", "answer", "task", "options"?}` with `image` relative to the JSONL.
Same seed and n -> the same bytes. `--split test|calib` writes a shipped split with its seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from calib_data.shapes import SPLITS, TASKS, make_sample, render


def write_split(out: Path, seed: int, n: int, progress: bool = True) -> Path:
    """Write `n` samples (tasks round-robin) to `out` (a .jsonl path) atomically."""
    out = Path(out)
    if out.suffix != ".jsonl":
        raise ValueError(f"--out must name a .jsonl file, got {out}")
    img_rel = Path("images") / out.stem
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.stem}-", dir=out.parent))
    try:
        (tmp / img_rel).mkdir(parents=True)
        lines = []
        for i in tqdm(range(n), desc=f"{out.name}", disable=not progress, unit="q"):
            scene, q = make_sample(seed + i, TASKS[i % len(TASKS)])
            name = f"{i:05d}.png"
            Image.fromarray(render(scene)).save(tmp / img_rel / name, optimize=False)
            rec = {
                "id": f"{out.stem}-{i:05d}",
                "image": (img_rel / name).as_posix(),
                "question": q["question"],
                "answer": q["answer"],
                "task": q["task"],
            }
            if "options" in q:
                rec["options"] = q["options"]
            lines.append(json.dumps(rec, sort_keys=True))
        (tmp / out.name).write_text("\n".join(lines) + "\n")
        final_imgs = out.parent / img_rel
        if final_imgs.exists():
            shutil.rmtree(final_imgs)
        final_imgs.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / img_rel, final_imgs)
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calib_data.shapes", description=__doc__.split("\n")[0])
    ap.add_argument("--split", choices=sorted(SPLITS), help="a shipped split (sets --seed and --n)")
    ap.add_argument("--seed", type=int, help="seed of the first sample")
    ap.add_argument("--n", type=int, help="number of samples")
    ap.add_argument("--out", type=Path, required=True, help="output .jsonl path")
    a = ap.parse_args(argv)
    if a.split:
        seed, n = SPLITS[a.split]
        seed, n = (a.seed if a.seed is not None else seed), (a.n or n)
    elif a.seed is None or a.n is None:
        ap.error("give --split, or both --seed and --n")
    else:
        seed, n = a.seed, a.n
    if n <= 0:
        ap.error("--n must be positive")
    try:
        path = write_split(a.out, seed, n, progress=sys.stderr.isatty())
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} samples to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
