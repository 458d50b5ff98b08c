"""Tests of the model zoo: every registered model builds, runs and follows the zoo's rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunescope.errors import ConfigError, UnknownNameError
from prunescope.models import MODELS, build, names

NAMES = names()
# Modules that connectivity analysis swaps; they must be submodules, called in forward.
SWAPPABLE = (nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm2d)
FUNCTIONALS = ("relu", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "batch_norm")


def small_image(name: str) -> int | None:
    """The default image size, or 32 for the ImageNet models (224 is slow on CPU)."""
    return 32 if MODELS.get(name).image_size > 32 else None


def forward(model: nn.Module, batch: int = 2) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, *model.input_shape))


def count(model: nn.Module, suffix: str = "") -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith(suffix))


def test_names_cover_the_zoo() -> None:
    expected = {"lenet300", "lenet5", "conv2", "conv4", "conv6", "vgg11", "vgg16",
                "resnet20", "resnet32", "resnet56", "resnet18", "resnet50"}
    assert set(NAMES) == expected
    assert sorted(NAMES) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_builds_with_defaults_and_runs(name: str) -> None:
    spec = MODELS.get(name)
    model = build(name, image_size=small_image(name))
    size = small_image(name) or spec.image_size
    assert model.input_shape == (spec.in_channels, size, size)
    assert model.model_name == name
    assert forward(model).shape == (2, 10)


@pytest.mark.parametrize("name", NAMES)
def test_builds_with_three_classes_and_one_channel(name: str) -> None:
    model = build(name, num_classes=3, in_channels=1, image_size=small_image(name))
    assert model.input_shape[0] == 1
    assert forward(model).shape == (2, 3)


@pytest.mark.parametrize("name", NAMES)
def test_smallest_image_size_works_and_one_less_is_refused(name: str) -> None:
    least = MODELS.get(name).min_image_size
    assert forward(build(name, image_size=least), batch=1).shape == (1, 10)
    if least > 1:
        with pytest.raises(ConfigError, match=f"image_size {least - 1} is too small for {name}"):
            build(name, image_size=least - 1)


def test_lenet300_mnist_counts() -> None:
    model = build("lenet300")
    # 784*300 + 300*100 + 100*10 weights; 300 + 100 + 10 biases.
    assert count(model, "weight") == 266_200
    assert count(model, "bias") == 410


def test_conv2_conv4_conv6_weight_counts() -> None:
    # Conv-2: convs 3*64*9 + 64*64*9 = 38,592; FC 16384*256 + 256*256 + 256*10 (paper: 4.3M).
    assert count(build("conv2"), "weight") == 4_300_992
    # Conv-4: convs + 64*128*9 + 128*128*9 = 259,776; FC 8192*256 + 65,536 + 2,560 (paper: 2.4M).
    assert count(build("conv4"), "weight") == 2_425_024
    # Conv-6: convs + 128*256*9 + 256*256*9 = 1,144,512; FC 4096*256 + 65,536 + 2,560.
    assert count(build("conv6"), "weight") == 2_261_184


def test_imagenet_resnet_counts_match_torchvision() -> None:
    assert count(build("resnet18", num_classes=1000)) == 11_689_512
    assert count(build("resnet50", num_classes=1000)) == 25_557_032


def test_resnet20_count_with_option_b_projections() -> None:
    # stem: conv 3*16*9 = 432 + BN 32                                        =     464
    # stage 1: 3 blocks x (2 convs 16*16*9 + 2 BN 2*16)                       =  14,016
    # stage 2: first 16*32*9 + 32*32*9 + 1x1 16*32 + 3 BN 3*64 = 14,528;
    #          two more x (2*32*32*9 + 2*64) = 37,120                         =  51,648
    # stage 3: first 32*64*9 + 64*64*9 + 1x1 32*64 + 3 BN 3*128 = 57,728;
    #          two more x (2*64*64*9 + 2*128) = 147,968                       = 205,696
    # fc: 64*10 + 10                                                          =     650
    assert count(build("resnet20")) == 464 + 14_016 + 51_648 + 205_696 + 650 == 272_474


@pytest.mark.parametrize("name", NAMES)
def test_relus_are_not_inplace_and_layers_exist(name: str) -> None:
    model = build(name, image_size=small_image(name))
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and all(not m.inplace for m in relus)
    assert any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())


@pytest.mark.parametrize("name", NAMES)
def test_functionals_only_run_inside_swappable_modules(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F.relu & co. may only run inside an nn.ReLU/... submodule, and each such module runs."""
    depth, calls = [0], {}

    def guarded(function):
        def call(*args, **kwargs):
            assert depth[0] > 0, f"{name} calls F.{function.__name__} outside a module"
            return function(*args, **kwargs)
        return call

    for functional in FUNCTIONALS:
        monkeypatch.setattr(F, functional, guarded(getattr(F, functional)))
    def enter(module: nn.Module, inputs: tuple) -> None:
        depth[0] += 1

    def leave(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        depth[0] -= 1
        calls[id(module)] += 1

    model = build(name, image_size=small_image(name))
    for module in model.modules():
        if isinstance(module, SWAPPABLE):
            calls[id(module)] = 0
            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave)
    forward(model)
    assert calls and all(calls.values())


@pytest.mark.parametrize("name", NAMES)
def test_bias_rules(name: str) -> None:
    model = build(name, image_size=small_image(name))
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert module.bias is not None
        if isinstance(module, nn.Conv2d):
            assert (module.bias is None) == has_bn


def test_initialisation() -> None:
    torch.manual_seed(0)
    model = build("vgg16")
    conv = model.features[0]  # 3 -> 64, 3x3: Kaiming fan_out std = sqrt(2 / (64 * 9))
    assert conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    lenet5_conv = build("lenet5").features[0]
    assert torch.all(lenet5_conv.bias == 0)


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(UnknownNameError) as info:
        build("resnet9000")
    message = str(info.value)
    assert "resnet9000" in message and all(name in message for name in NAMES)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_classes": 1}, "num_classes 1 is too small for lenet5 \\(needs >= 2\\)"),
        ({"in_channels": 0}, "in_channels 0 is too small for lenet5 \\(needs >= 1\\)"),
        ({"image_size": 8}, "image_size 8 is too small for lenet5 \\(needs >= 12\\)"),
        ({"num_classes": 2.5}, "num_classes must be an integer"),
        ({"num_classes": True}, "num_classes must be an integer"),
        ({"image_size": "28"}, "image_size must be an integer"),
    ],
)
def test_bad_arguments_raise_one_line_config_errors(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        build("lenet5", **kwargs)
    assert "\n" not in str(info.value)


def test_too_small_image_for_imagenet_resnet() -> None:
    with pytest.raises(ConfigError, match="needs >= 32"):
        build("resnet50", image_size=16)
