"""Quantizers against numpy references, RTN, GPTQ vs RTN, Hadamard matrices and model rotation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quota_export.ops.act_quant import fake_quant_act
from quota_export.quant.gptq import HessianAccumulator, gptq, gptq_quantize
from quota_export.quant.hadamard import (
    HadamardLinear,
    hadamard_matrix,
    is_hadamard_size,
    random_hadamard,
    rotate_model,
)
from quota_export.quant.quantizers import (
    EPS,
    dequantize,
    qrange,
    quantize,
    quantize_weight,
)
from quota_export.quant.rtn import rtn
from quota_export.recipe import GPTQArgs, WeightQuant

torch.set_num_threads(1)

# ---------------------------------------------------------------- numpy references (float32 throughout)

F32 = np.float32


def np_qrange(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def np_quant(x, scale, zp, bits, signed):
    lo, hi = np_qrange(bits, signed)
    q = np.rint(x / scale)  # numpy rint: round half to even
    if zp is not None:
        q = q + zp
    return np.clip(q, lo, hi).astype(F32)


def np_weight(w, bits, symmetric, g):
    out, n = w.shape
    blocks = w.reshape(out, n // g, g)
    if symmetric:
        _, hi = np_qrange(bits, True)
        s = np.maximum(np.abs(blocks).max(-1), F32(EPS)) / F32(hi)
        z = None
    else:
        lo, hi = np_qrange(bits, False)
        mn, mx = np.minimum(blocks.min(-1), F32(0)), np.maximum(blocks.max(-1), F32(0))
        s = np.maximum(mx - mn, F32(EPS)) / F32(hi)
        z = np.clip(np.rint(-mn / s), lo, hi).astype(F32)
    S = np.repeat(s, g, axis=1)
    Z = None if z is None else np.repeat(z, g, axis=1)
    q = np_quant(w, S, Z, bits, symmetric)
    return q, s, z, (q * S if Z is None else (q - Z) * S)


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


# ---------------------------------------------------------------- primitives


def test_round_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49999997, 2.5000002])
    got = quantize(x, torch.tensor(1.0), None, 8, True)
    assert got.tolist() == [0.0, 2.0, 2.0, 4.0, -0.0, -2.0, -2.0, 0.0, 3.0]
    np.testing.assert_array_equal(got.numpy(), np_quant(x.numpy(), F32(1), None, 8, True))


@pytest.mark.parametrize("bits,signed", [(4, True), (4, False), (8, True), (8, False)])
def test_saturation(bits, signed):
    lo, hi = qrange(bits, signed)
    assert (lo, hi) == np_qrange(bits, signed)
    x = torch.tensor([-1e9, -300.0, lo - 0.6, lo - 0.4, hi + 0.4, hi + 0.6, 300.0, 1e9])
    got = quantize(x, torch.tensor(1.0), None, bits, signed)
    assert got.min().item() == lo and got.max().item() == hi
    np.testing.assert_array_equal(got.numpy(), np_quant(x.numpy(), F32(1), None, bits, signed))


def test_qrange_rejects_other_widths():
    with pytest.raises(ValueError, match="unsupported bit width 16"):
        qrange(16, True)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [8, 32, 64])  # 64 = in-features: per-channel
def test_weight_matches_numpy(bits, symmetric, group):
    w = randn(16, 64, seed=3)
    w[2, :8] = 0.0  # an all-zero group
    w[5] += 0.7  # a row with all-positive groups (asymmetric range still contains 0)
    qw = quantize_weight(w, bits, symmetric, group)
    q, s, z, dq = np_weight(w.numpy(), bits, symmetric, group)
    assert qw.q.dtype == (torch.int8 if symmetric else torch.uint8)
    np.testing.assert_array_equal(qw.q.float().numpy(), q)
    np.testing.assert_array_equal(qw.scale.numpy(), s)
    if symmetric:
        assert qw.zero_point is None
    else:
        np.testing.assert_array_equal(qw.zero_point.float().numpy(), z)
    np.testing.assert_array_equal(qw.dequant().numpy(), dq)
    lo, hi = qrange(bits, symmetric)
    assert qw.q.min() >= lo and qw.q.max() <= hi


def test_dequantize_asym():
    q = torch.tensor([0.0, 3.0, 15.0])
    assert dequantize(q, torch.tensor(0.5), torch.tensor(3.0)).tolist() == [-1.5, 0.0, 6.0]


# ---------------------------------------------------------------- RTN


def test_rtn_follows_cfg():
    w = randn(8, 64, seed=5)
    a = rtn(w, WeightQuant(bits=4, group_size=16))
    assert torch.equal(a.q, quantize_weight(w, 4, True, 16).q) and a.group_size == 16
    c = rtn(w, WeightQuant(bits=8, granularity="channel", symmetric=False, group_size=16))
    assert c.group_size == 64 and c.scale.shape == (8, 1) and c.bits == 8
    with pytest.raises(ValueError, match="not quantized"):
        rtn(w, WeightQuant(bits=16))


# ---------------------------------------------------------------- GPTQ


def correlated_inputs(n_rows=512, n=64, seed=6):
    """Activations with strongly correlated features (decaying spectrum) plus a little noise."""
    mix = randn(n, n, seed=seed) * torch.logspace(0, -2, n)[None, :]
    return randn(n_rows, n, seed=seed + 1) @ mix.T + 0.05 * randn(n_rows, n, seed=seed + 2)


def test_hessian_accumulator():
    x = randn(3, 10, 16, seed=8)
    acc = HessianAccumulator(16)
    acc.add(x[0])
    acc.add(x[1:])
    X = x.reshape(-1, 16).double()
    torch.testing.assert_close(acc.hessian, 2 * X.T @ X / 30)
    lin = torch.nn.Linear(16, 4)
    acc2 = HessianAccumulator(16)
    handle = acc2.attach(lin)
    lin(x)
    handle.remove()
    lin(x)
    assert acc2.n == 30
    torch.testing.assert_close(acc2.hessian, acc.hessian)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [16, 64])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_identity_hessian_is_rtn(symmetric, group, act_order):
    """H = I: no error feedback and the scales come from the original weights, so GPTQ == RTN."""
    w = randn(32, 64, seed=9)
    g = gptq_quantize(w, torch.eye(64), bits=4, symmetric=symmetric, group_size=group, act_order=act_order,
                      block_size=32)
    r = quantize_weight(w, 4, symmetric, group)
    assert torch.equal(g.q, r.q) and torch.equal(g.scale, r.scale)
    assert torch.equal(g.dequant(), r.dequant())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group,block,act_order", [(16, 32, False), (64, 16, False), (16, 16, True), (32, 128, True)])
def test_gptq_beats_rtn_on_correlated_inputs(symmetric, group, block, act_order):
    X = correlated_inputs()
    w = randn(32, 64, seed=10)
    acc = HessianAccumulator(64)
    acc.add(X)
    cfg = WeightQuant(bits=4, symmetric=symmetric, group_size=group, algorithm="gptq",
                      gptq=GPTQArgs(block_size=block, act_order=act_order))
    qg = gptq(w, acc.hessian, cfg)
    qr = rtn(w, cfg)
    err_g = (X @ (w - qg.dequant()).T).norm()
    err_r = (X @ (w - qr.dequant()).T).norm()
    assert err_g < 0.7 * err_r, (err_g, err_r)
    # the result is on the deployed grid: re-quantizing the dequantized weights is the identity
    again = quantize_weight(qg.dequant(), 4, symmetric, group, scale=qg.scale,
                            zero_point=None if symmetric else qg.zero_point.float())
    assert torch.equal(again.q, qg.q)


def test_gptq_dead_columns():
    X = correlated_inputs()
    X[:, [3, 40]] = 0.0  # inputs that never fire
    w = randn(16, 64, seed=11)
    acc = HessianAccumulator(64)
    acc.add(X)
    qw = gptq_quantize(w, acc.hessian, bits=4, symmetric=True, group_size=16)
    dq = qw.dequant()
    assert torch.isfinite(dq).all()
    assert torch.all(dq[:, [3, 40]] == 0)


def test_gptq_rejects_bad_shapes():
    with pytest.raises(ValueError, match="does not match in-features"):
        gptq_quantize(randn(4, 32), torch.eye(16), bits=4, symmetric=True, group_size=16)
    with pytest.raises(ValueError, match="not divisible by group_size"):
        gptq_quantize(randn(4, 24), torch.eye(24), bits=4, symmetric=True, group_size=16)


# ---------------------------------------------------------------- Hadamard


@pytest.mark.parametrize("n", [1, 2, 8, 12, 20, 24, 40, 64, 96, 224])
def test_hadamard_matrix(n):
    assert is_hadamard_size(n)
    H = hadamard_matrix(n)
    torch.testing.assert_close(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(H.abs() * n**0.5, torch.ones(n, n, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [7, 28, 74])
def test_orthogonal_fallback(n):
    assert not is_hadamard_size(n)
    H = hadamard_matrix(n, seed=1)
    torch.testing.assert_close(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(H, hadamard_matrix(n, seed=1)) and not torch.equal(H, hadamard_matrix(n, seed=2))


def test_rotation_spreads_outliers():
    """The point of rotating: per-token 4-bit error on activations with an outlier channel drops."""
    x = randn(64, 64, seed=12)
    x[:, 5] *= 50.0
    Q = random_hadamard(64, seed=0).float()
    err_plain = (fake_quant_act(x, 4) - x).norm()
    err_rot = (fake_quant_act(x @ Q, 4) @ Q.T - x).norm()
    assert err_rot < 0.5 * err_plain


def tiny_llava(tie=False, intermediate=128):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vc = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    tc = LlamaConfig(
        hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tie, initializer_range=0.1,
    )
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=99, tie_word_embeddings=tie)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so the fusion is exercised
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tie,intermediate", [(False, 128), (True, 96)])
def test_rotated_model_is_invariant(tie, intermediate):
    model = tiny_llava(tie, intermediate)
    ids = torch.tensor([[1] + [99] * 16 + [5, 6, 7, 8]])  # 16 image tokens = (32 / 8)^2 patches
    pixels = randn(1, 3, 32, 32, seed=13)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels).logits
    names_before = [n for n, _ in model.named_modules()]
    rotate_model(model, seed=3)
    with torch.no_grad():
        after = model(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(after, before, atol=1e-4 * before.abs().max().item(), rtol=0)

    lm = model.model.language_model
    assert [n for n, _ in model.named_modules()] == names_before  # quant targets still match
    for layer in lm.layers:
        down = layer.mlp.down_proj
        assert isinstance(down, HadamardLinear) and isinstance(down, torch.nn.Linear)
        assert torch.all(layer.input_layernorm.weight == 1) and torch.all(layer.post_attention_layernorm.weight == 1)
    assert torch.all(lm.norm.weight == 1)
    assert model.lm_head.weight.data_ptr() != lm.embed_tokens.weight.data_ptr()
    with pytest.raises(ValueError, match="already rotated"):
        rotate_model(model, seed=3)


def reference_gptq(w, H, bits, symmetric, groupsize, blocksize, actorder, percdamp=0.01):
    """IST-DASLab `fasterquant`, transcribed with our grid (static_groups when act-order)."""
    W = w.clone().float()
    H = H.clone().double()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = {}
    if actorder:
        for i in range(0, columns, groupsize):
            groups[i // groupsize] = quantize_weight(W[:, i : i + groupsize], bits, symmetric, groupsize)
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    damp = percdamp * torch.mean(torch.diag(H))
    H[range(columns), range(columns)] += damp
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.zeros_like(W)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w_ = W1[:, i]
            d = Hinv1[i, i]
            if not actorder:
                if (i1 + i) % groupsize == 0:
                    quantizer = quantize_weight(W[:, i1 + i : i1 + i + groupsize], bits, symmetric, groupsize)
            else:
                quantizer = groups[int(perm[i1 + i]) // groupsize]
            zp = None if quantizer.zero_point is None else quantizer.zero_point.float()
            q = dequantize(quantize(w_.unsqueeze(1), quantizer.scale, zp, bits, symmetric), quantizer.scale, zp)
            Q[:, i1 + i] = q.flatten()
            err1 = (w_ - q.flatten()) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, torch.argsort(perm)]
    return Q


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group,block,act_order", [(16, 32, False), (32, 16, False), (16, 32, True)])
def test_gptq_matches_reference_loop(symmetric, group, block, act_order):
    """Group scales are taken when a group starts, from W as of the last block update (as the reference)."""
    X = correlated_inputs(seed=14)
    w = randn(16, 64, seed=15)
    H = 2 * X.double().T @ X.double() / X.shape[0]
    got = gptq_quantize(w, H, bits=4, symmetric=symmetric, group_size=group, block_size=block, act_order=act_order)
    want = reference_gptq(w, H, 4, symmetric, group, block, act_order)
    torch.testing.assert_close(got.dequant(), want, atol=0, rtol=0)


# ---------------------------------------------------------------- exact accumulation


def test_exact_scale_bits():
    from quota_export.quant.quantizers import exact_scale_bits

    # 512 * 8 * 8 * (2^9 - 1) < 2^24 <= 512 * 8 * 8 * (2^10 - 1)
    assert exact_scale_bits(512, 4, True, 4) == 9
    assert exact_scale_bits(192, 4, True, 4) == 10
    assert exact_scale_bits(512, 4, False, 4) == 8  # |q - zp| <= 15
    assert exact_scale_bits(64, 4, True, 4) == 12
    with pytest.raises(ValueError, match="accumulation: float"):
        exact_scale_bits(4096, 8, True, 8)


@pytest.mark.parametrize("symmetric", [True, False])
def test_snapped_scales_are_fixed_point_per_row(symmetric):
    from quota_export.quant.quantizers import exact_scale_bits, weight_scales

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 256, generator=g) * torch.logspace(-3, 0, 256)[None]  # groups of very different range
    b = exact_scale_bits(256, 4, symmetric, 4)
    free, _ = weight_scales(w, 4, symmetric, 32)
    snapped, zp = weight_scales(w, 4, symmetric, 32, scale_bits=b)
    assert torch.all(snapped >= free)  # rounded up: a min/max range never saturates
    top = snapped.amax(1, keepdim=True).double()
    e = torch.ceil(torch.log2(top / (2**b - 1)))
    m = snapped.double() / torch.exp2(e)
    assert torch.equal(m, torch.round(m)) and m.min() >= 1 and m.max() <= 2**b - 1
    qw = quantize_weight(w, 4, symmetric, 32, scale_bits=b)
    lo, hi = qrange(4, symmetric)
    assert int(qw.q.min()) >= lo and int(qw.q.max()) <= hi


def test_exact_accumulation_is_order_independent():
    """Integer activations times snapped weights: fp32 sums in any order equal the fp64 sum."""
    from quota_export.quant.quantizers import exact_scale_bits

    g = torch.Generator().manual_seed(1)
    K = 512
    w = torch.randn(64, K, generator=g)
    x = torch.randint(-7, 8, (40, K), generator=g).float()
    exact = quantize_weight(w, 4, True, 64, scale_bits=exact_scale_bits(K, 4, True, 4)).dequant()
    free = quantize_weight(w, 4, True, 64).dequant()
    perm = torch.randperm(K, generator=g)
    for W, want_exact in ((exact, True), (free, False)):
        fwd = x @ W.T
        rev = x[:, perm] @ W[:, perm].T
        f64 = (x.double() @ W.double().T).float()
        same = torch.equal(fwd, rev) and torch.equal(fwd, f64)
        assert same == want_exact


def test_exact_accumulation_matches_onnxruntime_4bit_kernel():
    """ONNX Runtime's fused 4-bit MatMul (MatMulNBits, fp32) equals torch bit for bit on snapped
    scales, and not on free fp32 scales (the reason the scales are snapped)."""
    import onnxruntime as ort
    from onnx import TensorProto

    from quota_export.ops.graph import Graph
    from quota_export.quant.quantizers import exact_scale_bits

    g = torch.Generator().manual_seed(2)
    K, N, T = 512, 96, 64
    w = torch.randn(N, K, generator=g)
    x = torch.randint(-7, 8, (1, T, K), generator=g).float()
    results = {}
    for name, sb in (("exact", exact_scale_bits(K, 4, True, 4)), ("free", None)):
        qw = quantize_weight(w, 4, True, 64, scale_bits=sb)
        gr = Graph("mm")
        xi = gr.input("x", TensorProto.FLOAT, [1, T, K])
        d = gr.op("DequantizeLinear", [gr.init_int4("weight_q", qw.q.numpy().T), gr.init("scale", qw.scale.numpy().T.copy())],
                  axis=0, block_size=64)  # fmt: skip
        gr.output(gr.op("MatMul", [xi, d]), "y", TensorProto.FLOAT, [1, T, N])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        s = ort.InferenceSession(gr.model(21).SerializeToString(), so, providers=["CPUExecutionProvider"])
        got = s.run(None, {"x": x.numpy()})[0]
        results[name] = np.array_equal(got, (x @ qw.dequant().T).numpy())
    assert results == {"exact": True, "free": False}


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_the_exact_grid(symmetric, act_order):
    """With 4-bit activations (exact accumulation) GPTQ's scales sit on each row's fixed-point
    grid and it still beats RTN on the same grid."""
    from quota_export.quant.quantizers import exact_scale_bits

    X = correlated_inputs()
    w = randn(32, 64, seed=11)
    acc = HessianAccumulator(64)
    acc.add(X)
    cfg = WeightQuant(bits=4, symmetric=symmetric, group_size=16, algorithm="gptq", gptq=GPTQArgs(act_order=act_order))
    b = exact_scale_bits(64, 4, symmetric, 4)
    assert cfg.scale_bits_for(64, 4) == b and cfg.scale_bits_for(64, 16) is None
    qg, qr = gptq(w, acc.hessian, cfg, act_bits=4), rtn(w, cfg, act_bits=4)
    for q in (qg, qr):
        e = torch.ceil(torch.log2(q.scale.amax(1, keepdim=True).double() / (2**b - 1)))
        m = q.scale.double() / torch.exp2(e)
        assert torch.equal(m, torch.round(m)) and m.max() <= 2**b - 1
    assert (X @ (w - qg.dequant()).T).norm() < 0.7 * (X @ (w - qr.dequant()).T).norm()
    assert not torch.equal(rtn(w, cfg).scale, qr.scale)  # free fp32 scales without quantized activations
