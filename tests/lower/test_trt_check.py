"""trt_check: one tiny graph per TensorRT rule that must be rejected (naming the node), valid graphs pass."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from quota_export import UserError
from quota_export.lower.trt_check import TrtCheckError, check_model, check_or_raise
from quota_export.ops.gather import build_gather_subgraph, make_gather_model

F, I8, I4, U4, I64 = TensorProto.FLOAT, TensorProto.INT8, TensorProto.INT4, TensorProto.UINT4, TensorProto.INT64


def init(name, arr, dtype=None):
    arr = np.asarray(arr)
    if dtype in (I4, U4):  # 4-bit: onnx packs two values per byte
        return helper.make_tensor(name, dtype, list(arr.shape), arr.astype(np.int8).flatten().tolist())
    return numpy_helper.from_array(arr, name)


def model(nodes, inputs, outputs, inits=(), opset=21, domains=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    m = helper.make_model(g, opset_imports=opsets)
    m.ir_version = 10
    return m


def vi(name, dtype, shape=None):
    return helper.make_tensor_value_info(name, dtype, shape)


def rules(m):
    return [(v.node, v.rule) for v in check_model(m)]


def int4_weight_dq(name="/w/DequantizeLinear", k=128, n=16, block=64, axis=0, dtype=I4, scale_shape=None):
    """A blocked INT4 weight: W [k, n] int4 initializer, scale [k/block, n] blocked on axis 0."""
    w = init("W", np.random.default_rng(0).integers(-8, 8, (k, n)), dtype)
    s_shape = scale_shape or ((k // block, n) if axis == 0 else (k, n // block))
    s = init("W_scale", np.full(s_shape, 0.01, np.float32))
    node = helper.make_node("DequantizeLinear", ["W", "W_scale"], ["Wf"], name=name, axis=axis, block_size=block)
    return node, [w, s]


# ------------------------------------------------------------------------------------ valid graphs


def test_valid_quantized_graph_with_gather_and_plugin_passes():
    dq_w, inits = int4_weight_dq()
    nodes = [
        dq_w,
        # INT8 activation Q/DQ: constant scale, zero zero-point
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="/a/QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="/a/DequantizeLinear"),
        helper.make_node("MatMul", ["xd", "Wf"], ["y"], name="/a/MatMul"),
        helper.make_node("ReduceMean", ["y", "axes"], ["scores"], name="/a/ReduceMean", keepdims=0),
    ]
    inits += [init("x_scale", np.float32(0.05)), init("x_zp", np.int8(0)), init("axes", np.array([2], np.int64))]
    sub = build_gather_subgraph("/model/layers.0/prune", "y", "pos", "scores", k=8, start=2, n_visual=16)
    nodes += sub.nodes
    nodes.append(
        helper.make_node("TokenGather", [sub.hidden, sub.position_ids, "s2"], ["h2", "p2", "k2"],
                         name="/model/layers.1/prune/TokenGather", domain="quota", k=4, start=2, n_visual=8,
                         plugin_namespace="quota", aot=1)
    )  # fmt: skip
    m = model(
        nodes,
        [vi("x", F, [1, 20, 128]), vi("pos", I64, [1, 20]), vi("s2", F, [1, 8])],
        [vi("h2", F), vi("p2", I64), vi("k2", I64), vi(sub.kept, I64)],
        inits,
        domains=["quota"],
    )
    assert check_model(m) == []
    check_or_raise(m)


@pytest.mark.parametrize("plugin", [False, True])
def test_gather_models_pass(plugin):
    m = make_gather_model(hidden_size=64, n_visual=576, k=144, start=5, plugin=plugin)
    assert check_model(m) == []


def test_int4_through_constant_folded_quantize_passes():
    """Q(const float weight -> INT4, blocked) -> DQ is a weight path: constant, allowed."""
    w = init("Wf32", np.ones((128, 4), np.float32))
    s = init("s", np.full((2, 4), 0.1, np.float32))
    zp = init("zp", np.zeros((2, 4)), I4)
    nodes = [
        helper.make_node("QuantizeLinear", ["Wf32", "s", "zp"], ["Wq"], name="/w/Q", axis=0, block_size=64),
        helper.make_node("DequantizeLinear", ["Wq", "s", "zp"], ["Wd"], name="/w/DQ", axis=0, block_size=64),
    ]
    assert rules(model(nodes, [], [vi("Wd", F)], [w, s, zp])) == []


# ------------------------------------------------------------------------------------ one per rule


def test_int4_quantize_of_activation_rejected():
    s = init("s", np.full((1, 2), 0.1, np.float32))
    q = helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], name="/act/Q", axis=1, block_size=64, output_dtype=I4)
    m = model([q], [vi("x", F, [1, 128])], [vi("xq", I4)], [s])
    assert ("/act/Q", "int4-activation") in rules(m)


def test_int4_dequantize_of_graph_input_rejected():
    s = init("s", np.full((2, 4), 0.1, np.float32))
    dq = helper.make_node("DequantizeLinear", ["wq", "s"], ["w"], name="/w/DQ", axis=0, block_size=64)
    m = model([dq], [vi("wq", I4, [128, 4])], [vi("w", F)], [s])
    assert ("/w/DQ", "int4-activation") in rules(m)


def test_uint4_rejected():
    dq, inits = int4_weight_dq(dtype=U4)
    assert ("/w/DequantizeLinear", "uint4") in rules(model([dq], [], [vi("Wf", F)], inits))


def test_scale_not_constant_rejected():
    q = helper.make_node("QuantizeLinear", ["x", "x_scale"], ["xq"], name="/a/Q", output_dtype=I8)
    m = model([q], [vi("x", F, [2, 8]), vi("x_scale", F, [])], [vi("xq", I8)])
    assert rules(m) == [("/a/Q", "qdq-scale-not-constant")]


def test_nonzero_zero_point_rejected():
    dq = helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["x"], name="/a/DQ")
    m = model([dq], [vi("xq", I8, [2, 8])], [vi("x", F)], [init("s", np.float32(0.1)), init("zp", np.int8(3))])
    assert rules(m) == [("/a/DQ", "qdq-zero-point")]


def test_zero_point_from_graph_input_rejected():
    dq = helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["x"], name="/a/DQ")
    m = model([dq], [vi("xq", I8, [2, 8]), vi("zp", I8, [])], [vi("x", F)], [init("s", np.float32(0.1))])
    assert rules(m) == [("/a/DQ", "qdq-zero-point")]


def test_int4_odd_element_count_rejected():
    w = init("W", np.zeros((63, 1)), I4)
    s = init("s", np.full((1, 1), 0.1, np.float32))
    dq = helper.make_node("DequantizeLinear", ["W", "s"], ["Wf"], name="/w/DQ", axis=0, block_size=64)
    assert ("/w/DQ", "int4-odd-count") in rules(model([dq], [], [vi("Wf", F)], [w, s]))


@pytest.mark.parametrize(
    "kwargs, why",
    [
        (dict(block=32), "block_size 32"),
        (dict(block=64, scale_shape=(1, 16)), "scale shape"),
        (dict(k=96, block=64, scale_shape=(2, 16)), "not a multiple"),
    ],
)
def test_int4_block_rules_rejected(kwargs, why):
    dq, inits = int4_weight_dq(**kwargs)
    found = [v for v in check_model(model([dq], [], [vi("Wf", F)], inits)) if v.rule == "int4-block"]
    assert found and found[0].node == "/w/DequantizeLinear" and any(why in v.message for v in found)


def test_int4_block_axis_must_be_one_of_last_two():
    w = init("W", np.zeros((128, 2, 2)), I4)
    s = init("s", np.full((2, 2, 2), 0.1, np.float32))
    dq = helper.make_node("DequantizeLinear", ["W", "s"], ["Wf"], name="/w/DQ", axis=0, block_size=64)
    assert ("/w/DQ", "int4-block") in rules(model([dq], [], [vi("Wf", F)], [w, s]))


def test_int4_without_blocks_rejected():
    w = init("W", np.zeros((128, 4)), I4)
    dq = helper.make_node("DequantizeLinear", ["W", "s"], ["Wf"], name="/w/DQ", axis=1)
    m = model([dq], [], [vi("Wf", F)], [w, init("s", np.full((4,), 0.1, np.float32))])
    assert rules(m) == [("/w/DQ", "int4-block")]


def test_blocked_int8_rejected():
    w = init("W", np.zeros((128, 4), np.int8))
    s = init("s", np.full((2, 4), 0.1, np.float32))
    dq = helper.make_node("DequantizeLinear", ["W", "s"], ["Wf"], name="/w/DQ", axis=0, block_size=64)
    assert rules(model([dq], [], [vi("Wf", F)], [w, s])) == [("/w/DQ", "block-type")]


def topk_model(k_init=None, k_input=False, sorted_=1):
    node = helper.make_node("TopK", ["s", "k"], ["v", "i"], name="/p/TopK", axis=-1, largest=1, sorted=sorted_)
    inputs = [vi("s", F, [1, 5000])] + ([vi("k", I64, [1])] if k_input else [])
    inits = [] if k_input else [init("k", np.array([k_init], np.int64))]
    return model([node], inputs, [vi("v", F), vi("i", I64)], inits)


def test_topk_k_not_constant_rejected():
    assert rules(topk_model(k_input=True)) == [("/p/TopK", "topk-k-not-constant")]


def test_topk_k_too_large_rejected():
    assert rules(topk_model(3841)) == [("/p/TopK", "topk-k-too-large")]
    assert rules(topk_model(3840)) == []


def test_topk_unsorted_rejected():
    assert rules(topk_model(8, sorted_=0)) == [("/p/TopK", "topk-sorted")]


def test_unknown_custom_op_rejected():
    n = helper.make_node("MatMulNBits", ["x", "w"], ["y"], name="/a/MatMulNBits", domain="com.microsoft")
    m = model([n], [vi("x", F, [1, 8]), vi("w", TensorProto.UINT8, [8])], [vi("y", F)], domains=["com.microsoft"])
    assert rules(m) == [("/a/MatMulNBits", "unknown-domain")]
    n = helper.make_node("Gather", ["x", "w"], ["y"], name="/a/QuotaGather", domain="quota")
    m = model([n], [vi("x", F, [1, 8]), vi("w", I64, [8])], [vi("y", F)], domains=["quota"])
    assert rules(m) == [("/a/QuotaGather", "unknown-domain")]


@pytest.mark.parametrize(
    "attrs",
    [
        dict(k=4, start=0),
        dict(k=4, start=0, n_visual=8, extra=1),
        dict(k=9, start=0, n_visual=8),
        dict(k=4, start=0, n_visual=8.0),
        dict(k=4, start=0, n_visual=8, plugin_namespace="sample"),
        dict(k=4, start=0, n_visual=8, aot=0),
        dict(k=4, start=0, n_visual=8, plugin_namespace=None),
    ],
)
def test_plugin_attributes_checked(attrs):
    attrs = {"plugin_namespace": "quota", "aot": 1, **attrs}
    attrs = {a: v for a, v in attrs.items() if v is not None}
    n = helper.make_node(
        "TokenGather", ["h", "p", "s"], ["ho", "po", "ko"], name="/l/prune/TokenGather", domain="quota", **attrs
    )
    m = model(
        [n], [vi("h", F, [1, 10, 4]), vi("p", I64, [1, 10]), vi("s", F, [1, 8])],
        [vi("ho", F), vi("po", I64), vi("ko", I64)], domains=["quota"],
    )  # fmt: skip
    assert rules(m) == [("/l/prune/TokenGather", "plugin-attrs")]


def test_plugin_without_opset_import_and_bad_types_rejected():
    n = helper.make_node("TokenGather", ["h", "p", "s"], ["ho", "po", "ko"], name="/l/TG", domain="quota",
                         k=2, start=0, n_visual=8, plugin_namespace="quota", aot=1)  # fmt: skip
    m = model([n], [vi("h", F, [1, 10, 4]), vi("p", TensorProto.INT32, [1, 10]), vi("s", F, [1, 8])],
              [vi("ho", F), vi("po", I64), vi("ko", I64)])  # fmt: skip
    assert sorted(rules(m)) == [("/l/TG", "plugin-io"), ("/l/TG", "plugin-opset")]


def test_unsupported_ops_rejected():
    nodes = [
        helper.make_node("NonZero", ["x"], ["nz"], name="/a/NonZero"),  # TensorRT has it; not in our allow-list
        helper.make_node("Unique", ["x"], ["u"], name="/a/Unique"),  # documented unsupported
    ]
    vs = check_model(model(nodes, [vi("x", F, [8])], [vi("nz", I64), vi("u", F)]))
    assert [(v.node, v.rule) for v in vs] == [("/a/NonZero", "unsupported-op"), ("/a/Unique", "unsupported-op")]
    assert "allow-list" in vs[0].message and "unsupported in TensorRT" in vs[1].message


def test_axes_not_constant_rejected():
    n = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="/a/ReduceMean")
    m = model([n], [vi("x", F, [2, 8]), vi("axes", I64, [1])], [vi("y", F)])
    assert rules(m) == [("/a/ReduceMean", "axes-not-constant")]


def test_fp64_compute_rejected_but_cast_allowed():
    nodes = [
        helper.make_node("Cast", ["x"], ["xd"], name="/a/Cast", to=TensorProto.DOUBLE),
        helper.make_node("Mul", ["xd", "xd"], ["sq"], name="/a/Mul"),
        helper.make_node("Cast", ["sq"], ["y"], name="/a/Cast_1", to=F),
    ]
    vs = check_model(model(nodes, [vi("x", F, [2, 8])], [vi("y", F)]))
    assert [(v.node, v.rule) for v in vs] == [("/a/Mul", "fp64")]


def test_opset_outside_range_rejected():
    n = helper.make_node("Relu", ["x"], ["y"], name="/a/Relu")
    assert rules(model([n], [vi("x", F, [2])], [vi("y", F)], opset=25)) == [("<model>", "opset")]


def test_check_or_raise_lists_every_violation():
    q = helper.make_node("QuantizeLinear", ["x", "x_scale"], ["xq"], name="/a/Q", output_dtype=I8)
    t = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="/p/TopK", axis=-1)
    inputs = [vi("x", F, [2, 8]), vi("x_scale", F, []), vi("k", I64, [1])]
    m = model([q, t], inputs, [vi("xq", I8), vi("v", F), vi("i", I64)])
    with pytest.raises(TrtCheckError) as e:
        check_or_raise(m)
    assert isinstance(e.value, UserError) and len(e.value.violations) == 2
    assert "/a/Q" in str(e.value) and "/p/TopK" in str(e.value)


def test_subgraph_nodes_checked():
    body = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["u"], name="/if/then/Unique")], "then", [], [vi("u", F)]
    )
    identity = helper.make_node("Identity", ["x"], ["u2"], name="/if/else/Identity")
    els = helper.make_graph([identity], "else", [], [vi("u2", F)])
    n = helper.make_node("If", ["c"], ["y"], name="/if/If", then_branch=body, else_branch=els)
    m = model([n], [vi("c", TensorProto.BOOL, []), vi("x", F, [4])], [vi("y", F)])
    assert ("/if/then/Unique", "unsupported-op") in rules(m)
