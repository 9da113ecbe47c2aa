"""Real-size VLMs on this machine: build, verify, run of random-weight checkpoints -> benchmarks/scale.md.

    flock /tmp/quota-heavy.lock python benchmarks/scale.py --checkpoint a   # write /work/ckpt/tinyllava-bf16
    flock /tmp/quota-heavy.lock python benchmarks/scale.py --only a         # measure row (a) -> scale-a.json
    python benchmarks/scale.py --table                                      # scale-*.json -> scale.md

Rows (issue #21), random weights of the real geometries, written by this script in bf16 (as the
real checkpoints ship) with a fixed seed, the shapes tokenizer and chat template, and the image
processor at the real size (calib_data/shapes/checkpoints.py; nothing is downloaded):

    a  TinyLLaVA geometry: LLaVA layout, CLIP ViT-L/14-336 (hidden 1024, 24 layers, 16 heads,
       intermediate 4096; 336 px -> 576 visual tokens) + Llama 1.1B (hidden 2048, 22 layers,
       32 heads, 4 KV heads, intermediate 5632, vocab 32000)
    b  Qwen2-VL-2B at 448x448 (vision depth 32, embed 1280, 16 heads; text hidden 1536, 28 layers,
       12 heads, 2 KV heads, intermediate 8960, vocab 151936, mrope_section [16, 24, 24]; lm_head
       untied) -> 256 visual tokens
    c  LLaVA-1.5-7B: CLIP-L/14-336 + Llama hidden 4096, 32 layers, 32 heads, intermediate 11008,
       vocab 32064

Checkpoints go to $QUOTA_CKPT (default /work/ckpt)/<name>, written to a temporary folder and
renamed when complete. Each measured step (`build`, `verify`, `run`) runs as a child process
under a memory limit (`--mem-limit`, default 22 GiB: a psutil watchdog kills the child's process
tree above it, so a step that does not fit fails cleanly); peak RSS is psutil's sampling of the
child's tree (every 0.2 s). Heavy: run each row alone, under the lock.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CKPT = Path(os.environ.get("QUOTA_CKPT", "/work/ckpt"))
SEED = 0
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, layer_norm_eps=1e-5)
ROWS = {
    "a": dict(name="tinyllava-bf16", label="TinyLLaVA geometry (CLIP-L/14-336 + Llama 1.1B)", family="llava",
              vision=CLIP_L_336,
              text=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)),
    "b": dict(name="qwen2vl2b-448-bf16", label="Qwen2-VL-2B geometry at 448x448", family="qwen2_vl", image=448,
              vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14),
              text=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                        rms_norm_eps=1e-6,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [16, 24, 24]})),
    "c": dict(name="llava15-7b-bf16", label="LLaVA-1.5-7B geometry", family="llava", vision=CLIP_L_336,
              text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)),
}


def write_checkpoint(row: str) -> Path:
    """The row's checkpoint folder, written (bf16, seed SEED) unless it is already there."""
    import torch

    from calib_data.shapes.checkpoints import llava_config, qwen2_vl_config, qwen_tokenizer, write_llava, write_qwen2_vl
    from calib_data.shapes.model import build_tokenizer

    spec = ROWS[row]
    out = CKPT / spec["name"]
    if (out / "config.json").is_file():
        return out
    CKPT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec['name']}.", dir=CKPT))
    if spec["family"] == "llava":
        tok = build_tokenizer()
        tok.model_max_length = 4096  # prompts of 576 visual tokens + text
        write_llava(tmp, llava_config(tok, spec["vision"], spec["text"]), SEED, tok, dtype=torch.bfloat16, resize=True)
    else:
        tok, vocab = qwen_tokenizer()
        tok.model_max_length = 4096
        cfg = qwen2_vl_config(vocab, spec["text"], spec["vision"])
        write_qwen2_vl(tmp, cfg, SEED, tok, spec["image"], dtype=torch.bfloat16, resize=True)
    for f in tmp.iterdir():
        f.chmod(0o644)
    tmp.chmod(0o755)
    tmp.rename(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", choices=sorted(ROWS), action="append", default=[],
                    help="write the row's checkpoint (if missing) and stop")
    args = ap.parse_args(argv)
    for row in args.checkpoint:
        print(write_checkpoint(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
