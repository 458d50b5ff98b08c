"""What a (sparse) model costs: parameters, nonzeros, FLOPs, sizes, measured CPU latency.

- Per prunable tensor (the mask's): shape, parameters, kept weights, direct sparsity and
  effective sparsity (:func:`prunescope.connectivity.layer_sparsities`, Vysogorets & Kempe 2023).
- FLOPs per example of the Linear and Conv2d layers, counting a multiply-add as 2: dense
  ``2 * weight.numel() * output positions`` and sparse ``2 * nonzeros * output positions``
  (output positions: 1 for Linear on a flat input, the tokens for Linear on a sequence,
  ``H_out * W_out`` for Conv2d, measured with forward hooks on one input). Biases, norms,
  activations and pooling are not counted, nor a transformer's attention products.
- Sizes: ``size_dense_bytes`` stores every parameter and buffer densely; ``size_sparse_bytes``
  stores each masked tensor as its nonzero values plus a 1-bit-per-weight bitmap and the rest
  densely; ``file_bytes`` is the checkpoint file as written (dense, with metadata).
- Latency: median wall time of a forward pass in eval mode on this CPU (batch of one, and a batch
  of ``batch_size``), after warm-up. The model runs with dense kernels, so pruning alone does
  not change it; it is the number to compare with a sparse-kernel build.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from prunescope.connectivity import layer_sparsities
from prunescope.mask import Mask

LATENCY_BATCH, LATENCY_REPEATS, WARMUP = 256, 7, 2


def model_cost(model: nn.Module, mask: Mask, *, checkpoint_path: Path | None = None,
               input_shape: tuple[int, ...] | None = None) -> dict:
    """The cost record of ``model`` under ``mask`` (see the module doc)."""
    shape = tuple(input_shape or model.input_shape)
    positions = _output_positions(model, shape)
    sparsities = layer_sparsities(model, mask, shape)
    params = dict(model.named_parameters())
    layers = []
    for name, kept in mask.items():
        weight = params[name]
        per_out = positions.get(name, 1)
        layers.append({
            "name": name, "shape": list(weight.shape), "params": weight.numel(),
            "nonzeros": int(torch.count_nonzero(weight.detach() * kept)),
            "direct": sparsities[name]["direct"], "effective": sparsities[name]["effective"],
            "flops_dense": 2 * weight.numel() * per_out if name in positions else 0,
            "flops_sparse": 2 * int(kept.sum()) * per_out if name in positions else 0,
        })
    return {
        "layers": layers,
        "params": sum(p.numel() for p in model.parameters()),
        "prunable": sum(layer["params"] for layer in layers),
        "nonzeros": sum(layer["nonzeros"] for layer in layers),
        "sparsity": mask.sparsity,
        "effective_sparsity": _effective_total(layers),
        "flops_dense": sum(layer["flops_dense"] for layer in layers),
        "flops_sparse": sum(layer["flops_sparse"] for layer in layers),
        **_sizes(model, mask),
        "file_bytes": checkpoint_path.stat().st_size if checkpoint_path else None,
        **latency(model, shape),
    }


@torch.no_grad()
def latency(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = LATENCY_BATCH,
            repeats: int = LATENCY_REPEATS) -> dict[str, float]:
    """Median forward time in milliseconds for one example and for ``batch_size`` examples."""
    was_training = model.training
    model.eval()
    try:
        out = {}
        for key, n in (("latency_ms_single", 1), ("latency_ms_batch", batch_size)):
            x = example_input(model, input_shape, n)
            times = []
            for i in range(WARMUP + repeats):
                start = time.perf_counter()
                model(x)
                if i >= WARMUP:
                    times.append(time.perf_counter() - start)
            out[key] = 1000 * sorted(times)[len(times) // 2]
        out["latency_batch_size"] = batch_size
        return out
    finally:
        model.train(was_training)


@torch.no_grad()
def _output_positions(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """``{weight name: output positions per example}`` of every Linear/Conv2d, by forward hooks."""
    found: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            key = f"{name}.weight" if name else "weight"

            def hook(mod, args, output, key=key):
                if output.dim() == 4:  # a convolution: its output pixels
                    found[key] = int(output[0, 0].numel())
                else:  # a Linear: one per token of a sequence, one for a flat input
                    found[key] = int(output[0].numel()) // output.shape[-1]

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(example_input(model, input_shape, 1))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return found


def example_input(model: nn.Module, input_shape: tuple[int, ...], n: int) -> torch.Tensor:
    """``n`` seeded inputs of ``input_shape``: the model's own ``example_input`` (a text model:
    random tokens, no padding) or standard normal images."""
    generator = torch.Generator().manual_seed(0)
    own = getattr(model, "example_input", None)
    if own is not None:
        return own(n, input_shape, generator)
    return torch.randn(n, *input_shape, generator=generator)


def _sizes(model: nn.Module, mask: Mask) -> dict[str, int]:
    state = model.state_dict()
    dense = sum(t.numel() * t.element_size() for t in state.values())
    sparse = dense
    for name, kept in mask.items():
        tensor = state[name]
        sparse -= tensor.numel() * tensor.element_size()
        sparse += int(kept.sum()) * tensor.element_size() + (tensor.numel() + 7) // 8
    return {"size_dense_bytes": dense, "size_sparse_bytes": sparse}


def _effective_total(layers: list[dict]) -> float | None:
    if any(layer["effective"] is None for layer in layers):
        return None  # a model the path analysis does not apply to
    total = sum(layer["params"] for layer in layers)
    pruned = sum(layer["effective"] * layer["params"] for layer in layers)
    return pruned / total if total else 0.0
