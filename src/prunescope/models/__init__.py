"""The model zoo: image classifiers built by name.

``build("resnet20", num_classes=10)`` returns a freshly initialised ``nn.Module`` that maps a float
batch ``(N, C, H, W)`` with ``H == W == image_size`` to logits ``(N, num_classes)``. Every built
model carries ``input_shape = (C, H, W)`` and ``model_name`` (its registry name).

Rules the rest of prunescope relies on (connectivity analysis swaps modules, pruning walks
parameters):

1. Every activation, pooling and normalisation is an ``nn.Module`` submodule called in
   ``forward``; no ``F.relu``, ``F.max_pool2d``, ... in a forward (``torch.flatten``,
   ``nn.Flatten`` and the residual ``+`` are fine). ReLUs are ``nn.ReLU()``, never in-place. A
   module instance may be reused within one block.
2. Biases: ``nn.Linear`` layers have biases; convs followed by BatchNorm have ``bias=False``;
   convs not followed by BatchNorm (lenet5, conv2/4/6) have biases.
3. Initialisation (:func:`init_weights`): convs Kaiming-normal (fan_out, relu) with zero bias,
   BatchNorm weight 1 and bias 0, Linear layers keep PyTorch's default. No zero-init of residual
   branches. Seeding is the caller's job.

A model is added by decorating its constructor with :func:`register`; the constructor takes the
keyword arguments ``num_classes``, ``in_channels`` and ``image_size`` (already validated).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from prunescope.errors import ConfigError
from prunescope.registry import Registry

Constructor = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its constructor, its default input and the smallest image it takes."""

    constructor: Constructor
    in_channels: int
    image_size: int
    min_image_size: int


MODELS: Registry[ModelSpec] = Registry("model")


def register(
    name: str, *, in_channels: int, image_size: int, min_image_size: int
) -> Callable[[Constructor], Constructor]:
    """Decorator registering a model constructor under ``name`` with its input defaults."""

    def add(constructor: Constructor) -> Constructor:
        MODELS.register(name)(ModelSpec(constructor, in_channels, image_size, min_image_size))
        return constructor

    return add


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) convs with zero bias; BatchNorm 1/0; Linear untouched."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


# Submodules register themselves through `register`, so they are imported after it is defined.
from prunescope.models import conv, lenet, resnet_cifar, resnet_imagenet, vgg  # noqa: E402, F401


def names() -> list[str]:
    """The registered model names, sorted."""
    return MODELS.names()


def build(
    name: str, *, num_classes: int = 10, in_channels: int | None = None,
    image_size: int | None = None,
) -> nn.Module:
    """Build model ``name``; ``None`` means the model's own default input channels / image size.

    Raises :class:`~prunescope.errors.UnknownNameError` for an unknown name and
    :class:`~prunescope.errors.ConfigError` for an out-of-range argument.
    """
    spec = MODELS.get(name)
    num_classes = _at_least("num_classes", num_classes, 2, name)
    in_channels = _at_least("in_channels", _or(in_channels, spec.in_channels), 1, name)
    size = _at_least("image_size", _or(image_size, spec.image_size), spec.min_image_size, name)
    model = spec.constructor(num_classes=num_classes, in_channels=in_channels, image_size=size)
    model.input_shape = (in_channels, size, size)
    model.model_name = name
    return model


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _at_least(what: str, value: object, least: int, name: str) -> int:
    """``value`` as an int >= ``least``, or a one-line ConfigError saying how to fix it."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ConfigError(
            f"{what} must be an integer, got {value!r}; pass a whole number >= {least}"
        ) from None
    if number < least:
        raise ConfigError(
            f"{what} {number} is too small for {name} (needs >= {least}); pass {what}={least} "
            "or more"
        )
    return number
