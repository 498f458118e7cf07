"""The arithmetic's formulas against real PyTorch shapes and parameter counts."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from convserve.models import arithmetic as ar
from convserve.models.arithmetic_torch import analyze_module, trace
from convserve.models.zoo import get_model, list_models


def test_output_size_formula_examples():
    # the lecture's examples: 7x7 input, 3x3 kernel
    assert ar.conv_output_size(7, 3, stride=1) == 5
    assert ar.conv_output_size(7, 3, stride=2) == 3
    assert ar.conv_output_size(7, 3, stride=1, padding=1) == 7
    assert ar.conv_output_size(224, 11, stride=4, padding=2) == 55
    assert ar.conv_output_size(112, 3, stride=2, ceil_mode=True) == 56
    assert ar.conv_output_size(10, 3, dilation=2) == 6
    with pytest.raises(ValueError):
        ar.conv_output_size(2, 5)


def test_alexnet_has_61_100_840_parameters():
    table = analyze_module(get_model("alexnet"), (3, 224, 224))
    assert table.total_params == 61_100_840
    conv_params, conv_macs = table.share("conv")
    fc_params, fc_macs = table.share("fc")
    # the lecture's point: fc layers hold the parameters, conv layers the compute
    assert fc_params > 0.9 and conv_macs > 0.9


def test_alexnet_conv1_row_by_hand():
    row = analyze_module(get_model("alexnet"), (3, 224, 224)).row("conv1")
    assert row.output_shape == (64, 55, 55)
    assert row.params == 11 * 11 * 3 * 64 + 64
    assert row.macs == 11 * 11 * 3 * 64 * 55 * 55
    assert row.receptive_field == (11, 11) and row.jump == (4, 4)


ZOO_SHAPES = {
    "alexnet": [(3, 224, 224), (3, 256, 256), (1, 227, 227), (3, 300, 200)],
    "alexnet_small": [(3, 32, 32), (1, 32, 32), (3, 48, 48), (3, 64, 40)],
    "googlenet": [(3, 224, 224), (3, 160, 160), (1, 299, 299)],
}


@pytest.mark.parametrize("name", list_models())
def test_zoo_models_agree_with_pytorch_at_several_sizes(name):
    for shape in ZOO_SHAPES[name]:
        model = get_model(name, in_channels=shape[0], num_classes=7)
        nodes, real_shapes = trace(model, shape)
        table = ar.analyze(nodes, shape)
        for row in table.layers:
            assert row.output_shape == real_shapes[row.name], (name, shape, row.name)
        assert table.total_params == sum(p.numel() for p in model.parameters()), (name, shape)
        # every conv / fc row equals its own module's numel
        modules = dict(model.named_modules())
        for row in table.layers:
            if row.kind in ("conv", "fc"):
                for prefix in ("features.", "classifier.", ""):
                    if prefix + row.name in modules:
                        module = modules[prefix + row.name]
                        break
                assert row.params == sum(p.numel() for p in module.parameters()), row.name


def test_every_zoo_model_names_its_feature_taps():
    for name in list_models():
        model = get_model(name)
        children = dict(model.features.named_children())
        assert model.feature_taps and all(child in children for child in model.feature_taps.values())
    assert list(get_model("alexnet").feature_taps) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert {"conv1", "conv2", "inception3a", "inception5b"} <= set(get_model("googlenet").feature_taps)


def test_unknown_model_is_a_value_error():
    with pytest.raises(ValueError, match="unknown model"):
        get_model("resnet9000")


@st.composite
def conv_pool_stacks(draw):
    channels = first_channels = draw(st.integers(1, 6))
    size = (draw(st.integers(8, 40)), draw(st.integers(8, 40)))
    layers = []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.booleans()):
            groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0]))
            out = groups * draw(st.integers(1, 4))
            kernel = draw(st.integers(1, 5))
            layers.append(
                (
                    "conv",
                    dict(
                        in_channels=channels,
                        out_channels=out,
                        kernel_size=kernel,
                        stride=draw(st.integers(1, 3)),
                        padding=draw(st.integers(0, kernel // 2)),
                        dilation=draw(st.integers(1, 2)),
                        groups=groups,
                        bias=draw(st.booleans()),
                    ),
                )
            )
            channels = out
        else:
            kernel = draw(st.integers(1, 4))
            layers.append(
                (
                    draw(st.sampled_from(["max", "avg"])),
                    dict(
                        kernel_size=kernel,
                        stride=draw(st.integers(1, 3)),
                        padding=draw(st.integers(0, kernel // 2)),
                        ceil_mode=draw(st.booleans()),
                    ),
                )
            )
    return first_channels, size, layers


def _torch_layer(kind, kw):
    if kind == "conv":
        return nn.Conv2d(**kw)
    if kind == "max":
        return nn.MaxPool2d(**kw)
    return nn.AvgPool2d(**kw)


def _spec(kind, kw):
    if kind == "conv":
        return ar.Conv2d(
            kw["in_channels"],
            kw["out_channels"],
            ar.pair(kw["kernel_size"]),
            ar.pair(kw["stride"]),
            ar.pair(kw["padding"]),
            ar.pair(kw["dilation"]),
            kw["groups"],
            kw["bias"],
        )
    return ar.Pool2d(
        kind, ar.pair(kw["kernel_size"]), ar.pair(kw["stride"]), ar.pair(kw["padding"]), ceil_mode=kw["ceil_mode"]
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_pool_stacks())
def test_random_stacks_agree_with_pytorch(stack):
    """Pure formulas (no torch in the walk) against a real forward pass and numel."""
    channels, (height, width), layers = stack
    shape = (channels, height, width)
    nodes = ar.chain([(f"l{i}", _spec(kind, kw)) for i, (kind, kw) in enumerate(layers)])
    x = torch.zeros(1, *shape)
    try:
        real = []
        for kind, kw in layers:
            x = _torch_layer(kind, kw)(x)
            real.append(tuple(x.shape[1:]))
    except RuntimeError:
        # PyTorch refuses the stack (output too small): the arithmetic must refuse it too
        with pytest.raises(ValueError):
            table = ar.analyze(nodes, shape)
            if any(min(r.output_shape[1:]) < 1 for r in table.layers):
                raise ValueError("empty output") from None
        return
    table = ar.analyze(nodes, shape)
    assert [r.output_shape for r in table.layers] == real
    assert [r.params for r in table.layers] == [
        sum(p.numel() for p in _torch_layer(kind, kw).parameters()) for kind, kw in layers
    ]


def test_input_shape_parser():
    assert ar.parse_input_shape("3x224x224") == (3, 224, 224)
    for bad in ("3x224", "axbxc", "3x0x4", "", "3x224x224x1"):
        with pytest.raises(ValueError):
            ar.parse_input_shape(bad)
