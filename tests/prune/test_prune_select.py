"""stable_topk (ONNX TopK tie rule) and the baseline selectors, against brute-force references."""

from __future__ import annotations

import math

import pytest
import torch

from quota_export.ops.gather import stable_topk
from quota_export.prune.selectors import cosine_distance, divprune, random_keep

torch.set_num_threads(1)


# ---------------------------------------------------------------------------- stable_topk


def ref_topk(row: list[float], k: int) -> list[int]:
    """Brute force: rank by (value desc, index asc), NaN as -inf; keep k; return ascending."""
    key = lambda i: (-(-math.inf if math.isnan(row[i]) else row[i]), i)  # noqa: E731
    return sorted(sorted(range(len(row)), key=key)[:k])


def check_topk(scores: torch.Tensor, k: int) -> None:
    got = stable_topk(scores, k)
    assert got.dtype == torch.int64 and got.shape == (scores.shape[0], k)
    for b in range(scores.shape[0]):
        row = [float(v) for v in scores[b].tolist()]
        assert got[b].tolist() == ref_topk(row, k), (row, k)


def test_topk_many_ties_vs_reference():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 17, 64):
        scores = torch.randint(0, 3, (4, n), generator=g).float()  # heavy ties
        for k in range(n + 1):
            check_topk(scores, k)


def test_topk_random_floats_vs_reference():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 144, generator=g)
    for k in (0, 1, 7, 36, 72, 143, 144):
        check_topk(scores, k)


def test_topk_all_equal_keeps_lowest_indices():
    # large N: torch.topk's tie order is unspecified here, the rule is not
    scores = torch.zeros(2, 5000)
    for k in (1, 7, 1000):
        assert stable_topk(scores, k).tolist() == [list(range(k))] * 2


def test_topk_tie_at_boundary():
    s = torch.tensor([[1.0, 5.0, 3.0, 5.0, 3.0, 3.0, 0.0]])
    assert stable_topk(s, 3).tolist() == [[1, 2, 3]]
    assert stable_topk(s, 4).tolist() == [[1, 2, 3, 4]]
    assert stable_topk(-s, 2).tolist() == [[0, 6]]


def test_topk_nan_inf_signed_zero():
    nan, inf = math.nan, math.inf
    s = torch.tensor([[nan, -inf, 0.0, -0.0, inf, nan, -1.0, 0.0]])
    check_topk(s, 8)
    for k in range(9):
        check_topk(s, k)
    assert stable_topk(s, 3).tolist() == [[2, 3, 4]]  # inf, then the zeros by index
    # NaN ranks with -inf, ties by index: -inf (1) before NaN (5)
    assert stable_topk(s, 7).tolist() == [[0, 1, 2, 3, 4, 6, 7]]
    all_nan = torch.full((1, 4), nan)
    assert stable_topk(all_nan, 2).tolist() == [[0, 1]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32])
def test_topk_dtypes(dtype):
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(-2, 3, (3, 23), generator=g).to(dtype)
    for k in (0, 5, 11, 23):
        check_topk(scores, k)


def test_topk_ascending_and_unique():
    g = torch.Generator().manual_seed(3)
    out = stable_topk(torch.randn(8, 100, generator=g), 40)
    assert (out[:, 1:] > out[:, :-1]).all()


def test_topk_rejects_bad_input():
    with pytest.raises(ValueError):
        stable_topk(torch.zeros(5), 2)
    with pytest.raises(ValueError):
        stable_topk(torch.zeros(1, 5), 6)
    with pytest.raises(ValueError):
        stable_topk(torch.zeros(1, 5), -1)


# ---------------------------------------------------------------------------- random_keep


def test_random_keep_deterministic_and_valid():
    a = random_keep(144, 36, seed=7, batch=4)
    b = random_keep(144, 36, seed=7, batch=4)
    assert a.dtype == torch.int64 and a.shape == (4, 36)
    assert torch.equal(a, b)
    assert not torch.equal(a, random_keep(144, 36, seed=8, batch=4))
    assert not torch.equal(a[0], a[1])  # rows are independent draws
    for row in a.tolist():
        assert row == sorted(set(row)) and 0 <= row[0] and row[-1] < 144
    assert torch.equal(random_keep(144, 36, seed=7, batch=2), a[:2])  # prefix-stable


def test_random_keep_edges():
    assert random_keep(10, 0, seed=0, batch=3).shape == (3, 0)
    assert random_keep(10, 10, seed=0, batch=2).tolist() == [list(range(10))] * 2
    with pytest.raises(ValueError):
        random_keep(10, 11, seed=0)
    with pytest.raises(ValueError):
        random_keep(10, 3, seed=0, batch=0)


def test_random_keep_is_roughly_uniform():
    counts = torch.bincount(random_keep(20, 5, seed=0, batch=4000).flatten(), minlength=20)
    assert counts.min() > 850 and counts.max() < 1150  # expected 1000 each


# ---------------------------------------------------------------------------- divprune


def ref_divprune(feats: list[list[float]], k: int) -> list[int]:
    """Brute force in plain Python: cosine distance, start at the token whose nearest other token
    is farthest, then greedily the unselected token farthest from the selected set; first index
    wins every tie."""
    n = len(feats)

    def norm(v):
        s = math.sqrt(sum(x * x for x in v))
        return [x / s for x in v] if s > 0 else [0.0 for _ in v]

    u = [norm(v) for v in feats]
    d = [[1.0 - sum(a * b for a, b in zip(u[i], u[j])) for j in range(n)] for i in range(n)]

    def argmax(vals, allowed):
        best = None
        for i in allowed:
            if best is None or vals[i] > vals[best]:
                best = i
        return best

    if k == 0:
        return []
    nn = [min((d[i][j] for j in range(n) if j != i), default=math.inf) for i in range(n)]
    sel = [argmax(nn, range(n))]
    while len(sel) < k:
        mind = [min(d[i][s] for s in sel) for i in range(n)]
        sel.append(argmax(mind, [i for i in range(n) if i not in sel]))
    return sorted(sel)


def paper_divprune(x: torch.Tensor, k: int) -> list[int]:
    """The published algorithm (one image): first token = argmax of each column's second-smallest
    distance, then argmax of the min distance to the selected rows."""
    xn = x / x.norm(dim=1, keepdim=True)
    m = 1.0 - xn @ xn.t()
    s = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(m, 2, dim=0, largest=False).values[1, :]
        else:
            scores = m[torch.tensor(s)].min(dim=0).values
        s.append(int(torch.argmax(scores)))
    return sorted(s)


def test_divprune_vs_reference_random():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 16, 6, generator=g, dtype=torch.float64)
    for k in (0, 1, 2, 5, 9, 15, 16):
        got = divprune(x, k)
        assert got.dtype == torch.int64 and got.shape == (3, k)
        for b in range(3):
            assert got[b].tolist() == ref_divprune(x[b].tolist(), k), (b, k)


def test_divprune_matches_published_algorithm():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 40, 8, generator=g)
    for k in (1, 4, 10, 20):
        got = divprune(x, k)
        for b in range(2):
            assert got[b].tolist() == paper_divprune(x[b].double(), k)


def test_divprune_ties_lower_index_wins():
    e = torch.eye(3, dtype=torch.float64)
    # tokens: e0 e1 e0 e2 e1 e2 -> every token has a duplicate (nearest distance 0): start at 0,
    # then e1 (index 1) and e2 (index 3) at distance 1, then only duplicates left: lowest index 2
    x = torch.stack([e[0], e[1], e[0], e[2], e[1], e[2]])[None]
    assert divprune(x, 1).tolist() == [[0]]
    assert divprune(x, 3).tolist() == [[0, 1, 3]]
    assert divprune(x, 4).tolist() == [[0, 1, 2, 3]]
    assert divprune(x[:, :5], 1).tolist() == [[3]]  # e2 alone: its nearest token is farthest
    for k in range(7):
        assert divprune(x, k)[0].tolist() == ref_divprune(x[0].tolist(), k)
    # exact duplicates and 2x copies of random float32 vectors: real ties, broken by index
    g = torch.Generator().manual_seed(6)
    y = torch.randn(1, 9, 13, generator=g)
    y[0, 5] = y[0, 2]
    y[0, 7] = 2 * y[0, 2]
    y[0, 8] = y[0, 0]
    d = cosine_distance(y)
    assert torch.equal(d, d.transpose(1, 2))
    assert torch.equal(d[0, 2], d[0, 5]) and torch.equal(d[0, 2], d[0, 7])
    for k in range(10):
        got = divprune(y, k)[0].tolist()
        assert len(set(got)) == k
        assert not ({5, 7} & set(got)) or 2 in got  # a copy is never chosen before its original


def test_divprune_zero_vector_and_edges():
    x = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [1.0, 0.1]]])
    assert divprune(x, 3).tolist() == [[0, 1, 2]]
    assert divprune(x, 2)[0].tolist() == ref_divprune(x[0].tolist(), 2)
    assert divprune(torch.ones(2, 1, 4), 1).tolist() == [[0], [0]]
    with pytest.raises(ValueError):
        divprune(x, 4)
    with pytest.raises(ValueError):
        divprune(torch.full((1, 3, 2), math.nan), 1)
    with pytest.raises(ValueError):
        divprune(torch.zeros(3, 2), 1)


def test_divprune_deterministic():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 144, 32, generator=g)
    assert torch.equal(divprune(x, 36), divprune(x.clone(), 36))
    out = divprune(x, 36)
    assert (out[:, 1:] > out[:, :-1]).all()


@pytest.mark.parametrize("a_bits", [16, 4])
def test_diversity_signal_matches_numpy_and_scores_repeats_zero(tiny_llava, a_bits):
    """Deployed.signals' diversity = 1 - max_{j<i} cos(f_i, f_j) over the visual rows (numpy,
    float64), f = the attention input's 4-bit integer codes (a_bits 4) or the normed input (16);
    2 for the first row, 0 for a row that repeats an earlier one (up to the last bit)."""
    import numpy as np

    from quota_export import models
    from quota_export.recipe import ActQuant, KVQuant, ResolvedQuant, WeightQuant
    from quota_export.reference import DeployConfig, Deployed

    quant = ResolvedQuant(weights=WeightQuant(bits=4), activations=ActQuant(bits=a_bits), kv_cache=KVQuant(bits=16))
    cfg = DeployConfig(quant=quant) if a_bits < 16 else DeployConfig()
    dep = Deployed(models.load(tiny_llava), cfg)
    torch.manual_seed(0)
    start, n, T, D = 2, 9, 14, dep.spec.hidden
    h = torch.randn(1, T, D)
    h[0, start + 5] = h[0, start + 2]  # a repeat of an earlier visual row
    h[0, start + 7] = 3.0 * h[0, start + 1]  # same direction, other magnitude
    pos = torch.arange(T)[None]
    _, _, _, div = dep.signals(1, h, pos, start, n)
    xq, xs = dep.qkv(1, h, pos).x
    f = xq[0, start : start + n].double().numpy()
    if a_bits < 16:
        assert xs is not None and (f == np.round(f)).all() and np.abs(f).max() <= 8
    u = f / np.linalg.norm(f, axis=1, keepdims=True)
    want = np.array([2.0] + [1.0 - max(u[i] @ u[j] for j in range(i)) for i in range(1, n)])
    assert div.shape == (1, n) and div.dtype == torch.float64
    np.testing.assert_allclose(div[0].numpy(), want, rtol=0, atol=1e-12)
    assert abs(float(div[0, 5])) < 1e-12 and abs(float(div[0, 7])) < 1e-12
    assert float(div[0, 0]) == 2.0 and float(div[0, 1:].min()) > -1e-12
