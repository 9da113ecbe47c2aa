"""Many samples through the graphs one graph at a time (parity of `build` and `verify`).

`OrtRunner.generate` runs one sample through vision -> embed -> prefill -> decode, so a runner that
holds one decoder session at a time (`session_bytes`) remakes the prefill and decode sessions for
every sample, and one that holds all four has every graph in memory at once. Here every sample's
`OrtRunner.generate_steps` is advanced together, graph by graph:

    vision   every sample                     (its session dropped after)
    embed    every sample's prompt            (held throughout: the decode steps embed their tokens)
    prefill  the samples whose KV caches fit PAST_BYTES (more: in later rounds)
    decode   those samples, step by step to their last token, then the next round's prefill

so the process holds the embedding session and one other, each made once per round (one round
unless the caches of all samples exceed PAST_BYTES). Each sample's graph calls and inputs are
those of `generate`: the same results, bit for bit (tests/runtime/test_graphmajor.py).
"""

from __future__ import annotations

from quota_export.runtime.ort import GRAPHS, OrtRunner, RunResult

PAST_BYTES = 1 << 30  # KV caches held between a round's prefill and its decode steps
KEEP = "embed.onnx"  # the session held through every phase


def generate_all(runner: OrtRunner, items, max_new_tokens: int | None = None,
                 past_bytes: int = PAST_BYTES, done=None) -> list[RunResult]:
    """`[runner.generate(image, question, max_new_tokens) for image, question in items]`, run one
    graph at a time (module doc). A runner making its sessions on use (`session_bytes`) has those
    other than the one in use and KEEP dropped; one holding all four keeps them. `done()` is
    called as each sample is answered (a progress bar)."""
    steps = [runner.generate_steps(image, q, max_new_tokens) for image, q in items]
    results: list[RunResult | None] = [None] * len(steps)
    calls = {}  # sample -> its next graph call (graph, feeds)
    for i in range(len(steps)):
        _advance(steps, calls, results, i, None)
    past: dict[int, int] = {}  # sample -> bytes of its KV cache, between its prefill and its last step
    while calls:
        g = next(g for g in GRAPHS if any(c[0] == g for c in calls.values())
                 and not (g == "prefill.onnx" and _full(past, past_bytes) and len(calls) > _waiting(calls, g)))
        if runner.session_bytes is not None and g != KEEP:  # sessions made on use: g's and KEEP's held
            for h in [h for h in runner.sessions if h not in (g, KEEP)]:
                runner._drop(h)
        for i in sorted(i for i, c in calls.items() if c[0] == g):
            if g == "prefill.onnx" and _full(past, past_bytes):
                break
            out = runner._run(*calls[i])
            if g == "prefill.onnx":
                past[i] = sum(v.nbytes for k, v in out.items() if k.startswith("present."))
            if not _advance(steps, calls, results, i, out):
                past.pop(i, None)
                if done is not None:
                    done()
    return results


def _full(past: dict, budget: int) -> bool:
    return bool(past) and sum(past.values()) >= budget


def _waiting(calls: dict, g: str) -> int:
    return sum(c[0] == g for c in calls.values())


def _advance(steps, calls, results, i: int, out) -> bool:
    """Send sample i the outputs of its last call; -> False once it is done (its result kept)."""
    try:
        calls[i] = next(steps[i]) if out is None else steps[i].send(out)
        return True
    except StopIteration as done:
        results[i] = done.value
        calls.pop(i, None)
        return False
