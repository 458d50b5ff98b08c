"""The sparse kernels in a transformer: a tiny random Hugging Face BERT whose encoder Linear layers
(3-d inputs [batch, tokens, features], attention) are swapped by the swap rule, for inference and
for fine-tuning with the mask held, checked against the dense masked model (the reference)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from test_kernels import VARIANTS

from prunescope.kernels import SparseLinear, backend, swap, to_sparse
from prunescope.kernels.training import PLAN, sparse_layers
from prunescope.mask import Mask
from prunescope.sparsifier import MaskHold

transformers = pytest.importorskip("transformers")

RTOL = 1e-5  # relative to the largest reference entry
BATCH, TOKENS = 3, 11


def tiny_bert() -> torch.nn.Module:
    """2 layers, hidden 40 (4 heads), intermediate 72: widths that are not multiples of 8."""
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=72, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def encoder_mask(model: torch.nn.Module, density: float = 0.3) -> Mask:
    generator = torch.Generator().manual_seed(1)
    mask = {}
    for name, module in model.bert.encoder.named_modules():
        if isinstance(module, torch.nn.Linear):
            keep = torch.rand(module.weight.shape, generator=generator) < density
            keep[0] = False  # an all-pruned output row
            mask[f"bert.encoder.{name}.weight"] = keep
    return Mask(mask)


def tokens(generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Token ids with padding: rows of lengths 11, 6 and 3, padded with 0 (masked out)."""
    generator = generator or torch.Generator().manual_seed(2)
    lengths = torch.tensor([TOKENS, 6, 3])
    attention = (torch.arange(TOKENS)[None] < lengths[:, None]).long()
    ids = torch.randint(1, 60, (BATCH, TOKENS), generator=generator) * attention
    return {"input_ids": ids, "attention_mask": attention}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> None:
    """Within RTOL of the largest reference entry (or of ``floor``, for a gradient that is zero
    in exact arithmetic, such as an attention key's bias)."""
    assert actual.shape == expected.shape
    error = (actual - expected).abs().max().item() / max(expected.abs().max().item(), floor)
    assert error <= RTOL, f"relative error {error:.2e} > {RTOL:.0e}"


def pair(**swap_args) -> tuple[torch.nn.Module, torch.nn.Module, Mask, swap.SwapPlan]:
    """The dense masked model (reference) and a copy swapped by the rule."""
    dense = tiny_bert()
    mask = encoder_mask(dense)
    mask.apply_(dense)
    sparse = copy.deepcopy(dense)
    plan = to_sparse(sparse, mask, tokens(), verbose=False, **swap_args)
    return dense, sparse, mask, plan


@pytest.fixture
def fast(monkeypatch):
    """Every layer measures faster sparse, so the comparison covers all of them."""
    if not backend().fast:
        pytest.skip("no fast kernels on this machine")
    monkeypatch.setattr(swap, "_time_pair", lambda *args: (1.0, 0.1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_logits_match_the_dense_masked_model(fast, variant):
    ops = backend().ops
    try:
        ops.set_variant(variant)
    except RuntimeError:
        pytest.skip(f"{variant} kernels not available on this machine")
    try:
        dense, sparse, mask, plan = pair(training=False)
        assert len(plan.swapped) == 12 and plan.residual is None
        assert isinstance(sparse.bert.encoder.layer[1].attention.self.query, SparseLinear)
        with torch.no_grad():
            assert_close(sparse(**tokens()).logits, dense(**tokens()).logits)
            hidden = sparse(**tokens(), output_hidden_states=True).hidden_states[-1]
            assert_close(hidden, dense(**tokens(), output_hidden_states=True).hidden_states[-1])
    finally:
        ops.set_variant(backend().name)


def test_logits_and_gradients_match_under_autograd(fast):
    dense, sparse, mask, _ = pair()
    labels = torch.tensor([0, 2, 1])
    losses = [F.cross_entropy(m(**tokens()).logits, labels) for m in (dense, sparse)]
    for loss in losses:
        loss.backward()
    assert_close(losses[1].detach(), losses[0].detach())
    layers = dict(sparse.named_modules())
    for name, param in dense.named_parameters():
        module, _, attr = name.rpartition(".")
        if isinstance(layers[module], SparseLinear) and attr == "weight":
            assert_close(layers[module].values.grad, param.grad[mask[name]])
        else:  # embeddings, LayerNorm, biases, pooler, classifier: through the sparse layers
            assert_close(dict(sparse.named_parameters())[name].grad, param.grad, floor=1e-6)


def test_the_rule_decides_per_layer_and_records_rows(monkeypatch):
    if not backend().fast:
        pytest.skip("no fast kernels on this machine")
    seen = []

    def fake(layer, kind, keep, input_shape, input_grad, training, repeats):
        seen.append(tuple(input_shape))
        return (1.0, 0.5) if layer.out_features == 72 else (1.0, 2.0)  # only FFN-in faster

    monkeypatch.setattr(swap, "_time_pair", fake)
    dense, sparse, mask, plan = pair(training=False)
    assert seen == [(BATCH, TOKENS, 40)] * 4 + [(BATCH, TOKENS, 40), (BATCH, TOKENS, 72)] \
        + [(BATCH, TOKENS, 40)] * 4 + [(BATCH, TOKENS, 40), (BATCH, TOKENS, 72)]
    assert plan.swapped == [f"bert.encoder.layer.{i}.intermediate.dense" for i in (0, 1)]
    assert all(c.batch == BATCH * TOKENS for c in plan.layers)  # rows = batch x tokens
    assert set(plan.residual) == set(mask) - {f"{n}.weight" for n in plan.swapped}
    table = plan.table()
    assert table.count("sparse (faster)") == 2 and table.count("dense (not 1.1x faster)") == 10
    with torch.no_grad():
        assert_close(sparse(**tokens()).logits, dense(**tokens()).logits)


def test_the_rule_times_each_layer_at_its_3d_shape_for_real():
    """Measured (no injected timings): the table has times and the choice follows them."""
    if not backend().fast:
        pytest.skip("no fast kernels on this machine")
    _, sparse, _, plan = pair(training=False, repeats=2)
    for choice in plan.layers:
        assert choice.dense_ms > 0 and choice.sparse_ms > 0
        assert choice.sparse == (choice.sparse_ms * 1.1 <= choice.dense_ms)


def test_fine_tuning_in_sparse_layers_matches_the_held_dense_run(fast, tmp_path):
    """Three SGD steps with momentum and weight decay: the swapped model follows the dense one
    with its mask held, and is plain again afterwards. (Not Adam: it turns the rounding noise of
    gradients that are zero in exact arithmetic, such as an attention key's bias, into steps of
    size lr, differently in either run.)"""
    dense = tiny_bert()
    mask = encoder_mask(dense)
    sparse = copy.deepcopy(dense)
    hold = MaskHold(mask)
    hold.mask.apply_(dense)
    generator = torch.Generator().manual_seed(5)
    batches = [(tokens(generator), torch.randint(0, 3, (BATCH,), generator=generator))
               for _ in range(3)]
    with sparse_layers(sparse, MaskHold(mask), batches[0][0], tmp_path, resuming=False) as held:
        assert held.held() is None and len(json.loads((tmp_path / PLAN).read_text())
                                               ["sparse_layers"]) == 12
        for model, hook in ((dense, hold), (sparse, held)):
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9,
                                        weight_decay=1e-2)
            model.train()
            for step, (inputs, labels) in enumerate(batches):
                optimizer.zero_grad()
                F.cross_entropy(model(**inputs).logits, labels).backward()
                hook.before_optimizer_step(model, step)
                optimizer.step()
                hook.after_optimizer_step(model, step)
    assert not any(isinstance(m, SparseLinear) for m in sparse.modules())
    for key, value in dense.state_dict().items():  # floor: the key biases stay ~0
        assert_close(sparse.state_dict()[key], value, floor=1e-3)
    for name, keep in mask.items():
        assert torch.count_nonzero(sparse.get_parameter(name)[~keep]) == 0


def test_examples_may_be_positional_or_keyword():
    model = tiny_bert()
    inputs = tokens()
    expected = model(**inputs).logits
    assert torch.equal(swap.call(model, inputs).logits, expected)
    assert torch.equal(swap.call(model, (inputs["input_ids"], inputs["attention_mask"])).logits,
                       expected)
    assert torch.equal(swap.call(model, inputs["input_ids"]).logits,
                       model(inputs["input_ids"]).logits)
