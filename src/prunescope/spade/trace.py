"""SPADE: prune a copy of the network on one sample, then explain the sample on that trace.

Soltani Moakhar, Iofinova, Frantar & Alistarh (ICML 2024), "SPADE: Sparsity-Guided Debugging for
Deep Neural Networks", Algorithm 1: fill a batch with augmentations of the sample; record every
layer's inputs ``X_i`` and outputs ``Y_i`` on it in the trained network; replace each layer's
weights by ``argmin_{W sparse} ||W X_i - Y_i||^2`` (OBC-style layer-wise reconstruction); run the
interpretability method on the sparse network. The network is never changed: the trace is a
copy. The paper computes saliency maps with Captum on that trace and scores them by how well
they locate a planted backdoor trigger (the "Trojan AUC").

Choices here (see docs/spade.md): every layer's inputs come from the original network (as in
Algorithm 1; ``sequential=True`` feeds the pruned layers' outputs instead), every Linear/Conv
weight but the output layer's is pruned to the same sparsity (97%), biases take part in the
reconstruction, and the batch is the sample and 63 small affine jitters of it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from prunescope.allocation import check_sparsity, keep_count
from prunescope.errors import ConfigError, PruningError
from prunescope.mask import Mask
from prunescope.patterns import Pattern
from prunescope.second_order.obc import prune_layers
from prunescope.spade.augment import Augmentations
from prunescope.spade.saliency import SALIENCY, saliency_map
from prunescope.targets import select

DEFAULT_METHODS = ("gradient", "integrated_gradients", "input_x_gradient", "guided_backprop",
                   "smoothgrad")


@dataclass(frozen=True)
class SpadeConfig:
    """How the trace is made.

    ``sparsity`` of every pruned layer; the ``augmentations`` batch; which weights are pruned
    (``include`` / ``exclude`` globs, default every Linear/Conv weight, and the output layer
    only with ``output_layer``); the reconstruction's ``dampening``, input source
    (``sequential``) and whether the biases take part (``bias``: then inputs that are constant
    over the batch are absorbed by the bias and their weights dropped); the ``seed``. The
    defaults are those that located a backdoor trigger best on MNIST (docs/spade.md).
    """

    sparsity: float = 0.97
    augmentations: Augmentations = field(default_factory=Augmentations)
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    output_layer: bool = False
    dampening: float = 0.01
    sequential: bool = False
    bias: bool = True
    seed: int = 0


@dataclass
class Explanation:
    """Saliency maps of one input on the original network and on its SPADE trace.

    ``maps[method]["original" | "spade"]`` has the input's shape. ``target`` is the explained
    class; ``probabilities`` the softmax of each network on the input.
    """

    image: torch.Tensor
    target: int
    probabilities: dict[str, torch.Tensor]
    maps: dict[str, dict[str, torch.Tensor]]
    mask: Mask
    config: SpadeConfig
    seconds: dict[str, float]

    def prediction(self, network: str) -> int:
        """The class ``"original"`` or ``"spade"`` predicts for the input."""
        return int(self.probabilities[network].argmax())


def check_input(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """``image`` as ``[C, H, W]`` float, or ConfigError when it does not fit the model."""
    shape = getattr(model, "input_shape", None)
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise ConfigError("the input must be a float tensor [C, H, W]")
    if shape is not None and image.dim() == len(shape) + 1 and image.shape[0] == 1:
        image = image[0]
    if shape is not None and tuple(image.shape) != tuple(shape):
        raise ConfigError(f"the input has shape {list(image.shape)} but the model expects "
                          f"{list(shape)} (channels, height, width); resize or convert it")
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(image.unsqueeze(0))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"the input of shape {list(image.shape)} does not fit the model: "
                          f"{first}") from None
    finally:
        model.train(was_training)
    return image


def trace(model: nn.Module, image: torch.Tensor, config: SpadeConfig = SpadeConfig()
          ) -> tuple[nn.Module, Mask]:
    """A pruned copy of ``model`` for ``image`` (its SPADE trace) and the copy's mask."""
    sparsity = check_sparsity(config.sparsity, "SPADE sparsity")
    if config.augmentations.count < 1:
        raise ConfigError("SPADE needs at least one augmentation (the sample itself)")
    pruned = copy.deepcopy(model).eval()
    image = check_input(pruned, image.detach().float())
    batch = config.augmentations(image, torch.Generator().manual_seed(config.seed))
    names = select(pruned, config.include, config.exclude)
    if not config.output_layer and len(names) > 1:
        names = names[:-1]
    counts = {}
    for name in names:
        size = pruned.get_parameter(name).numel()
        counts[name] = keep_count(size, sparsity)
        if counts[name] == 0:
            raise PruningError(
                f"sparsity {sparsity} keeps no weight of {name!r} ({size} weights), which cuts "
                f"the network; use a sparsity below {1 - 0.5 / size:.6f} or exclude the layer")
    mask = prune_layers(pruned, Mask.ones(pruned, names), Pattern("unstructured"), [batch],
                        counts=counts, sequential=config.sequential,
                        dampening=config.dampening, bias=config.bias)
    return pruned, mask


def explain(model: nn.Module, image: torch.Tensor, *, methods: Sequence[str] = DEFAULT_METHODS,
            target: int | None = None, baseline: torch.Tensor | None = None,
            config: SpadeConfig = SpadeConfig()) -> Explanation:
    """SPADE saliency maps of ``image`` ``[C, H, W]`` next to the same maps on ``model``.

    ``target`` defaults to the class ``model`` predicts; ``baseline`` (the reference input of
    integrated gradients, default zeros) may be a tensor broadcastable to the image. ``model``
    is not changed: both networks are copies. Raises ConfigError for an input that does not fit
    the model and PruningError for a sparsity the layer-wise solver cannot reach.
    """
    for method in methods:
        SALIENCY.get(method)
    original = copy.deepcopy(model).eval()
    image = check_input(original, image.detach().float())
    started = time.perf_counter()
    pruned, mask = trace(original, image, config)
    seconds = {"trace": time.perf_counter() - started}
    networks = {"original": original, "spade": pruned}
    with torch.no_grad():
        probabilities = {k: net(image.unsqueeze(0)).softmax(1)[0] for k, net in networks.items()}
    target = int(probabilities["original"].argmax()) if target is None else int(target)
    if not 0 <= target < probabilities["original"].numel():
        raise ConfigError(f"target class {target} is out of range for the model's "
                          f"{probabilities['original'].numel()} outputs")
    started = time.perf_counter()
    maps = {m: {k: saliency_map(m, net, image, target, baseline) for k, net in networks.items()}
            for m in methods}
    seconds["saliency"] = time.perf_counter() - started
    return Explanation(image, target, probabilities, maps, mask, config, seconds)
