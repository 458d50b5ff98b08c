"""Tests of prunescope.criteria: every score against an independent computation."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from prunescope.criteria import CRITERIA, GRASP_TEMPERATURE, Context
from prunescope.errors import PruningError
from prunescope.registry import Registry


def score(name: str, model: nn.Module, names: list[str], **context) -> dict[str, torch.Tensor]:
    return CRITERIA.get(name).score(model, names, Context(**context))


def mse_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(5, 4, generator=generator), torch.randn(5, 3, generator=generator))
            for _ in range(2)]


def linear_model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def mse_gradient(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dL/dW of L = mean((x W^T + b - y)^2), by hand: 2 / (N * out) (output - y)^T x."""
    with torch.no_grad():
        residual = x @ layer.weight.T + layer.bias - y
    return 2.0 / residual.numel() * residual.T @ x


def test_registered_criteria() -> None:
    assert set(CRITERIA.names()) == {"magnitude", "random", "snip", "grasp", "synflow", "taylor",
                                     "woodfisher", "obc", "sparsegpt"}
    assert {n for n in CRITERIA if CRITERIA.get(n).needs_data} == {"snip", "grasp", "taylor",
                                                                   "woodfisher", "obc",
                                                                   "sparsegpt"}
    assert [n for n in CRITERIA if CRITERIA.get(n).signed] == ["grasp"]
    assert CRITERIA.get("synflow").rounds == 100


def test_magnitude_is_the_absolute_weight(tiny_mlp: nn.Module) -> None:
    scores = score("magnitude", tiny_mlp, ["1.weight", "3.weight"])
    assert torch.equal(scores["1.weight"], tiny_mlp[1].weight.detach().abs())
    assert torch.equal(scores["3.weight"], tiny_mlp[3].weight.detach().abs())


def test_random_is_reproducible_by_seed(tiny_mlp: nn.Module) -> None:
    def draw(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return score("random", tiny_mlp, ["1.weight"], generator=generator)["1.weight"]

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    assert draw(3).shape == (3, 4) and bool(((draw(3) >= 0) & (draw(3) < 1)).all())


def test_snip_is_abs_weight_times_summed_gradient() -> None:
    layer, batches = linear_model(), mse_batches()
    scores = score("snip", layer, ["weight"], batches=batches, loss_fn=F.mse_loss)
    gradient = sum(mse_gradient(layer, x, y) for x, y in batches)
    expected = (layer.weight.detach() * gradient).abs()
    torch.testing.assert_close(scores["weight"], expected)


def test_snip_gradient_by_hand_matches_autograd() -> None:
    layer, (x, y) = linear_model(), mse_batches()[0]
    F.mse_loss(layer(x), y).backward()
    torch.testing.assert_close(layer.weight.grad, mse_gradient(layer, x, y))


def test_taylor_is_the_mean_over_batches_of_squared_gradient_times_weight() -> None:
    layer, batches = linear_model(), mse_batches()
    scores = score("taylor", layer, ["weight"], batches=batches, loss_fn=F.mse_loss)
    w = layer.weight.detach()
    (x1, y1), (x2, y2) = batches
    expected = ((mse_gradient(layer, x1, y1) * w) ** 2 + (mse_gradient(layer, x2, y2) * w) ** 2) / 2
    torch.testing.assert_close(scores["weight"], expected)


def test_grasp_is_weight_times_hessian_gradient_product() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 3, generator=generator, dtype=torch.float64),
                torch.randint(0, 3, (5,), generator=generator)) for _ in range(2)]
    names = ["0.weight", "2.weight"]
    fixed = {n: p.detach() for n, p in model.named_parameters()}

    def total_loss(w0: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        params = {**fixed, "0.weight": w0, "2.weight": w2}
        return sum(F.cross_entropy(functional_call(model, params, (x,)) / GRASP_TEMPERATURE, y)
                   for x, y in batches)

    weights = (fixed["0.weight"], fixed["2.weight"])
    gradient = torch.func.grad(total_loss, argnums=(0, 1))(*weights)
    _, hg = torch.autograd.functional.hvp(total_loss, weights, gradient)
    scores = score("grasp", model, names, batches=batches)
    for name, w, h in zip(names, weights, hg, strict=True):
        torch.testing.assert_close(scores[name], w * h, rtol=1e-9, atol=1e-18)
    assert (scores["0.weight"] < 0).any() and (scores["0.weight"] > 0).any()  # signed


def test_synflow_matches_the_closed_form_of_a_two_layer_net() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    scores = score("synflow", model, ["0.weight", "2.weight"], input_shape=(3,))
    a1 = model[0].weight.detach().double().abs()
    a2 = model[2].weight.detach().double().abs()
    # R = 1^T |W2| |W1| 1: dR/d|W1|[i, j] = (1^T |W2|)[i], dR/d|W2|[k, i] = (|W1| 1)[i]
    expected1 = a1 * a2.sum(0)[:, None]
    expected2 = a2 * a1.sum(1)[None, :]
    assert scores["0.weight"].dtype == torch.float64
    torch.testing.assert_close(scores["0.weight"], expected1)
    torch.testing.assert_close(scores["2.weight"], expected2)
    # the sum of the scores of a layer is R itself (a conservation law of SynFlow)
    r = a2.sum(0) @ a1.sum(1)
    torch.testing.assert_close(scores["0.weight"].sum(), r)
    torch.testing.assert_close(scores["2.weight"].sum(), r)


def test_synflow_takes_the_input_shape_from_the_model_or_the_context(mlp8: nn.Module) -> None:
    from_model = score("synflow", mlp8, ["0.weight"])
    from_context = score("synflow", mlp8, ["0.weight"], input_shape=(8,))
    assert torch.equal(from_model["0.weight"], from_context["0.weight"])
    del mlp8.input_shape
    with pytest.raises(PruningError, match="input shape"):
        score("synflow", mlp8, ["0.weight"])


@pytest.mark.parametrize("name", [n for n in CRITERIA if CRITERIA.get(n).needs_data])
def test_data_driven_criteria_without_data_raise(name: str, tiny_mlp: nn.Module) -> None:
    with pytest.raises(PruningError, match="needs data"):
        score(name, tiny_mlp, ["1.weight"])


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    model.input_shape = (4,)
    with torch.no_grad():  # non-default running stats, so a reset would show
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].num_batches_tracked.fill_(7)
    return model


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", CRITERIA.names())
def test_criteria_leave_the_model_untouched(name: str, training: bool) -> None:
    model = bn_model()
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 4, generator=generator),
                torch.randint(0, 3, (8,), generator=generator)) for _ in range(2)]
    model(batches[0][0]).sum().backward()  # some .grad to preserve
    model[0].bias.grad = None  # and one missing .grad
    model.train(training)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    scores = score(name, model, ["0.weight", "3.weight"], batches=batches)
    assert set(scores) == {"0.weight", "3.weight"}
    assert scores["0.weight"].shape == (6, 4) and not torch.isnan(scores["0.weight"]).any()
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]) and p.requires_grad
        assert (p.grad is None) if grads[n] is None else torch.equal(p.grad, grads[n])
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert all(m.training == training for m in model.modules())


# -- registrations without import cycles -----------------------------------------------------
def test_second_order_criteria_are_listed_and_loaded_without_importing_them_first() -> None:
    code = (
        "import sys\n"
        "from prunescope.criteria import CRITERIA\n"
        "assert not any(m.startswith('prunescope.second_order') for m in sys.modules)\n"
        "assert {'obc', 'sparsegpt', 'woodfisher'} <= set(CRITERIA.names()) and 'obc' in CRITERIA\n"
        "assert CRITERIA.get('obc').name == 'obc' and CRITERIA.get('obc').solve is not None\n"
        "assert 'prunescope.second_order.exact_obc' in sys.modules\n"
        "assert CRITERIA.get('sparsegpt').name == 'sparsegpt'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


CORE = ("mask", "connectivity", "sparsifier", "allocation", "patterns", "criteria", "targets",
        "registry", "interop", "second_order", "second_order.fisher", "second_order.obc",
        "second_order.exact_obc", "second_order.woodfisher")


def module_imports(root: Path) -> dict[str, set[str]]:
    """``prunescope`` module -> the prunescope modules it imports at module level."""
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = graph.setdefault(name, set())
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.update(f"{node.module}.{a.name}" for a in node.names)
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
    return {n: {m for m in found if m in graph and m != n} for n, found in graph.items()}


def test_no_core_module_imports_one_that_imports_it_back() -> None:
    import prunescope

    graph = module_imports(Path(prunescope.__file__).parent)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph.get(node, ()))
        return False

    for name in (f"prunescope.{m}" for m in CORE):
        assert not any(reaches(dep, name) for dep in graph[name]), name


def test_a_lazy_entry_is_listed_and_resolved_on_first_use() -> None:
    registry = Registry("thing")
    registry.register_lazy("dumps", "json:dumps")
    assert "dumps" in registry and registry.names() == ["dumps"] and len(registry) == 1
    assert registry.get("dumps") is json.dumps
    with pytest.raises(ValueError, match="twice"):
        registry.register("dumps")(len)
    registry.unregister("dumps")
    assert "dumps" not in registry
