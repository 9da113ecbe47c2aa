"""ONNX Runtime runner over built artifacts, and the greedy generate loop.

    image -> processor -> pixel_values -> vision.onnx -> features [1,N,D]
    prompt ids -> embed.onnx -> embeds; embeds[s:s+N] = features
    prefill.onnx(embeds, position_ids) -> logits, present.*, kept.*
    loop: argmax -> embed.onnx -> decode.onnx(embeds, pos, past.* = present.*) -> logits
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quota_export import UserError

GRAPHS = ("vision.onnx", "embed.onnx", "prefill.onnx", "decode.onnx")


@dataclass
class RunResult:
    tokens: list[int]
    text: str
    prefill_logits: np.ndarray  # [1, V]
    kept: list[np.ndarray]  # per stage [1, k]
    cache_bytes: int  # bytes of the KV cache after prefill (all layers, keys + values + scales)


class OrtRunner:
    def __init__(self, artifacts: str | Path, threads: int = 0):
        import onnxruntime as ort

        self.dir = Path(artifacts)
        man = self.dir / "manifest.json"
        if not self.dir.is_dir():
            raise UserError(f"{self.dir}: artifacts folder not found")
        if not man.is_file():
            raise UserError(f"{man}: missing (not a quota_export build output)")
        try:
            self.manifest = json.loads(man.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{man}: corrupt manifest") from None
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.sessions = {}
        for g in GRAPHS:
            p = self.dir / g
            if not p.is_file():
                raise UserError(f"{p}: graph missing")
            try:
                self.sessions[g] = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own exception types
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise UserError(f"{p}: corrupt or unreadable graph ({first})") from None
        from transformers import AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(str(self.dir / "processor"))
        except (OSError, ValueError) as e:
            raise UserError(f"{self.dir / 'processor'}: cannot load processor ({str(e).splitlines()[0]})") from None
        m = self.manifest["model"]
        self.visual_start, self.n_visual = m["visual_start"], m["n_visual"]
        self.image_size = tuple(m["image_size"])
        self.eos = m["eos_token_id"]
        self.image_token_id = m["image_token_id"]

    def _run(self, g: str, feeds: dict) -> dict:
        s = self.sessions[g]
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))

    def encode(self, image: np.ndarray, question: str):
        """-> (input_ids [1,T], pixel_values [1,3,H,W]) via the shipped processor, checked."""
        h, w = self.image_size
        if image.ndim != 3 or image.shape[2] != 3:
            raise UserError(f"image must be HxWx3 RGB, got shape {tuple(image.shape)}")
        if image.shape[:2] != (h, w):
            raise UserError(f"image is {image.shape[1]}x{image.shape[0]}, these graphs take {w}x{h}")
        from PIL import Image

        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = self.processor.apply_chat_template(msgs, add_generation_prompt=True)
        enc = self.processor(images=Image.fromarray(image), text=text, return_tensors="np")
        ids = enc["input_ids"].astype(np.int64)
        pos = np.flatnonzero(ids[0] == self.image_token_id)
        if len(pos) != self.n_visual or pos[0] != self.visual_start or pos[-1] - pos[0] != self.n_visual - 1:
            raise UserError(
                f"prompt puts {len(pos)} image tokens at {pos[0] if len(pos) else '-'}; the graphs were built for "
                f"{self.n_visual} at {self.visual_start}"
            )
        return ids, enc["pixel_values"].astype(np.float32)

    def embeds(self, ids: np.ndarray, pixel_values: np.ndarray) -> np.ndarray:
        feats = self._run("vision.onnx", {"pixel_values": pixel_values})["image_features"]
        emb = self._run("embed.onnx", {"input_ids": ids})["inputs_embeds"]
        emb[:, self.visual_start : self.visual_start + self.n_visual] = feats[0]
        return emb

    def generate(self, image: np.ndarray, question: str, max_new_tokens: int | None = None) -> RunResult:
        max_new = max_new_tokens or self.manifest["export"]["max_new_tokens"]
        ids, pix = self.encode(image, question)
        emb = self.embeds(ids, pix)
        T = emb.shape[1]
        out = self._run("prefill.onnx", {"inputs_embeds": emb, "position_ids": np.arange(T, dtype=np.int64)[None]})
        kept = [out[f"kept.{i}"] for i in range(len(self.manifest["schedule"]))]
        past = {k.replace("present.", "past.", 1): v for k, v in out.items() if k.startswith("present.")}
        cache_bytes = sum(v.nbytes for v in past.values())
        logits0 = out["logits"]
        logits, toks, p = logits0, [], T
        for _ in range(max_new):
            t = int(logits.argmax(-1)[0])
            toks.append(t)
            if t == self.eos:
                break
            e = self._run("embed.onnx", {"input_ids": np.array([[t]], np.int64)})["inputs_embeds"]
            o = self._run("decode.onnx", {"inputs_embeds": e, "position_ids": np.array([[p]], np.int64), **past})
            past = {k.replace("present.", "past.", 1): v for k, v in o.items() if k.startswith("present.")}
            logits, p = o["logits"], p + 1
        text = self.processor.tokenizer.decode(toks, skip_special_tokens=True).strip()
        return RunResult(toks, text, logits0, kept, cache_bytes)
