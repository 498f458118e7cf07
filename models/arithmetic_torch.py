"""The PyTorch frontend of the convolution arithmetic: an nn.Module -> a graph of layer specs.

torch.fx traces the module's forward, so branches and concatenations (GoogLeNet's inception
modules) keep their real wiring. Conv, pooling and linear layers become specs the formulas in
`models.arithmetic` evaluate; every other op is Opaque with the shape a real forward pass gave.
"""

from __future__ import annotations

import contextlib
import io
import operator

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from . import arithmetic as ar

_FLATTENS = {torch.flatten, "flatten", "view", "reshape"}
_CONCATS = {torch.cat, torch.concat, "cat"}


def _row_name(target: str) -> str:
    for prefix in ("features.", "classifier.", "avgpool"):
        if target.startswith(prefix) and target != prefix:
            return target[len(prefix) :] if prefix.endswith(".") else target
    return target


def _spec(module: nn.Module) -> ar.Spec | None:
    if isinstance(module, nn.Conv2d):
        if isinstance(module.padding, str):
            raise ValueError(f"padding={module.padding!r} is not supported; give it in pixels")
        return ar.Conv2d(
            module.in_channels,
            module.out_channels,
            ar.pair(module.kernel_size),
            ar.pair(module.stride),
            ar.pair(module.padding),
            ar.pair(module.dilation),
            module.groups,
            module.bias is not None,
        )
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        stride = module.stride if module.stride is not None else module.kernel_size
        dilation = getattr(module, "dilation", 1)
        return ar.Pool2d(
            "max" if isinstance(module, nn.MaxPool2d) else "avg",
            ar.pair(module.kernel_size),
            ar.pair(stride),
            ar.pair(module.padding),
            ar.pair(dilation),
            bool(module.ceil_mode),
        )
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return ar.AdaptiveAvgPool2d(ar.pair(module.output_size))
    if isinstance(module, nn.Linear):
        return ar.Linear(module.in_features, module.out_features, module.bias is not None)
    return None


def trace(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[list[ar.Node], dict[str, tuple[int, ...]]]:
    """(graph of specs, {row name: real output shape per image}) for `model` on (C, H, W) inputs."""
    model = model.eval()
    graph_module = fx.symbolic_trace(model)
    try:
        # ShapeProp prints the failing node's traceback itself; keep that off the user's terminal
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(graph_module).propagate(torch.zeros(1, *input_shape))
    except RuntimeError as exc:
        cause = exc.__cause__ or exc
        raise ValueError(str(cause).strip().splitlines()[0]) from None
    names: dict[fx.Node, str] = {}
    nodes: list[ar.Node] = []
    real_shapes: dict[str, tuple[int, ...]] = {}
    modules = dict(graph_module.named_modules())
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            names[node] = "input"
            continue
        if node.op in ("output", "get_attr"):
            continue
        meta = node.meta.get("tensor_meta")
        out_shape = tuple(meta.shape[1:]) if meta is not None and hasattr(meta, "shape") else None
        inputs = tuple(names[a] for a in node.all_input_nodes if a in names)
        if not inputs:
            continue
        spec: ar.Spec | None = None
        if node.op == "call_module":
            name = _row_name(node.target)
            spec = _spec(modules[node.target])
            if spec is None:
                params = sum(p.numel() for p in modules[node.target].parameters())
                spec = ar.Opaque(type(modules[node.target]).__name__, out_shape, params)
        else:
            name = node.name
            target = node.target
            if target in _CONCATS:
                dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
                if dim != 1:
                    raise ValueError(f"{name}: only channel concatenation is supported")
                spec = ar.Concat()
            elif target in _FLATTENS and out_shape is not None and len(out_shape) == 1:
                spec = ar.Flatten()
            elif target is operator.getitem:
                continue
            else:
                spec = ar.Opaque(str(getattr(target, "__name__", target)), out_shape)
        if out_shape is None:
            raise ValueError(f"{name}: produces no tensor the arithmetic can follow")
        names[node] = name
        nodes.append(ar.Node(name, spec, inputs))
        real_shapes[name] = out_shape
    return nodes, real_shapes


def analyze_module(model: nn.Module, input_shape: tuple[int, int, int]) -> ar.Table:
    """The arithmetic table of a PyTorch module for one (C, H, W) input shape."""
    nodes, _ = trace(model, input_shape)
    return ar.analyze(nodes, input_shape)
