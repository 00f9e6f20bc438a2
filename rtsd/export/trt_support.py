"""What TensorRT 10's ONNX parser accepts, checked on the CPU before any engine is built.

The operator lists follow the support matrix of the ONNX-TensorRT parser (onnx-tensorrt ``docs/operators.md``) as
published for TensorRT 10.15, which parses opsets 9 to 24. Operators introduced by ONNX opsets 23/24 (Attention,
RotaryEmbedding, RMSNormalization, TensorScatter) only appear in recent TensorRT 10 releases, so graphs meant for any
TensorRT 10 must avoid them: ``SUPPORTED_ANY_TRT10`` is the set to check against. Only the restrictions that matter
for Stable Diffusion graphs (Resize modes, constant axes, LayerNormalization outputs, custom domains) are checked.

Takes an ``onnx.ModelProto`` but never imports onnx itself.
"""

from __future__ import annotations

TENSORRT_VERSION_OF_TABLE = "10.15"
OPSET_RANGE = (9, 24)

SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization BlackmanWindow
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression
NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

UNSUPPORTED = frozenset("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress
ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool
MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv
QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength
SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
""".split())

OPSET_23_PLUS = frozenset({"Attention", "RotaryEmbedding", "RMSNormalization", "TensorScatter"})
SUPPORTED_ANY_TRT10 = SUPPORTED - OPSET_23_PLUS

RESIZE_MODES = {"nearest", "linear"}
RESIZE_COORDINATE_MODES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
RESIZE_NEAREST_MODES = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
# Operators whose second input (axes) TensorRT needs as a build-time constant.
CONSTANT_AXES_OPS = {"Squeeze", "Unsqueeze", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                     "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare"}


def op_types(model) -> set[str]:
    """Every operator type in the graph, including If/Loop/Scan subgraphs."""
    return {node.op_type for node in _nodes(model.graph)}


def check_graph(model, supported: frozenset[str] = SUPPORTED_ANY_TRT10) -> list[str]:
    """Problems TensorRT's ONNX parser would report for ``model`` (empty list: none found)."""
    problems = []
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    opset = opsets.get("ai.onnx")
    if opset is not None and not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(f"opset {opset} is outside TensorRT 10's range {OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    used = {name for node in _nodes(graph) for name in node.input} | {out.name for out in graph.output}
    for node in _nodes(graph):
        where = f"{node.op_type} node {node.name or '(unnamed)'}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain '{node.domain}' needs a TensorRT plugin")
            continue
        if node.op_type not in supported:
            problems.append(f"{where}: not supported by TensorRT 10's ONNX parser")
            continue
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Resize":
            problems += _resize_problems(where, attrs)
        if node.op_type in CONSTANT_AXES_OPS and len(node.input) > 1 and node.input[1]:
            if node.input[1] not in constants:
                problems.append(f"{where}: axes input '{node.input[1]}' must be a constant for TensorRT")
        if node.op_type == "LayerNormalization" and any(out in used for out in node.output[1:] if out):
            problems.append(f"{where}: TensorRT supports only the first output (Y) of LayerNormalization")
    return problems


def _resize_problems(where: str, attrs) -> list[str]:
    def text(name: str, default: str) -> str:
        return attrs[name].s.decode() if name in attrs else default

    problems = []
    if text("mode", "nearest") not in RESIZE_MODES:
        problems.append(f"{where}: mode '{text('mode', 'nearest')}' (TensorRT: {sorted(RESIZE_MODES)})")
    if text("coordinate_transformation_mode", "half_pixel") not in RESIZE_COORDINATE_MODES:
        problems.append(f"{where}: coordinate_transformation_mode "
                        f"'{text('coordinate_transformation_mode', 'half_pixel')}' is not supported by TensorRT")
    if text("mode", "nearest") == "nearest" and text("nearest_mode", "round_prefer_floor") not in RESIZE_NEAREST_MODES:
        problems.append(f"{where}: nearest_mode '{text('nearest_mode', '')}' is not supported by TensorRT")
    if "antialias" in attrs and attrs["antialias"].i:
        problems.append(f"{where}: antialiased Resize is not supported by TensorRT")
    if text("keep_aspect_ratio_policy", "stretch") != "stretch":
        problems.append(f"{where}: keep_aspect_ratio_policy must be 'stretch' for TensorRT")
    return problems


def _nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g.node:
                yield from _nodes(attr.g)
            for sub in attr.graphs:
                yield from _nodes(sub)
