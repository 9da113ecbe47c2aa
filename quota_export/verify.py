"""Parity of built artifacts against the PyTorch reference.

Per sample: kept-index agreement per stage (exact), greedy-answer agreement (exact token ids),
and last-position logits SQNR = 20*log10(||ref|| / ||ref - ort||) in dB (inf when equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

THRESHOLDS = {"kept_index_agreement": 1.0, "answer_agreement": 1.0, "logits_sqnr_db_min": 40.0}


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    err = np.linalg.norm(ref - np.asarray(test, np.float64))
    if err == 0:
        return math.inf
    return float(20 * math.log10(max(np.linalg.norm(ref), 1e-30) / err))


@dataclass
class ParityReport:
    samples: int = 0
    kept_agree: list[int] = field(default_factory=list)  # per stage: samples with identical indices
    answers_agree: int = 0
    sqnr: list[float] = field(default_factory=list)

    def add(self, ref_kept, kept, ref_tokens, tokens, ref_logits, logits):
        if not self.kept_agree:
            self.kept_agree = [0] * len(ref_kept)
        self.samples += 1
        for i, (a, b) in enumerate(zip(ref_kept, kept)):
            self.kept_agree[i] += int(np.array_equal(np.asarray(a), np.asarray(b)))
        self.answers_agree += int(list(ref_tokens) == list(tokens))
        self.sqnr.append(sqnr_db(ref_logits, logits))

    def as_dict(self) -> dict:
        n = max(self.samples, 1)
        per_stage = [a / n for a in self.kept_agree]
        finite = [s for s in self.sqnr if math.isfinite(s)]
        return {
            "samples": self.samples,
            "kept_index_agreement": min(per_stage) if per_stage else 1.0,
            "kept_index_agreement_per_stage": per_stage,
            "answer_agreement": self.answers_agree / n,
            "logits_sqnr_db_min": round(min(self.sqnr), 2) if finite or self.sqnr else None,
            "logits_sqnr_db_median": round(float(np.median(finite)), 2) if finite else None,
            "logits_sqnr_db": [round(s, 2) if math.isfinite(s) else "inf" for s in self.sqnr],
        }

    def failures(self) -> list[str]:
        d = self.as_dict()
        out = []
        if d["kept_index_agreement"] < 1.0:
            out.append(f"kept-index agreement {d['kept_index_agreement']:.3f} < 1")
        if d["answer_agreement"] < 1.0:
            out.append(f"answer agreement {d['answer_agreement']:.3f} < 1")
        if d["logits_sqnr_db_min"] is not None and d["logits_sqnr_db_min"] < THRESHOLDS["logits_sqnr_db_min"]:
            out.append(f"logits SQNR {d['logits_sqnr_db_min']} dB < 40 dB")
        return out


def compare(runner, deployed, items, max_new_tokens: int, progress: bool = True) -> ParityReport:
    """items: iterable of (image uint8 HxWx3, question). Runs runner and reference side by side."""
    import torch

    rep = ParityReport()
    items = list(items)
    for image, question in tqdm(items, desc="parity", disable=not progress, unit="sample"):
        res = runner.generate(image, question, max_new_tokens)
        prompt = deployed.adapter.prompt(image, question)
        with torch.no_grad():
            toks, out = deployed.generate(prompt, max_new_tokens)
        rep.add([k.numpy() for k in out.kept], res.kept, toks, res.tokens, out.logits.numpy(), res.prefill_logits)
    return rep


def summary_line(d: dict) -> str:
    return (
        f"parity over {d['samples']} samples: kept-index agreement {d['kept_index_agreement'] * 100:.1f}%, "
        f"answer agreement {d['answer_agreement'] * 100:.1f}%, logits SQNR min {d['logits_sqnr_db_min']} dB"
    )
