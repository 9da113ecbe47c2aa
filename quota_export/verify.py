"""Parity of built artifacts against the PyTorch reference.

Per sample: kept-index agreement per stage (exact), greedy-answer agreement (exact token ids),
and last-position logits SQNR = 20*log10(||ref|| / ||ref - ort||) in dB (inf when equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

# Exact parity, for graphs with fp64 reductions (the `onnx` target's default): every sample's kept
# indices and answer equal the reference's, and every sample's logits are within 40 dB.
SAMPLE_SQNR_DB = 40.0  # a sample below this is listed as a miss (both kinds of parity)
THRESHOLDS = {
    "kept_index_agreement": 1.0,
    "answer_agreement": 1.0,
    "logits_sqnr_db_min": SAMPLE_SQNR_DB,
    "logits_sqnr_db_median": None,
    "vision_sqnr_db_min": 60.0,  # the vision tower is exported unquantized: float noise only
}
# Statistical parity, for graphs with fp32 reductions (the `tensorrt` target), checked like fp64
# graphs against the exact reference (fp64 reductions). fp32 sums in another order than the exact
# ones differ in the last bit now and then, and a 4-bit activation quantizer turns that into a
# whole step on one activation, which spreads through the later layers of that sample. Measured
# on the shipped model and its default recipe over 240 test samples: 209 samples >= 40 dB (most
# agree to float rounding of the logits, ~125 dB), the other 31 reach 20.7-39.6 dB, 3 of them keep
# another token at the deepest stage; answers agree in all 240. (Against a reference with fp32
# reductions of its own, torch's roundings add to the graphs': the median sample fell to ~30 dB.)
# A lowering bug breaks most samples, so the fp32 check asks that most samples hold (median SQNR)
# and that kept indices and answers agree in most samples; the per-sample misses are still listed.
THRESHOLDS_FP32 = {
    "kept_index_agreement": 0.75,
    "answer_agreement": 0.85,
    "logits_sqnr_db_min": None,  # not a hard floor here ...
    "logits_sqnr_db_median": SAMPLE_SQNR_DB,  # ... the median sample must be within it instead
    "vision_sqnr_db_min": 60.0,
}


def thresholds_for(reductions: str) -> dict:
    """The parity thresholds of graphs built with `reductions` ("fp64" exact, "fp32" statistical)."""
    return THRESHOLDS_FP32 if reductions == "fp32" else THRESHOLDS


def parity_kind(reductions: str) -> str:
    """One phrase for people: which parity `thresholds_for(reductions)` asks for."""
    if reductions != "fp32":
        return "exact"
    t = THRESHOLDS_FP32
    return (f"statistical, fp32 reductions: median logits SQNR >= {t['logits_sqnr_db_median']:g} dB, kept indices "
            f">= {t['kept_index_agreement']:.0%} and answers >= {t['answer_agreement']:.0%} of the samples")


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
    vision_sqnr: list[float] = field(default_factory=list)  # vision.onnx features vs the torch tower
    # per sample: (id, stages whose kept indices disagree, answer agrees); its SQNR is in `sqnr`
    records: list[tuple[str, list[int], bool]] = field(default_factory=list)

    def add(self, ref_kept, kept, ref_tokens, tokens, ref_logits, logits, sample_id: str | None = None):
        if not self.kept_agree:
            self.kept_agree = [0] * len(ref_kept)
        self.samples += 1
        stages = []
        for i, (a, b) in enumerate(zip(ref_kept, kept)):
            same = np.array_equal(np.asarray(a), np.asarray(b))
            self.kept_agree[i] += int(same)
            if not same:
                stages.append(i)
        answer = list(ref_tokens) == list(tokens)
        self.answers_agree += int(answer)
        self.sqnr.append(sqnr_db(ref_logits, logits))
        self.records.append((sample_id if sample_id is not None else f"#{self.samples - 1}", stages, answer))

    def misses(self, thresholds: dict | None = None) -> list[dict]:
        """The samples that miss a threshold: {"id", "stages", "answer", "sqnr_db", "why" (phrases)}."""
        t = {**THRESHOLDS, **(thresholds or {})}
        floor = t["logits_sqnr_db_min"] if t["logits_sqnr_db_min"] is not None else SAMPLE_SQNR_DB
        out = []
        for (sid, stages, answer), sq in zip(self.records, self.sqnr):
            why = [f"stage {', '.join(map(str, stages))} kept indices"] if stages else []
            why += [] if answer else ["answer"]
            why += [f"SQNR {sq:.2f} dB"] if sq < floor else []
            if why:
                out.append({"id": sid, "stages": stages, "answer": answer, "sqnr_db": _db(sq), "why": why})
        return out

    def as_dict(self) -> dict:
        """JSON-safe summary (an infinite SQNR - bit-identical logits - is written as "inf")."""
        n = max(self.samples, 1)
        per_stage = [a / n for a in self.kept_agree]
        lo = self.sqnr_min()
        return {
            "samples": self.samples,
            "kept_index_agreement": min(per_stage) if per_stage else 1.0,
            "kept_index_agreement_per_stage": per_stage,
            "answer_agreement": self.answers_agree / n,
            "logits_sqnr_db_min": None if lo is None else (round(lo, 2) if math.isfinite(lo) else "inf"),
            # over all samples, as the fp32 check takes it (bit-identical logits count as "inf")
            "logits_sqnr_db_median": _db(float(np.median(self.sqnr))) if self.sqnr else None,
            "logits_sqnr_db": [round(s, 2) if math.isfinite(s) else "inf" for s in self.sqnr],
            "vision_sqnr_db_min": _db(min(self.vision_sqnr)) if self.vision_sqnr else None,
            "failing_samples": self.misses(),
        }

    def sqnr_min(self) -> float | None:
        return min(self.sqnr) if self.sqnr else None

    def failures(self, thresholds: dict | None = None) -> list[str]:
        """One phrase per threshold missed (empty: parity holds). No samples is a failure too."""
        t = {**THRESHOLDS, **(thresholds or {})}
        if self.samples == 0:
            return ["no samples were compared"]
        d = self.as_dict()
        out = []
        for i, a in enumerate(d["kept_index_agreement_per_stage"]):
            if a < t["kept_index_agreement"]:
                out.append(f"stage {i} kept-index agreement {a * 100:.1f}% < {t['kept_index_agreement'] * 100:.0f}%")
        if d["answer_agreement"] < t["answer_agreement"]:
            out.append(f"answer agreement {d['answer_agreement'] * 100:.1f}% < {t['answer_agreement'] * 100:.0f}%")
        lo = self.sqnr_min()
        if t["logits_sqnr_db_min"] is not None and lo < t["logits_sqnr_db_min"]:
            out.append(f"logits SQNR min {lo:.2f} dB < {t['logits_sqnr_db_min']:g} dB")
        if t["logits_sqnr_db_median"] is not None:
            med = float(np.median(self.sqnr))  # an infinite SQNR (bit-identical logits) counts as above
            if med < t["logits_sqnr_db_median"]:
                out.append(f"logits SQNR median {med:.2f} dB < {t['logits_sqnr_db_median']:g} dB")
        if self.vision_sqnr and min(self.vision_sqnr) < t["vision_sqnr_db_min"]:
            out.append(f"vision features SQNR min {min(self.vision_sqnr):.2f} dB < {t['vision_sqnr_db_min']:g} dB")
        return out


def _db(x: float):
    return round(x, 2) if math.isfinite(x) else "inf"


def compare(runner, deployed, items, max_new_tokens: int, progress: bool = True, ids=None,
            release: bool = False) -> ParityReport:
    """items: iterable of (image uint8 HxWx3, question). Runs the graphs (`runner`, a
    runtime.runners.GraphRunner of any backend) and the reference side by side through polygraphy's
    Comparator (runtime/runners.py); `ids` (one per item) name the samples that miss a threshold.

    The decoder comparison starts from the same embeddings on both sides (those of vision.onnx +
    embed.onnx): float noise of the unquantized vision tower must not decide a near-tie in a top-k.
    The vision graph is compared on its own (SQNR of its features). `release`: the graphs first,
    then their sessions are released before the reference runs (runners.run_side_by_side); there
    `deployed` may be a function making it then."""
    from quota_export.runtime.runners import run_side_by_side

    rep = ParityReport()
    items = list(items)
    ids = ids or [None] * len(items)
    pairs = run_side_by_side(runner, deployed, items, max_new_tokens, release, progress=progress)
    bar = dict(total=len(items), desc="parity", disable=not progress or release, unit="sample")
    for (ref, out), sid in tqdm(zip(pairs, ids), **bar):
        n = sum(k.startswith("kept.") for k in ref)
        rep.vision_sqnr.append(sqnr_db(ref["inputs_embeds"], out["inputs_embeds"]))
        rep.add([ref[f"kept.{i}"] for i in range(n)], [out[f"kept.{i}"] for i in range(n)], ref["tokens"].tolist(),
                out["tokens"].tolist(), ref["logits"], out["logits"], sid)
    return rep


def misses_line(misses: list[dict], limit: int = 5) -> str:
    """`samples missing parity: test-00077 (SQNR 20.59 dB), test-00082 (stage 2 kept indices) ...`
    from `ParityReport.misses()`."""
    more = f" and {len(misses) - limit} more" if len(misses) > limit else ""
    return "samples missing parity: " + ", ".join(f"{m['id']} ({', '.join(m['why'])})" for m in misses[:limit]) + more


def summary_line(d: dict, source: str | None = None) -> str:
    """One line for people: `parity over 8 samples of test.jsonl: kept-index agreement 100.0%, ...`."""
    lo = d["logits_sqnr_db_min"]
    lo = "n/a" if lo is None else (f"{lo} dB" if isinstance(lo, str) else f"{lo:.2f} dB")
    med = d.get("logits_sqnr_db_median")
    med = "" if med is None else (f", median {med} dB" if isinstance(med, str) else f", median {med:.2f} dB")
    of = f" of {source}" if source else ""
    return (
        f"parity over {d['samples']} samples{of}: kept-index agreement {d['kept_index_agreement'] * 100:.1f}%, "
        f"answer agreement {d['answer_agreement'] * 100:.1f}%, logits SQNR min {lo}{med}"
    )
