"""Convolution arithmetic: output shapes, parameters, multiply-accumulates and receptive fields.

Pure Python on purpose: the serving half and the exporter both use it, and neither may pay for
torch or onnx at import time. Frontends that read a PyTorch module (`models.arithmetic_torch`) or an
ONNX file (`from_onnx` below, importing onnx lazily) turn a network into a small graph of the
layer specs defined here; `analyze` then walks that graph with the formulas alone.

Shapes are per image, without the batch dimension: (C, H, W) for feature maps, (F,) for vectors.
MACs are multiply-accumulates for one image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Union

Pair = tuple[int, int]


def pair(value: int | Sequence[int]) -> Pair:
    """(v, v) for an int; a 2-sequence as a tuple."""
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def conv_output_size(
    size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1, ceil_mode: bool = False
) -> int:
    """One spatial dimension after a convolution or pooling window.

    floor((W + 2P - D(K-1) - 1) / S) + 1, or ceil for pooling with ceil_mode; with ceil_mode a
    window that would start entirely inside the right padding is dropped, as PyTorch does.
    """
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    if ceil_mode:
        out = (span + stride - 1) // stride + 1
        if (out - 1) * stride >= size + padding:
            out -= 1
    else:
        out = span // stride + 1
    if out < 1:
        raise ValueError(
            f"kernel {kernel} (dilation {dilation}) does not fit an input of {size} with padding {padding}"
        )
    return out


# ---- layer specs: what a layer is, independent of any framework --------------------------------


@dataclass(frozen=True)
class Conv2d:
    in_channels: int
    out_channels: int
    kernel_size: Pair
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1
    bias: bool = True
    kind: str = field(default="conv", init=False)


@dataclass(frozen=True)
class Pool2d:
    mode: str  # "max" or "avg"
    kernel_size: Pair
    stride: Pair
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    ceil_mode: bool = False
    kind: str = field(default="pool", init=False)


@dataclass(frozen=True)
class AdaptiveAvgPool2d:
    output_size: Pair
    kind: str = field(default="pool", init=False)


@dataclass(frozen=True)
class Linear:
    in_features: int
    out_features: int
    bias: bool = True
    kind: str = field(default="fc", init=False)


@dataclass(frozen=True)
class Concat:
    """Channel concatenation of several inputs (an inception module's branches)."""

    kind: str = field(default="concat", init=False)


@dataclass(frozen=True)
class Flatten:
    kind: str = field(default="flatten", init=False)


@dataclass(frozen=True)
class Opaque:
    """A layer whose shape the frontend read off the framework (activation, norm, dropout ...).

    It holds no weights the arithmetic counts, and it keeps the receptive field of its input.
    `output_shape` None means: same as the input.
    """

    op: str
    output_shape: tuple[int, ...] | None = None
    params: int = 0
    kind: str = field(default="other", init=False)


Spec = Union[Conv2d, Pool2d, AdaptiveAvgPool2d, Linear, Concat, Flatten, Opaque]


@dataclass(frozen=True)
class Node:
    """One layer of a network graph: its name, its spec and the names of the nodes it reads.

    The input image is the node named "input".
    """

    name: str
    spec: Spec
    inputs: tuple[str, ...] = ("input",)


@dataclass
class LayerRow:
    name: str
    kind: str
    op: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int
    weights: int  # params without biases (the GoogLeNet paper counts these)
    macs: int
    activations: int  # elements of the output, per image
    receptive_field: tuple[int, int] | None
    jump: tuple[int, int] | None  # effective stride: input pixels between neighbouring outputs
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Table:
    input_shape: tuple[int, ...]
    layers: list[LayerRow]

    @property
    def total_params(self) -> int:
        return sum(row.params for row in self.layers)

    @property
    def total_macs(self) -> int:
        return sum(row.macs for row in self.layers)

    def share(self, kind: str) -> tuple[float, float]:
        """(fraction of parameters, fraction of MACs) held by layers of `kind` ("conv" or "fc")."""
        params = sum(r.params for r in self.layers if r.kind == kind)
        macs = sum(r.macs for r in self.layers if r.kind == kind)
        return (params / max(self.total_params, 1), macs / max(self.total_macs, 1))

    def to_dict(self) -> dict:
        conv_params, conv_macs = self.share("conv")
        fc_params, fc_macs = self.share("fc")
        return {
            "input_shape": list(self.input_shape),
            "layers": [row.to_dict() for row in self.layers],
            "total_params": self.total_params,
            "total_macs": self.total_macs,
            "share": {
                "conv": {"params": conv_params, "macs": conv_macs},
                "fc": {"params": fc_params, "macs": fc_macs},
            },
        }

    def row(self, name: str) -> LayerRow:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)


# ---- the walk ----------------------------------------------------------------------------------


def _describe(spec: Spec) -> str:
    if isinstance(spec, Conv2d):
        text = f"{spec.kernel_size[0]}x{spec.kernel_size[1]}/{spec.stride[0]}"
        if spec.padding != (0, 0):
            text += f" pad {spec.padding[0]}"
        if spec.dilation != (1, 1):
            text += f" dil {spec.dilation[0]}"
        if spec.groups != 1:
            text += f" groups {spec.groups}"
        return text
    if isinstance(spec, Pool2d):
        text = f"{spec.mode} {spec.kernel_size[0]}x{spec.kernel_size[1]}/{spec.stride[0]}"
        if spec.padding != (0, 0):
            text += f" pad {spec.padding[0]}"
        if spec.ceil_mode:
            text += " ceil"
        return text
    if isinstance(spec, AdaptiveAvgPool2d):
        return f"adaptive avg -> {spec.output_size[0]}x{spec.output_size[1]}"
    return ""


def layer_row(
    name: str, spec: Spec, input_shapes: Sequence[tuple[int, ...]], fields: Sequence[tuple[Pair, Pair] | None]
) -> tuple[LayerRow, tuple[Pair, Pair] | None]:
    """The row of one layer given its inputs' shapes and (receptive field, jump) pairs."""
    shape = tuple(input_shapes[0])
    rf_jump = fields[0]
    params = weights = macs = 0
    op = type(spec).__name__
    if isinstance(spec, Conv2d):
        channels, height, width = shape
        if channels != spec.in_channels:
            raise ValueError(f"{name}: expects {spec.in_channels} channels, gets {channels}")
        if spec.in_channels % spec.groups or spec.out_channels % spec.groups:
            raise ValueError(f"{name}: channels not divisible by groups={spec.groups}")
        kh, kw = spec.kernel_size
        out_h = conv_output_size(height, kh, spec.stride[0], spec.padding[0], spec.dilation[0])
        out_w = conv_output_size(width, kw, spec.stride[1], spec.padding[1], spec.dilation[1])
        out = (spec.out_channels, out_h, out_w)
        weights = spec.out_channels * (spec.in_channels // spec.groups) * kh * kw
        params = weights + (spec.out_channels if spec.bias else 0)
        macs = weights * out_h * out_w
        rf_jump = _grow_field(rf_jump, (kh, kw), spec.stride, spec.dilation)
    elif isinstance(spec, Pool2d):
        channels, height, width = shape
        kh, kw = spec.kernel_size
        out = (
            channels,
            conv_output_size(height, kh, spec.stride[0], spec.padding[0], spec.dilation[0], spec.ceil_mode),
            conv_output_size(width, kw, spec.stride[1], spec.padding[1], spec.dilation[1], spec.ceil_mode),
        )
        rf_jump = _grow_field(rf_jump, (kh, kw), spec.stride, spec.dilation)
        op = f"{spec.mode.capitalize()}Pool2d"
    elif isinstance(spec, AdaptiveAvgPool2d):
        channels, height, width = shape
        out = (channels, *spec.output_size)
        # Adaptive pooling's windows vary; where they are uniform, it is a plain pool.
        if height % spec.output_size[0] == 0 and width % spec.output_size[1] == 0:
            kernel = (height // spec.output_size[0], width // spec.output_size[1])
            rf_jump = _grow_field(rf_jump, kernel, kernel, (1, 1))
    elif isinstance(spec, Linear):
        features = math.prod(shape)
        if features != spec.in_features:
            raise ValueError(f"{name}: expects {spec.in_features} features, gets {features} {shape}")
        out = (spec.out_features,)
        weights = spec.in_features * spec.out_features
        params = weights + (spec.out_features if spec.bias else 0)
        macs = weights
        rf_jump = None
    elif isinstance(spec, Concat):
        rest = shape[1:]
        for other in input_shapes[1:]:
            if tuple(other[1:]) != rest:
                raise ValueError(f"{name}: cannot concatenate {shape} and {tuple(other)}")
        out = (sum(s[0] for s in input_shapes), *rest)
        known = [f for f in fields if f is not None]
        rf_jump = None if not known else ((max(f[0][0] for f in known), max(f[0][1] for f in known)), known[0][1])
    elif isinstance(spec, Flatten):
        out = (math.prod(shape),)
        rf_jump = None
    elif isinstance(spec, Opaque):
        out = tuple(spec.output_shape) if spec.output_shape is not None else shape
        params = spec.params
        op = spec.op
        if len(out) != 3:
            rf_jump = None
    else:  # pragma: no cover - the Spec union is closed
        raise TypeError(f"unknown layer spec {spec!r}")
    row = LayerRow(
        name=name,
        kind=spec.kind,
        op=op,
        input_shape=shape,
        output_shape=tuple(out),
        params=params,
        weights=weights,
        macs=macs,
        activations=math.prod(out),
        receptive_field=rf_jump[0] if rf_jump else None,
        jump=rf_jump[1] if rf_jump else None,
        detail=_describe(spec),
    )
    return row, rf_jump


def _grow_field(rf_jump, kernel: Pair, stride: Pair, dilation: Pair):
    """Receptive field r' = r + (k_eff - 1) * j and jump j' = j * s, per axis."""
    if rf_jump is None:
        return None
    (rh, rw), (jh, jw) = rf_jump
    keh = dilation[0] * (kernel[0] - 1) + 1
    kew = dilation[1] * (kernel[1] - 1) + 1
    return ((rh + (keh - 1) * jh, rw + (kew - 1) * jw), (jh * stride[0], jw * stride[1]))


def analyze(nodes: Sequence[Node], input_shape: Sequence[int]) -> Table:
    """Walk a network graph (nodes in execution order) from `input_shape` (C, H, W) with the formulas."""
    input_shape = tuple(int(d) for d in input_shape)
    shapes: dict[str, tuple[int, ...]] = {"input": input_shape}
    fields: dict[str, tuple[Pair, Pair] | None] = {"input": ((1, 1), (1, 1)) if len(input_shape) == 3 else None}
    rows = []
    for node in nodes:
        missing = [i for i in node.inputs if i not in shapes]
        if missing:
            raise ValueError(f"{node.name}: reads {missing}, which no earlier layer produced")
        row, rf_jump = layer_row(
            node.name, node.spec, [shapes[i] for i in node.inputs], [fields[i] for i in node.inputs]
        )
        shapes[node.name] = row.output_shape
        fields[node.name] = rf_jump
        rows.append(row)
    return Table(input_shape=input_shape, layers=rows)


def chain(named_specs: Sequence[tuple[str, Spec]]) -> list[Node]:
    """A sequential stack: each layer reads the one before it."""
    nodes, previous = [], "input"
    for name, spec in named_specs:
        nodes.append(Node(name, spec, (previous,)))
        previous = name
    return nodes


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """'3x224x224' -> (3, 224, 224); raises ValueError with a readable message."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) <= 0:
        raise ValueError(f"--input must look like CxHxW with positive integers (e.g. 3x224x224), not {text!r}")
    return dims  # type: ignore[return-value]


# ---- readable output ---------------------------------------------------------------------------


def _fmt_shape(shape) -> str:
    return "x".join(str(d) for d in shape)


def _human(count: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def format_table(table: Table, *, title: str = "", show_all: bool = False) -> str:
    """A fixed-width table: one line per conv, pool and fully connected layer (all with show_all)."""
    shown = [r for r in table.layers if show_all or r.kind in ("conv", "pool", "fc", "concat") or r.params]
    header = f"{'layer':<22} {'op':<16} {'output':>14} {'params':>12} {'MACs':>10} {'RF':>7} {'jump':>5}"
    lines = []
    if title:
        lines.append(title)
    lines.append(f"input {_fmt_shape(table.input_shape)}")
    lines.append(header)
    lines.append("-" * len(header))
    for r in shown:
        rf = f"{r.receptive_field[0]}" if r.receptive_field else "-"
        jump = f"{r.jump[0]}" if r.jump else "-"
        op = r.detail or r.op
        lines.append(
            f"{r.name:<22} {op[:16]:<16} {_fmt_shape(r.output_shape):>14} {r.params:>12,} "
            f"{_human(r.macs):>10} {rf:>7} {jump:>5}"
        )
    lines.append("-" * len(header))
    lines.append(f"{'total':<22} {'':<16} {'':>14} {table.total_params:>12,} {_human(table.total_macs):>10}")
    conv_p, conv_m = table.share("conv")
    fc_p, fc_m = table.share("fc")
    lines.append(f"conv layers: {conv_p:6.1%} of parameters, {conv_m:6.1%} of MACs")
    lines.append(f"fc layers:   {fc_p:6.1%} of parameters, {fc_m:6.1%} of MACs")
    return "\n".join(lines)


# ---- worked out: the formulas with the numbers put in ---------------------------------------------


def _size_step(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool = False) -> str:
    """One spatial dimension of conv_output_size, written out: floor((224 + 2·2 − 11)/4) + 1 = 55."""
    out = conv_output_size(size, kernel, stride, padding, dilation, ceil_mode)
    rounding = "ceil" if ceil_mode else "floor"
    span = (
        f"{size} + 2·{padding} − {kernel}" if dilation == 1 else f"{size} + 2·{padding} − {dilation}·({kernel}−1) − 1"
    )
    return f"{rounding}(({span})/{stride}) + 1 = {out}"


def _field_step(before: tuple[Pair, Pair] | None, kernel: Pair, stride: Pair, dilation: Pair) -> str:
    if before is None:
        return ""
    (r, _), (j, _) = before
    k = dilation[0] * (kernel[0] - 1) + 1
    return f"receptive field {r} + ({k} − 1)·{j} = {r + (k - 1) * j}; jump {j}·{stride[0]} = {j * stride[0]}"


def explain(nodes: Sequence[Node], input_shape: Sequence[int]) -> list[tuple[LayerRow, list[str]]]:
    """Each conv, pool and fully connected layer with its arithmetic worked out step by step (output
    size, parameters, MACs, receptive field and jump), from the same walk as `analyze`: the numbers
    equal the table's. Returns (row, lines) per layer explained."""
    input_shape = tuple(int(d) for d in input_shape)
    shapes: dict[str, tuple[int, ...]] = {"input": input_shape}
    fields: dict[str, tuple[Pair, Pair] | None] = {"input": ((1, 1), (1, 1)) if len(input_shape) == 3 else None}
    explained = []
    for node in nodes:
        ins = [shapes[i] for i in node.inputs]
        before = fields[node.inputs[0]]
        row, rf_jump = layer_row(node.name, node.spec, ins, [fields[i] for i in node.inputs])
        shapes[node.name], fields[node.name] = row.output_shape, rf_jump
        spec, lines = node.spec, []
        if isinstance(spec, (Conv2d, Pool2d)):
            c, h, w = ins[0]
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = spec.kernel_size, spec.stride, spec.padding, spec.dilation
            ceil_mode = getattr(spec, "ceil_mode", False)
            lines.append(f"height: {_size_step(h, kh, sh, ph, dh, ceil_mode)}")
            if (w, kw, sw, pw, dw) != (h, kh, sh, ph, dh):
                lines.append(f"width:  {_size_step(w, kw, sw, pw, dw, ceil_mode)}")
            if isinstance(spec, Conv2d):
                per_filter = spec.in_channels // spec.groups
                bias = f" + {spec.out_channels}" if spec.bias else ""
                lines.append(
                    f"parameters: {kh}·{kw}·{per_filter}·{spec.out_channels}{bias} = {row.params:,}"
                    + (
                        f" (groups {spec.groups}: {spec.in_channels}/{spec.groups} inputs per filter)"
                        if spec.groups > 1
                        else ""
                    )
                )
                _, oh, ow = row.output_shape
                lines.append(
                    f"MACs: {kh}·{kw}·{per_filter}·{spec.out_channels} weights × {oh}·{ow} positions = {row.macs:,}"
                )
            else:
                lines.append(f"channels: {c} in, {c} out (pooling has no parameters)")
            step = _field_step(before, spec.kernel_size, spec.stride, spec.dilation)
            if step:
                lines.append(step)
        elif isinstance(spec, Linear):
            bias = f" + {spec.out_features}" if spec.bias else ""
            lines.append(f"parameters: {spec.in_features}·{spec.out_features}{bias} = {row.params:,}")
            lines.append(f"MACs: {spec.in_features}·{spec.out_features} = {row.macs:,}")
        else:
            continue
        explained.append((row, lines))
    return explained


def format_explanation(explained: list[tuple[LayerRow, list[str]]], table: Table, *, title: str = "") -> str:
    out = [title] if title else []
    out.append(
        f"input {_fmt_shape(table.input_shape)}; output size floor((W + 2P − K)/S) + 1 (dilation D: K → D·(K−1) + 1)"
    )
    for row, lines in explained:
        out.append("")
        out.append(
            f"{row.name}  {row.detail or row.op}  {_fmt_shape(row.input_shape)} → {_fmt_shape(row.output_shape)}"
        )
        out.extend(f"  {line}" for line in lines)
    out.append("")
    terms = [f"{r.params:,}" for r, _ in explained if r.params]
    sum_text = " + ".join(terms) if len(terms) <= 12 else f"the {len(terms)} layers above"
    out.append(f"total parameters: {sum_text} = {table.total_params:,}")
    return "\n".join(out)


# ---- ONNX frontend -----------------------------------------------------------------------------


class NotOnnxError(ValueError):
    pass


# ONNX ops besides Conv and Gemm/MatMul whose initializers are learned parameters
_WEIGHTED_OPS = {"BatchNormalization", "InstanceNormalization", "LayerNormalization", "PRelu"}


def from_onnx(path: str) -> tuple[list[Node], tuple[int, ...]]:
    """Read an ONNX CNN into a graph of layer specs; returns (nodes, input shape C, H, W).

    Conv, Gemm / MatMul(+Add), MaxPool / AveragePool / GlobalAveragePool, Concat and Flatten /
    Reshape map to specs; every other op becomes Opaque with the shape ONNX shape inference gives.
    """
    import onnx  # lazy: the arithmetic itself needs no onnx
    from onnx import shape_inference

    try:
        model = onnx.load(path)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a file that is not ONNX
        raise NotOnnxError(f"{path} is not an ONNX model ({type(exc).__name__})") from None
    if not model.graph.node:
        raise NotOnnxError(f"{path} is not an ONNX model (no graph nodes)")
    model = shape_inference.infer_shapes(model)
    graph = model.graph
    initializers = {init.name: tuple(init.dims) for init in graph.initializer}
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = attr.t

    def static_shape(value_info) -> tuple[int, ...] | None:
        dims = value_info.type.tensor_type.shape.dim
        if not dims:
            return None
        values = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        # the first dimension is the batch; the rest must be known
        if any(v is None for v in values[1:]):
            return None
        return tuple(values[1:])

    value_shapes = {vi.name: static_shape(vi) for vi in list(graph.value_info) + list(graph.output) + list(graph.input)}
    real_inputs = [i for i in graph.input if i.name not in initializers]
    if len(real_inputs) != 1:
        raise NotOnnxError(f"{path}: expects one image input, found {[i.name for i in real_inputs]}")
    input_name = real_inputs[0].name
    input_shape = value_shapes.get(input_name)
    if not input_shape or len(input_shape) != 3:
        raise NotOnnxError(f"{path}: input {input_name!r} is not a static C x H x W image batch")

    def attrs(node) -> dict:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    produced = {input_name: "input"}  # tensor name -> node name in our graph
    nodes: list[Node] = []
    last_matmul: dict[str, int] = {}  # tensor -> index in nodes of the MatMul that produced it

    def source(tensor: str) -> str | None:
        return produced.get(tensor)

    for index, node in enumerate(graph.node):
        data_inputs = [t for t in node.input if t and t not in initializers and t not in constants]
        sources = [source(t) for t in data_inputs]
        if not data_inputs or any(s is None for s in sources):
            continue  # shape arithmetic on constants, not a layer of the network
        a = attrs(node)
        name = node.name or f"{node.op_type}_{index}"
        spec: Spec | None = None
        op = node.op_type
        if op == "Conv":
            w = initializers.get(node.input[1])
            if w is None:
                raise NotOnnxError(f"{path}: Conv {name} has no constant weight")
            kernel = tuple(a.get("kernel_shape", w[2:]))
            pads = a.get("pads", [0, 0, 0, 0])
            if pads[0] != pads[2] or pads[1] != pads[3]:
                raise NotOnnxError(f"{path}: Conv {name} has asymmetric padding {pads}")
            group = a.get("group", 1)
            spec = Conv2d(
                w[1] * group,
                w[0],
                pair(kernel),
                pair(a.get("strides", [1, 1])),
                (pads[0], pads[1]),
                pair(a.get("dilations", [1, 1])),
                group,
                bias=len(node.input) > 2 and bool(node.input[2]),
            )
        elif op in ("MaxPool", "AveragePool") and len(a.get("kernel_shape", ())) == 2:
            pads = a.get("pads", [0, 0, 0, 0])
            spec = Pool2d(
                "max" if op == "MaxPool" else "avg",
                pair(a["kernel_shape"]),
                pair(a.get("strides", [1, 1])),
                (pads[0], pads[1]),
                pair(a.get("dilations", [1, 1])),
                bool(a.get("ceil_mode", 0)),
            )
        elif op == "GlobalAveragePool":
            spec = AdaptiveAvgPool2d((1, 1))
        elif op == "Gemm":
            w = initializers.get(node.input[1])
            if w is None:
                raise NotOnnxError(f"{path}: Gemm {name} has no constant weight")
            out_f, in_f = (w[0], w[1]) if a.get("transB", 0) else (w[1], w[0])
            spec = Linear(in_f, out_f, bias=len(node.input) > 2 and bool(node.input[2]))
        elif op == "MatMul" and node.input[1] in initializers:
            w = initializers[node.input[1]]
            spec = Linear(w[0], w[1], bias=False)
            last_matmul[node.output[0]] = len(nodes)
        elif op == "Add" and node.input[0] in last_matmul and node.input[1] in initializers:
            # MatMul then Add(bias): one fully connected layer
            position = last_matmul[node.input[0]]
            fc = nodes[position]
            nodes[position] = Node(fc.name, Linear(fc.spec.in_features, fc.spec.out_features, bias=True), fc.inputs)
            produced[node.output[0]] = fc.name
            continue
        elif op == "Concat":
            spec = Concat()
        elif op in ("Flatten", "Reshape") and len(value_shapes.get(node.output[0]) or ()) == 1:
            spec = Flatten()
        else:
            out_shape = value_shapes.get(node.output[0])
            if out_shape is None:
                raise NotOnnxError(f"{path}: shape inference gives no shape for {op} {name}")
            # constants of other ops (pads, shapes, scales) are not learned weights
            params = (
                sum(math.prod(initializers[t]) for t in node.input if t in initializers) if op in _WEIGHTED_OPS else 0
            )
            spec = Opaque(op, out_shape, params)
        nodes.append(Node(name, spec, tuple(sources)))
        produced[node.output[0]] = name
    return nodes, input_shape
