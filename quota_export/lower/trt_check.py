"""Static check of an ONNX model against TensorRT's documented operator rules (no TensorRT needed).

    violations = check_model(model)   # [] when the graph is acceptable
    check_or_raise(model)             # TrtCheckError listing every violation

The rules, each with the document it comes from (TensorRT 10.x):
- operators.md of onnx-tensorrt ("Supported ONNX Operators", TensorRT 10.15): default-domain opsets
  9..24; QuantizeLinear `y_zero_point` / DequantizeLinear `x_zero_point` must be zero; DequantizeLinear
  types INT8, FP8, FP4, INT4 (no UINT4); TopK `sorted` must be 1 and "K input must be less than
  3840" (the TopK layer reference: k <= 3840; we reject k > 3840); Reduce* `axes` must be an
  initializer, Squeeze/Unsqueeze `axes` resolvable to a constant; LayerNormalization: only output Y.
  Older releases of the same page: "TopK: K input must be an initializer".
- "Working with Quantized Types" / Quantize, Dequantize layer references: the scale must be a
  build-time constant; INT4 is signed and weight-only; INT4 needs per-block scales, block sizes
  {64, 128}, the block axis one of the last two dimensions; block quantization only for INT4 (and
  FP4); the scale has the rank of the input.
- Data types: no op lists DOUBLE among its types in operators.md (the parser only casts FP64
  weights down), so any non-Cast node with an FP64 output is rejected.
- Project rules on top: a 4-bit initializer must have an even element count (ONNX packs two per
  byte; TensorRT's blocked weights are multiples of 64 anyway); custom ops only `quota::TokenGather`
  with its attributes, including `plugin_namespace="quota"` and `aot=1`, which TensorRT's ONNX
  parser needs to map the node to the Python (QDP) plugin and its AOT implementation (TensorRT
  samples/python/quickly_deployable_plugins); default-domain ops only from ALLOWED_OPS, the
  standard ops this project's graphs use, each listed as supported ("Y") in operators.md.

"Constant" below means a build-time constant: an initializer that is not also a graph input, a
Constant node's output, or the output of a node whose inputs are all constant (TensorRT folds them).
Where a value must be read (TopK K, zero points) it must be an initializer or a Constant node.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from quota_export import UserError

OPSET_RANGE = (9, 24)
TOPK_MAX_K = 3840
INT4_BLOCK_SIZES = (64, 128)
PLUGIN_DOMAIN, PLUGIN_OP = "quota", "TokenGather"
PLUGIN_MAX_N_VISUAL = 4096  # plugins/quotaTokenGather: all N scores of a row in one program
DEFAULT_DOMAINS = ("", "ai.onnx")

# Standard ops the project's graphs are built from; each is "Y" in onnx-tensorrt's operators.md.
# Adding one: check its row (and restrictions) there first.
ALLOWED_OPS = frozenset(
    """
    Abs Add And ArgMax Cast CastLike Ceil Clip Concat Constant ConstantOfShape Conv Cos CumSum
    DequantizeLinear Div Einsum Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND
    Gelu Gemm Greater GreaterOrEqual Identity IsNaN LayerNormalization Less LessOrEqual Log MatMul
    Max Min Mod Mul Neg Not Or Pad Pow QuantizeLinear Range Reciprocal ReduceL2 ReduceMax ReduceMean
    ReduceMin ReduceSum ReduceSumSquare Relu Reshape RMSNormalization Round ScatterElements ScatterND
    Shape Sigmoid Sign Sin Size Slice Softmax Split Sqrt Squeeze Sub Tanh Tile TopK Transpose Trilu
    Unsqueeze Where
    """.split()
)
# Listed as not supported ("N") in operators.md: named as such in the violation.
TRT_UNSUPPORTED_OPS = frozenset(
    """
    AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor CenterCropPad Col2Im
    Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger
    MaxRoiPool MaxUnpool Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement
    OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct
    SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss
    SplitToSequence StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
    """.split()
)
_NOT_FOLDABLE = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial"})
_FOUR_BIT = (TensorProto.INT4, TensorProto.UINT4)
_BLOCKABLE = (TensorProto.INT4, TensorProto.FLOAT4E2M1)
# ops whose `axes` is an input (ReduceSum, Squeeze, Unsqueeze since opset 13, the other Reduce* since 18)
_AXES_INPUT_OPS = frozenset(
    "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum "
    "ReduceSumSquare Squeeze Unsqueeze".split()
)
_TYPE_NAME = {v: k for k, v in TensorProto.DataType.items()}


@dataclass(frozen=True)
class Violation:
    node: str  # node name (or "<model>" for model-level rules)
    op_type: str
    rule: str  # short id, e.g. "int4-activation"
    message: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}): [{self.rule}] {self.message}"


class TrtCheckError(UserError):
    def __init__(self, violations: list[Violation]):
        self.violations = violations
        lines = "\n  ".join(str(v) for v in violations)
        super().__init__(f"the model breaks {len(violations)} TensorRT rule(s):\n  {lines}")


ModelLike = onnx.ModelProto | str | Path


def check_or_raise(model: ModelLike, *, allowed_ops: frozenset[str] = ALLOWED_OPS) -> None:
    """Raise TrtCheckError (a UserError) listing every violation, if there is any."""
    violations = check_model(model, allowed_ops=allowed_ops)
    if violations:
        raise TrtCheckError(violations)


def check_model(model: ModelLike, *, allowed_ops: frozenset[str] = ALLOWED_OPS) -> list[Violation]:
    """Every violation of the rules above, in graph order (subgraphs of If/Loop/Scan included)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    out: list[Violation] = []
    opsets = {o.domain: o.version for o in model.opset_import}
    default = opsets.get("", opsets.get("ai.onnx"))
    if default is not None and not OPSET_RANGE[0] <= default <= OPSET_RANGE[1]:
        msg = f"default-domain opset {default} outside TensorRT's supported {OPSET_RANGE}"
        out.append(Violation("<model>", "-", "opset", msg))
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception:  # best effort: the types then come from what the model declares
        inferred = model.graph
    types = _tensor_types(inferred) | _tensor_types(model.graph)
    _Checker(out, types, opsets, allowed_ops).graph(model.graph, consts={}, folded=frozenset())
    return out


def _tensor_types(graph: onnx.GraphProto) -> dict[str, tuple[int, tuple | None]]:
    """name -> (elem_type, shape with None for unknown dims, or None) for typed tensors, subgraphs included."""
    types: dict[str, tuple[int, tuple | None]] = {}
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        tt = vi.type.tensor_type
        if tt.elem_type:
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
            types[vi.name] = (tt.elem_type, dims if tt.HasField("shape") else None)
    for init in graph.initializer:
        types[init.name] = (init.data_type, tuple(init.dims))
    for node in graph.node:
        for g in _subgraphs(node):
            types.update(_tensor_types(g))
    return types


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _opt_input(node: onnx.NodeProto, i: int) -> str | None:
    return node.input[i] if len(node.input) > i and node.input[i] else None


class _Checker:
    def __init__(self, out: list[Violation], types, opsets: dict[str, int], allowed_ops: frozenset[str]):
        self.out, self.types, self.opsets, self.allowed = out, types, opsets, allowed_ops

    def flag(self, name: str, node: onnx.NodeProto, rule: str, message: str) -> None:
        self.out.append(Violation(name, node.op_type, rule, message))

    def dtype(self, tensor: str) -> int:
        return self.types.get(tensor, (0, None))[0]

    def graph(self, graph: onnx.GraphProto, consts: dict[str, onnx.TensorProto], folded: frozenset[str]) -> None:
        """consts: tensors whose value is readable (initializers, Constant outputs); folded: build-time constants."""
        inputs = {i.name for i in graph.input}  # a subgraph's inputs shadow outer names
        consts = {n: t for n, t in consts.items() if n not in inputs}
        consts.update({t.name: t for t in graph.initializer if t.name not in inputs})
        folded = (set(folded) - inputs) | set(consts)
        for i, node in enumerate(graph.node):
            self.node(node.name or f"<unnamed {node.op_type} #{i}>", node, consts, folded)
            if node.domain in DEFAULT_DOMAINS:
                if node.op_type == "Constant":
                    value = _constant_value(node)
                    if value is not None:
                        consts[node.output[0]] = value
                    folded.update(node.output)
                elif node.op_type == "Identity" and node.input[0] in consts:
                    consts[node.output[0]] = consts[node.input[0]]
                    folded.add(node.output[0])
                elif node.op_type not in _NOT_FOLDABLE and node.input and all(x in folded for x in node.input if x):
                    folded.update(o for o in node.output if o)
            for g in _subgraphs(node):
                self.graph(g, consts, frozenset(folded))

    # ---------------------------------------------------------------------------------- per node

    def node(self, name: str, node: onnx.NodeProto, consts, folded) -> None:
        if node.domain not in DEFAULT_DOMAINS:
            if (node.domain, node.op_type) == (PLUGIN_DOMAIN, PLUGIN_OP):
                self.plugin(name, node)
            else:
                known = f"{PLUGIN_DOMAIN}::{PLUGIN_OP}"
                msg = f"custom op {node.domain}::{node.op_type}: only {known} is known"
                self.flag(name, node, "unknown-domain", msg)
            return
        op = node.op_type
        if op != "Cast" and any(self.dtype(o) == TensorProto.DOUBLE for o in node.output if o):
            msg = f"{op} computes in FP64: TensorRT has no FP64 (operators.md lists no DOUBLE type; lower with fp32 reductions)"
            self.flag(name, node, "fp64", msg)
        if op not in self.allowed:
            if op in TRT_UNSUPPORTED_OPS:
                why = "listed as unsupported in TensorRT's operators.md"
            else:
                why = "not in the project's allow-list of TensorRT-supported ops (trt_check.ALLOWED_OPS)"
            self.flag(name, node, "unsupported-op", f"{op}: {why}")
        elif op in ("QuantizeLinear", "DequantizeLinear"):
            self.qdq(name, node, consts, folded)
        elif op == "TopK":
            self.topk(name, node, consts)
        elif op in _AXES_INPUT_OPS:
            axes = _opt_input(node, 1)
            if axes is not None and axes not in folded:
                self.flag(name, node, "axes-not-constant", f"{op} `axes` input {axes!r} is not a build-time constant")
        elif op == "LayerNormalization" and any(node.output[1:]):
            self.flag(name, node, "layernorm-outputs", "TensorRT supports only output Y of LayerNormalization")

    def qdq(self, name: str, node: onnx.NodeProto, consts, folded) -> None:
        op, x, scale, zp = node.op_type, node.input[0], node.input[1], _opt_input(node, 2)
        if scale not in folded:
            self.flag(name, node, "qdq-scale-not-constant", f"{op} scale {scale!r} is not a build-time constant")
        if zp is not None and zp not in consts:
            self.flag(name, node, "qdq-zero-point", f"{op} zero point {zp!r} is not an initializer/Constant of zeros")
        elif zp is not None and np.any(_to_array(consts[zp]) != 0):
            self.flag(name, node, "qdq-zero-point", f"{op} zero point {zp!r} is not zero (TensorRT is symmetric)")
        if op == "QuantizeLinear":
            qtype = self.quantized_type(node, consts)
            if qtype == TensorProto.UINT4:
                self.flag(name, node, "uint4", "QuantizeLinear to UINT4: TensorRT has INT4 only (signed)")
            elif qtype == TensorProto.UINT8 and (zp is not None or _attr(node, "output_dtype", 0)):
                msg = "QuantizeLinear to UINT8: TensorRT quantizes to INT8 (UINT8 only as network I/O)"
                self.flag(name, node, "qdq-type", msg)
            elif qtype == TensorProto.INT4 and x not in folded:
                msg = f"QuantizeLinear to INT4 of non-constant {x!r}: INT4 is weight-only in TensorRT"
                self.flag(name, node, "int4-activation", msg)
        else:
            qtype = self.dtype(x)
            if qtype == TensorProto.UINT4:
                self.flag(name, node, "uint4", f"DequantizeLinear of UINT4 {x!r}: TensorRT has INT4 only (signed)")
            elif qtype == TensorProto.INT4 and x not in folded:
                msg = f"DequantizeLinear of non-constant INT4 {x!r}: INT4 is weight-only (constants) in TensorRT"
                self.flag(name, node, "int4-activation", msg)
            if qtype in _FOUR_BIT and x in consts and int(np.prod(consts[x].dims, dtype=np.int64)) % 2:
                msg = f"4-bit initializer {x!r} has an odd element count, shape {tuple(consts[x].dims)}"
                self.flag(name, node, "int4-odd-count", msg)
        self.blocks(name, node, qtype)

    def quantized_type(self, node: onnx.NodeProto, consts) -> int:
        """QuantizeLinear's output type: inferred, else output_dtype, else the zero point's, else UINT8 (ONNX)."""
        if self.dtype(node.output[0]):
            return self.dtype(node.output[0])
        if _attr(node, "output_dtype", 0):
            return _attr(node, "output_dtype")
        zp = _opt_input(node, 2)
        if zp is not None:
            return self.dtype(zp) or (consts[zp].data_type if zp in consts else 0)
        return TensorProto.UINT8

    def blocks(self, name: str, node: onnx.NodeProto, qtype: int) -> None:
        block = int(_attr(node, "block_size", 0) or 0)
        if block == 0:
            if qtype == TensorProto.INT4 and node.op_type == "DequantizeLinear":
                msg = f"INT4 needs per-block scales in TensorRT (block_size in {INT4_BLOCK_SIZES}), got none"
                self.flag(name, node, "int4-block", msg)
            return
        if qtype not in _BLOCKABLE:
            msg = f"block quantization (block_size={block}) of {_TYPE_NAME.get(qtype, qtype)}: TensorRT blocks INT4/FP4"
            self.flag(name, node, "block-type", msg)
            return
        if qtype == TensorProto.INT4 and block not in INT4_BLOCK_SIZES:
            msg = f"INT4 block_size {block} not in TensorRT's supported {INT4_BLOCK_SIZES}"
            self.flag(name, node, "int4-block", msg)
        x_shape, s_shape = self.types.get(node.input[0], (0, None))[1], self.types.get(node.input[1], (0, None))[1]
        if x_shape is None:
            return
        rank = len(x_shape)
        axis = int(_attr(node, "axis", 1))
        axis = axis + rank if axis < 0 else axis
        if axis not in (rank - 2, rank - 1):
            msg = f"block axis {axis} of a rank-{rank} tensor: must be one of the last two"
            self.flag(name, node, "int4-block", msg)
            return
        if x_shape[axis] is not None and x_shape[axis] % block:
            msg = f"blocked dim {x_shape[axis]} (axis {axis}) is not a multiple of block_size {block}"
            self.flag(name, node, "int4-block", msg)
        if s_shape is not None:
            want = tuple(-(-d // block) if i == axis and d is not None else d for i, d in enumerate(x_shape))
            if len(s_shape) != rank or any(a is not None and b is not None and a != b for a, b in zip(s_shape, want)):
                msg = f"scale shape {s_shape} does not match input {x_shape} blocked by {block} on axis {axis}"
                self.flag(name, node, "int4-block", msg)

    def topk(self, name: str, node: onnx.NodeProto, consts) -> None:
        k_name = _opt_input(node, 1)
        if k_name not in consts:
            self.flag(name, node, "topk-k-not-constant", f"TopK K {k_name!r} is not an initializer/Constant")
        else:
            k = int(np.asarray(_to_array(consts[k_name])).reshape(-1)[0])
            if k > TOPK_MAX_K:
                msg = f"TopK K={k} > {TOPK_MAX_K}, TensorRT's limit (the {PLUGIN_DOMAIN}::{PLUGIN_OP} plugin has none)"
                self.flag(name, node, "topk-k-too-large", msg)
        if int(_attr(node, "sorted", 1)) != 1:
            self.flag(name, node, "topk-sorted", "TopK sorted=0: TensorRT requires sorted=1")

    def plugin(self, name: str, node: onnx.NodeProto) -> None:
        if PLUGIN_DOMAIN not in self.opsets:
            self.flag(name, node, "plugin-opset", f"the model does not import the {PLUGIN_DOMAIN!r} opset domain")
        attrs = {a.name: a for a in node.attribute}
        ints, strs = ("k", "start", "n_visual", "aot"), ("plugin_namespace",)
        missing = [a for a in ints + strs if a not in attrs]
        wrong = [a for a in ints if a in attrs and attrs[a].type != onnx.AttributeProto.INT]
        wrong += [a for a in strs if a in attrs and attrs[a].type != onnx.AttributeProto.STRING]
        unknown = sorted(set(attrs) - set(ints + strs) - {"plugin_version"})
        if missing or wrong or unknown:
            msg = f"{PLUGIN_OP} attributes: missing {missing}, wrong type {wrong}, unknown {unknown}"
            self.flag(name, node, "plugin-attrs", msg)
        else:
            k, start, n, aot = (attrs[a].i for a in ints)
            ns = attrs["plugin_namespace"].s.decode()
            if not (1 <= k <= n <= PLUGIN_MAX_N_VISUAL and start >= 0):
                msg = f"{PLUGIN_OP} needs 1 <= k <= n_visual <= {PLUGIN_MAX_N_VISUAL}, start >= 0"
                self.flag(name, node, "plugin-attrs", f"{msg}; got k={k} n_visual={n} start={start}")
            if ns != PLUGIN_DOMAIN or aot != 1:
                msg = (
                    f"{PLUGIN_OP} needs plugin_namespace={PLUGIN_DOMAIN!r} (how TensorRT's parser finds it) and "
                    f"aot=1 (it has only an AOT implementation), got {ns!r}, {aot}"
                )
                self.flag(name, node, "plugin-attrs", msg)
        if len(node.input) != 3 or len(node.output) != 3:
            msg = f"{PLUGIN_OP} takes 3 inputs and 3 outputs, got {len(node.input)} / {len(node.output)}"
            self.flag(name, node, "plugin-io", msg)
            return
        want = ((TensorProto.FLOAT, TensorProto.FLOAT16), (TensorProto.INT64,), (TensorProto.FLOAT,))
        for tensor, ok in zip(node.input, want):
            t = self.dtype(tensor)
            if t and t not in ok:
                msg = f"{PLUGIN_OP} input {tensor!r} is {_TYPE_NAME.get(t, t)}, expected {[_TYPE_NAME[o] for o in ok]}"
                self.flag(name, node, "plugin-io", msg)


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name in ("value_int", "value_ints", "value_float", "value_floats"):
            v = onnx.helper.get_attribute_value(a)
            return numpy_helper.from_array(np.asarray(v, dtype=np.int64 if "int" in a.name else np.float32))
    return None


def _to_array(t: onnx.TensorProto) -> np.ndarray:
    arr = numpy_helper.to_array(t)
    if arr.dtype.kind not in "iufb":  # ml_dtypes int4 / float8 ...: compare through float32
        arr = arr.astype(np.float32)
    return arr
