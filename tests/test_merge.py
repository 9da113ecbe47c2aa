"""Token merging (pruning.merge: proportional): the reference's semantics, and the graphs against it.

The reference (`Deployed.merge_counts` / `key_bias`) is checked on hand-built streams whose dropped
tokens repeat kept ones; the lowered prefill and decode graphs (ONNX Runtime) are checked against
the reference on the tiny model: kept indices, merge.{s} counts, logits of prefill and decode."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

from calib_data.shapes import make_sample, render
from quota_export import models
from quota_export.lower.decoder import DecoderLowering
from quota_export.reference import DeployConfig, Deployed, StageCfg, decode_position
from quota_export.runtime.ort import SESSION_CONFIG
from quota_export.verify import sqnr_db

torch.set_num_threads(1)
# a plain layer between the stages, so every kind of layer sees a bias: none (0), stage 0's (1, 2), stage 1's (3)
# graph vs reference: float noise only, ~130 dB with fp64 reductions; merging itself moves the
# logits of the tiny model by ~40 dB, so a graph that drops a bias anywhere lands far below this
PARITY_DB = 80.0
STAGES = [StageCfg(1, 72, (0.0, 1.0, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0)),
          StageCfg(3, 20, (1.0, 1.0, 1.0, 1.0), (10.0, 0.01, 1.0, 0.5))]


@pytest.fixture(scope="module")
def adapter(tiny_llava):
    return models.load(tiny_llava)


def deployed(adapter, merge=True, stages=STAGES):
    return Deployed(adapter, DeployConfig.of("w4a4kv4", stages=list(stages), merge=merge))


def counts_of(out, dep, start):
    """Per stage, the counts behind the key bias each stage's layer kept with its cache."""
    return [torch.exp(out.cache[st.layer].bias[start:]).round() for st in dep.cfg.stages]


# ---------------------------------------------------------------- the reference


def repeated_stream(dep, start=2, after=3, seed=0):
    """h [1,T,D]: `start` text rows, 12 visual rows repeating 3 random rows (b0 b1 b2 b0 b1 b2 ...),
    `after` text rows; the visual rows of one pattern have the same codes at every layer."""
    g = torch.Generator().manual_seed(seed)
    D = dep.spec.hidden
    base = torch.randn(3, D, generator=g)
    h = torch.cat([torch.randn(start, D, generator=g), base.repeat(4, 1), torch.randn(after, D, generator=g)])[None]
    return h, torch.arange(h.shape[1])[None]


def test_merge_counts_go_to_the_first_most_similar_kept_token(adapter):
    dep = deployed(adapter)
    h, pos = repeated_stream(dep)
    # keep 0 (b0), 1 (b1), 2 (b2), 3 (b0 again): the dropped b0s (6, 9) tie between kept 0 and 3 -> 0
    idx = torch.tensor([[0, 1, 2, 3]])
    cnt = dep.merge_counts(0, h, pos, idx, 2, 12, torch.ones(12, dtype=torch.float64))
    assert cnt.dtype == torch.float64 and cnt.tolist() == [3.0, 4.0, 4.0, 1.0]
    # counts carried from an earlier stage are moved whole: kept 0 gets tokens 0, 6, 9
    prev = torch.arange(1, 13, dtype=torch.float64)
    cnt = dep.merge_counts(0, h, pos, idx, 2, 12, prev)
    assert cnt.tolist() == [1 + 7 + 10, 2 + 5 + 8 + 11, 3 + 6 + 9 + 12, 4] and cnt.sum() == prev.sum()
    bias = dep.key_bias(cnt, 2)
    assert torch.equal(bias, torch.cat([torch.zeros(2, dtype=torch.float64), cnt.log()]))
    assert dep.key_bias(None, 2) is None


def test_log_count_bias_restores_the_attention_of_the_unpruned_keys(adapter):
    """Why the bias is log(count): when the dropped keys repeat kept ones, softmax over the kept
    keys with + log(count) gives what softmax over all keys gave (proportional attention)."""
    dep = deployed(adapter)
    sp = dep.spec
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, sp.heads, 2, sp.head_dim, generator=g)
    kb, vb = (torch.randn(1, sp.kv_heads, 3, sp.head_dim, generator=g) for _ in range(2))  # b0 b1 b2
    kt, vt = (torch.randn(1, sp.kv_heads, 5, sp.head_dim, generator=g) for _ in range(2))  # 2 before, 3 after
    pattern = torch.arange(12) % 3
    full_k = torch.cat([kt[:, :, :2], kb[:, :, pattern], kt[:, :, 2:]], dim=2)
    full_v = torch.cat([vt[:, :, :2], vb[:, :, pattern], vt[:, :, 2:]], dim=2)
    keep = torch.tensor([0, 1, 2, 3])
    k = torch.cat([kt[:, :, :2], kb[:, :, pattern[keep]], kt[:, :, 2:]], dim=2)
    v = torch.cat([vt[:, :, :2], vb[:, :, pattern[keep]], vt[:, :, 2:]], dim=2)
    bias = dep.key_bias(torch.tensor([3.0, 4.0, 4.0, 1.0], dtype=torch.float64), 2)
    _, want = dep.attend(q, full_k, full_v, None)
    _, got = dep.attend(q, k, v, None, bias)
    _, plain = dep.attend(q, k, v, None)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(plain, want, rtol=1e-3, atol=1e-3)  # without the bias it is not


def test_counts_sum_to_n_visual_after_every_stage(adapter):
    dep = deployed(adapter)
    scene, q = make_sample(0)
    pr = adapter.prompt(render(scene), q["question"])
    out = dep.prefill(dep.embed_prompt(pr), pr.positions(), pr.visual_start, pr.n_visual)
    for c, st in zip(counts_of(out, dep, pr.visual_start), STAGES):
        assert c.numel() == st.keep and c.sum() == pr.n_visual and (c >= 1).all()
    assert [kv.bias is None for kv in out.cache] == [True, False, False, False]
    assert out.cache[2].bias is out.cache[1].bias  # the layers after a stage share its bias


# ---------------------------------------------------------------- graphs vs reference


def session(model):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    for k, v in SESSION_CONFIG.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(sess, feeds):
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_graph_io(adapter):
    dep = deployed(adapter)
    pre, dec = DecoderLowering(dep, 144, 5).prefill(21), DecoderLowering(dep, 144, 5).decode(21)
    shape = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    outs = {o.name: (o.type.tensor_type.elem_type, shape(o)) for o in pre.graph.output}
    ins = {i.name: (i.type.tensor_type.elem_type, shape(i)) for i in dec.graph.input}
    f32 = 1  # onnx.TensorProto.FLOAT
    assert {k: v for k, v in outs.items() if k.startswith("merge.")} == {"merge.0": (f32, [1, 72]), "merge.1": (f32, [1, 20])}
    assert {k: v for k, v in ins.items() if k.startswith("merge.")} == {"merge.0": (f32, [1, 72]), "merge.1": (f32, [1, 20])}
    plain = deployed(adapter, merge=False)
    assert not any(o.name.startswith("merge.") for o in DecoderLowering(plain, 144, 5).prefill(21).graph.output)
    assert not any(i.name.startswith("merge.") for i in DecoderLowering(plain, 144, 5).decode(21).graph.input)


def test_graphs_match_reference(adapter):
    dep = deployed(adapter)
    nomerge = deployed(adapter, merge=False)
    probe = adapter.prompt(np.zeros((*adapter.image_size(), 3), np.uint8), "describe image")
    # one lowering per graph (a lowering caches its weight initializers)
    pre = session(DecoderLowering(dep, probe.n_visual, probe.visual_start).prefill(21))
    dec = session(DecoderLowering(dep, probe.n_visual, probe.visual_start).decode(21))
    emb_table = adapter.embed_tokens()
    for seed in range(3):
        scene, q = make_sample(seed)
        pr = adapter.prompt(render(scene), q["question"])
        emb = dep.embed_prompt(pr)
        start = pr.visual_start
        ref = dep.prefill(emb, pr.positions(), start, pr.n_visual)
        out = run(pre, {"inputs_embeds": emb.numpy(), "position_ids": pr.positions().numpy()})
        for i, k in enumerate(ref.kept):
            np.testing.assert_array_equal(out[f"kept.{i}"], k.numpy())
        for i, (c, st) in enumerate(zip(counts_of(ref, dep, start), STAGES)):
            got = out[f"merge.{i}"]
            assert got.dtype == np.float32 and got.shape == (1, st.keep)
            np.testing.assert_array_equal(got[0], c.numpy())
            # and the bias from the graph's counts is the reference's, bit for bit
            assert torch.equal(dep.key_bias(torch.from_numpy(got[0]).double(), start), ref.cache[st.layer].bias)
        assert sqnr_db(ref.logits.numpy(), out["logits"]) >= PARITY_DB
        # not vacuous: merging changes the model far more than the graph's float noise
        assert sqnr_db(ref.logits.numpy(), nomerge.prefill(emb, pr.positions(), start, pr.n_visual).logits.numpy()) < 60.0

        past = {k.replace("present.", "past.", 1): v for k, v in out.items() if k.startswith("present.")}
        merge = {k: v for k, v in out.items() if k.startswith("merge.")}
        unmerged = {k: np.ones_like(v) for k, v in merge.items()}
        logits, p, worst, worst_unmerged = ref.logits, pr.first_decode_position(), math.inf, math.inf
        for _ in range(3):
            e = emb_table(torch.tensor([[int(logits.argmax(-1))]])).float()
            logits = dep.decode(e, decode_position(p, pr.positions()), ref.cache)
            feeds = {"inputs_embeds": e.detach().numpy(), "position_ids": np.array([[p]], np.int64), **past}
            o = run(dec, {**feeds, **merge})
            worst = min(worst, sqnr_db(logits.numpy(), o["logits"]))
            worst_unmerged = min(worst_unmerged, sqnr_db(logits.numpy(), run(dec, {**feeds, **unmerged})["logits"]))
            past = {k.replace("present.", "past.", 1): v for k, v in o.items() if k.startswith("present.")}
            p += 1
        assert worst >= PARITY_DB
        assert worst_unmerged < 60.0  # decode does use its merge.* inputs
