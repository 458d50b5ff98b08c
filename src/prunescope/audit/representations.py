"""Representation metrics per example: Q-score and prediction depth (Corti et al. 2022).

Corti, Entezari, Hooker, Bacciu & Saukh, "Studying the impact of magnitude pruning on
contrastive learning methods" (2022) compare dense and pruned models through two per-example
measures of their hidden representations; the audit computes both for every model, next to its
predictions, and compares them between the CIEs and the rest.

**Q-score** (Kalibhat et al. 2022, "Measuring self-supervised representation quality for
downstream classification using discriminative features"): how far an example's strongest
coordinates stand out of its representation. With ``a = |z|`` the magnitudes of the
penultimate representation ``z`` (``d`` coordinates) and ``a_(1) >= ... >= a_(d)``::

    Q(z) = mean_{j <= top} (a_(j) - mean(a)) / std(a)        (std over the d coordinates)

i.e. the z-score, within the example, of its ``top`` largest-magnitude coordinates (default 1:
the largest). A representation with ``std(a) = 0`` (every coordinate equal, e.g. all zero after
a ReLU) has no coordinate that stands out: ``Q = 0``. The stored excerpts of the paper we could
read state the idea (discriminative, highly activating coordinates against the rest), not a
formula; this one is our reading and is named as such in ``docs/audit.md``.

**Prediction depth** (Baldock, Maennel & Neyshabur 2021, "Deep learning through the lens of
example difficulty"): k-NN probes (``k = 30``, Euclidean, majority vote of the bank's true
labels, ties to the smaller class) on the representation at each probed layer; the depth of
an example is the earliest probe ``l`` such that the probes ``l, l+1, ..., L-1`` all agree
with the model's final prediction, and ``L`` (the output layer alone) when the last probe
disagrees. The probed representations are the inputs of the model's ``nn.Linear`` and
``nn.Conv*`` layers in the order they are called (forward pre-hooks): probe 0 is the input
image, the last probe the penultimate representation (the one the Q-score reads). A
transformer (:class:`prunescope.hub.models.TextClassifier`) is probed at the hidden state
entering each block and at the head's inputs, each at its first token ([CLS]). The k-NN
bank is ``bank`` training examples drawn with ``numpy.random.default_rng(seed)`` (1,000 and
seed 0 by default, the same for every model of a dataset). Feature maps larger than
:data:`MAX_DIM` values are average-pooled to ``C x 4 x 4`` before the probe, so the bank of a
convolutional network stays small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

K = 30
BANK = 1000
BANK_SEED = 0
TOP = 1
MAX_DIM = 4096  # a probed feature map with more values is pooled to C x POOL x POOL
POOL = 4
BATCH = 500


@dataclass(frozen=True)
class Settings:
    """How the metrics were computed (kept in the predictions cache and the audit)."""

    k: int = K
    bank: int = BANK
    seed: int = BANK_SEED
    top: int = TOP

    def as_dict(self) -> dict:
        return {"k": self.k, "bank": self.bank, "seed": self.seed, "top": self.top}


def q_score(features: np.ndarray, top: int = TOP) -> np.ndarray:
    """``[N]`` Q-scores of the rows of ``features`` ``[N, d]`` (see the module doc)."""
    a = np.abs(np.asarray(features, dtype=np.float64)).reshape(len(features), -1)
    top = min(top, a.shape[1])
    spread = a.std(axis=1)
    strongest = -np.sort(-a, axis=1)[:, :top].mean(axis=1)
    safe = np.where(spread > 0, spread, 1.0)
    return np.where(spread > 0, (strongest - a.mean(axis=1)) / safe, 0.0)


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int,
                num_classes: int) -> torch.Tensor:
    """``[M]`` majority label of each query's ``k`` nearest bank rows (Euclidean; equal votes
    go to the smaller class); ``k`` is capped at the bank size."""
    k = min(k, len(bank))
    distances = torch.cdist(queries.double(), bank.double())
    nearest = distances.topk(k, dim=1, largest=False).indices
    votes = torch.zeros(len(queries), num_classes, dtype=torch.int64)
    votes.scatter_add_(1, bank_labels[nearest], torch.ones_like(nearest))
    return votes.argmax(dim=1)  # first maximum: the smaller class on equal votes


def prediction_depth(probes: np.ndarray, final: np.ndarray) -> np.ndarray:
    """``[N]`` depths from the probe predictions ``[L, N]`` and the final predictions ``[N]``:
    the earliest ``l`` from which every probe agrees with ``final`` (``L`` when the last
    probe disagrees)."""
    probes, final = np.asarray(probes), np.asarray(final)
    agree = probes == final[None, :]
    depth = np.full(len(final), len(probes), dtype=np.int64)
    for layer in range(len(probes) - 1, -1, -1):  # walk down while the suffix agrees
        still = agree[layer] & (depth == layer + 1)
        depth[still] = layer
    return depth


def layer_inputs(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The input of each Linear/Conv layer in call order (flattened, large maps pooled) and
    the model's output, for one batch ``x``."""
    captured: list[torch.Tensor] = []

    def hook(_module, args):
        captured.append(_flat(args[0].detach()))

    handles = [m.register_forward_pre_hook(hook) for m in probed_layers(model)]
    try:
        with torch.no_grad():
            output = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return captured, output.detach()


def probed_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose inputs are probed: the model's own ``probed_layers()`` where it has
    one (a transformer: each block's first Linear and the head), else every Linear and Conv."""
    own = getattr(model, "probed_layers", None)
    if own is not None:
        return list(own())
    return [m for m in model.modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)]


def _flat(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 3:  # a sequence [N, tokens, features]: its first token ([CLS])
        t = t[:, 0]
    if t.dim() == 4 and t[0].numel() > MAX_DIM:
        t = nn.functional.adaptive_avg_pool2d(t, POOL)
    return t.reshape(len(t), -1).float().cpu()


def compute(model: nn.Module, x: torch.Tensor, train_x: torch.Tensor, train_y: torch.Tensor,
            num_classes: int, settings: Settings = Settings()) -> dict:
    """``{"q_score" [N] float32, "prediction_depth" [N] int64, "layers"}`` of ``model`` on the
    inputs ``x``, with a k-NN bank of ``settings.bank`` rows of ``(train_x, train_y)``."""
    from prunescope import devices
    from prunescope.audit.metrics import predicted

    was_training = model.training
    model.eval()
    device = devices.model_device(model)
    rng = np.random.default_rng(settings.seed)
    chosen = np.sort(rng.permutation(len(train_x))[:settings.bank])
    try:
        bank = _bank(model, train_x[torch.as_tensor(chosen)], device)
        bank_y = train_y[torch.as_tensor(chosen)].long()
        scores, depths = [], []
        for start in range(0, len(x), BATCH):
            layers, output = _features(model, x[start:start + BATCH], device)
            final = predicted(output.numpy())
            probes = np.stack([knn_predict(b, bank_y, q, settings.k, num_classes).numpy()
                               for b, q in zip(bank, layers, strict=True)])
            scores.append(q_score(layers[-1].numpy(), settings.top))
            depths.append(prediction_depth(probes, final))
    finally:
        model.train(was_training)
    return {"q_score": np.concatenate(scores).astype(np.float32),
            "prediction_depth": np.concatenate(depths).astype(np.int64), "layers": len(bank)}


def _features(model: nn.Module, x: torch.Tensor, device) -> tuple[list[torch.Tensor],
                                                                   torch.Tensor]:
    layers, output = layer_inputs(model, x.to(device))
    return layers, output.float().cpu()


def _bank(model: nn.Module, x: torch.Tensor, device) -> list[torch.Tensor]:
    """Each probed layer's features of the bank examples, computed in batches."""
    parts = [_features(model, x[i:i + BATCH], device)[0] for i in range(0, len(x), BATCH)]
    return [torch.cat(layer) for layer in zip(*parts, strict=True)]


# -- the audit's summary (numpy only) --------------------------------------------------------


def distribution(values: np.ndarray) -> dict:
    """``{count, mean, q1, median, q3}`` of ``values`` (None statistics when empty)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if not len(values):
        return {"count": 0, "mean": None, "q1": None, "median": None, "q3": None}
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"count": int(len(values)), "mean": float(values.mean()), "q1": float(q1),
            "median": float(median), "q3": float(q3)}


def summary(members: list, dense: list | None = None,
            cie_positions: list[int] | None = None) -> dict | None:
    """The audit's ``representations`` block of a population (``members``: its Predictions):
    distributions pooled over its models and examples, and with ``cie_positions`` (a
    compressed population's CIEs) on the CIEs vs the rest, for its models and for ``dense``.
    None when a member lacks the metrics (predictions cached before they existed)."""
    if any(m.q_score is None or m.prediction_depth is None for m in members):
        return None
    settings = members[0].meta.get("representations") or {}
    out = {"models": len(members), **{key: settings.get(key)
                                      for key in ("layers", "k", "bank", "top")}}
    for name in ("q_score", "prediction_depth"):
        out[name] = distribution(np.stack([getattr(m, name) for m in members]))
    if cie_positions is None:
        return out
    cie = np.zeros(len(members[0].labels), dtype=bool)
    cie[list(cie_positions)] = True
    dense_ok = bool(dense) and all(getattr(d, "q_score", None) is not None
                                   and d.prediction_depth is not None for d in dense)
    for name in ("q_score", "prediction_depth"):
        own = np.stack([getattr(m, name) for m in members])
        ref = np.stack([getattr(d, name) for d in dense]) if dense_ok else None
        out[f"{name}_cie"] = {
            "cie": distribution(own[:, cie]), "rest": distribution(own[:, ~cie]),
            "dense_cie": distribution(ref[:, cie]) if ref is not None else None,
            "dense_rest": distribution(ref[:, ~cie]) if ref is not None else None}
    return out
