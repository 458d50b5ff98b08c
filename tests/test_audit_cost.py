"""Cost records: parameters, nonzeros, FLOPs by hand, sizes, effective sparsity, latency."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunescope.audit.cost import model_cost
from prunescope.mask import Mask


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model.input_shape = (1, 2, 2)
    return model


def test_mlp_cost_by_hand():
    model = _mlp()
    mask = Mask.ones(model, ["1.weight", "3.weight"])
    keep = mask["1.weight"].clone()
    keep[0] = False  # hidden unit 0 gets no input: its outgoing weights become ineffective
    mask = Mask({"1.weight": keep, "3.weight": mask["3.weight"]})
    mask.apply_(model)
    cost = model_cost(model, mask)
    first, second = cost["layers"]
    assert (first["params"], first["nonzeros"]) == (12, 8)
    assert first["flops_dense"] == 2 * 12 and first["flops_sparse"] == 2 * 8
    assert second["flops_sparse"] == 2 * 6
    assert first["direct"] == pytest.approx(4 / 12) and second["direct"] == 0.0
    assert second["effective"] == pytest.approx(2 / 6)  # the two weights leaving unit 0
    assert cost["params"] == 12 + 3 + 6 + 2 and cost["prunable"] == 18
    assert cost["sparsity"] == pytest.approx(4 / 18)
    assert cost["effective_sparsity"] == pytest.approx(6 / 18)
    dense_bytes = 4 * (12 + 3 + 6 + 2)
    assert cost["size_dense_bytes"] == dense_bytes
    # masked tensors: kept values + a bit per weight (2 bytes and 1 byte), the rest dense
    assert cost["size_sparse_bytes"] == 4 * (3 + 2) + 4 * 8 + 2 + 4 * 6 + 1
    assert cost["latency_ms_single"] > 0 and cost["latency_ms_batch"] > 0


def test_conv_flops_count_output_positions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 5 * 5, 3))
    model.input_shape = (1, 5, 5)
    mask = Mask.ones(model, ["0.weight", "2.weight"])
    conv = model_cost(model, mask)["layers"][0]
    assert conv["flops_dense"] == 2 * (2 * 1 * 3 * 3) * 25
