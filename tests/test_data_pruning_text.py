"""Data pruning on text (issue 12, DRoP on the transformer track): token tensors [N, 2, L] on a
tiny randomly initialised BERT and a few dozen tweets (hub_helpers): the kept examples carry
their texts, DRoP's quotas hold, scores are per tweet, the recipe method runs, and the scoring
and query models are one shared training."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hub_helpers import ADAMW, tiny_model, tiny_tweets  # noqa: E402

from prunescope import experiment  # noqa: E402
from prunescope import recipe as recipes  # noqa: E402
from prunescope.data_pruning import (  # noqa: E402
    drop_quotas,
    el2n_scores,
    forgetting_scores,
    prune_data,
    query_recall,
    train_on,
)
from prunescope.data_pruning.select import protocol_run  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-drop")
    return tiny_model(root / "model"), tiny_tweets(root / "tweets.csv", 120)


def _recipe(tiny, **sections):
    folder, csv = tiny
    raw = {"name": "tiny-drop", "seed": 0,
           "data": {"name": "tweets", "root": str(csv), "val_size": 12, "max_length": 12},
           "model": {"source": "huggingface", "path": str(folder), "num_labels": 3},
           "train": {"epochs": 2, **ADAMW}, **sections}
    return recipes.from_dict(raw)


def test_drop_on_tokens_keeps_the_quotas_and_the_texts(tiny, tmp_path):
    run = experiment.run_for(_recipe(tiny), tmp_path / "run", progress=False)
    train = run.splits.train
    assert train.is_text and train.x.shape[1:] == (2, 12)
    recall = query_recall(run, models=2, epochs=1)
    kept = prune_data(run, 0.5, "random", "drop_code", query_models=2, query_epochs=1)
    sizes = torch.bincount(train.y, minlength=3)
    expected = drop_quotas(recall, sizes, round(0.5 * len(train)), "drop_code")
    assert torch.bincount(train.y[kept], minlength=3).tolist() == expected.tolist()
    result = train_on(run, kept, tmp_path / "pruned", density=0.5)
    assert result["kept_per_class"] == expected.tolist()
    assert result["worst_class_recall"] == min(result["per_class_recall"])
    # the kept tweets are the training tweets at those positions, texts included
    texts = [run.splits.texts[int(i)] for i in train.index[kept]]
    assert len(set(texts)) == len(kept)


def test_scores_of_tweets_and_one_shared_training_per_model(tiny, tmp_path):
    run = experiment.run_for(_recipe(tiny), tmp_path / "run", progress=False)
    recall = query_recall(run, models=2, epochs=1)
    el2n = el2n_scores(protocol_run(run), models=2, epochs=1)
    forgetting = forgetting_scores(protocol_run(run), epochs=1)
    shared = sorted(p.name for p in (run.out / "data-pruning").iterdir() if p.is_dir())
    assert shared == ["full-e1-m0", "full-e1-m1"]  # query, el2n and forgetting: one training
    n = len(run.splits.train)
    assert el2n.shape == forgetting.shape == (n,) and recall.shape == (3,)
    assert ((el2n >= 0) & (el2n <= 2 ** 0.5)).all()
    assert set(forgetting.tolist()) <= {0.0, 1.0}  # one epoch: never learned (1) or not


def test_the_recipe_method_runs_on_text(tiny, tmp_path):
    raw_prune = {"sparsities": [0.0], "methods": [
        {"method": "data_pruning", "density": 0.5, "strategy": "el2n", "score_models": 1,
         "score_epochs": 1},
        {"method": "data_pruning", "density": 0.5, "strategy": "random", "quota": "drop_code",
         "query_models": 1, "query_epochs": 1}]}
    result = experiment.run(_recipe(tiny, prune=raw_prune), tmp_path / "run", progress=False)
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == {"el2n-d0.5", "random+drop_code-d0.5"}
    for record in runs.values():
        assert record["kept"] == sum(record["kept_per_class"])
        assert record["effective_sparsity"] is None  # a transformer: not defined
