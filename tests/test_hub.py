"""Hugging Face models and text data through prunescope, on a tiny randomly initialised BERT
and a few dozen tweets written by the tests (hub_helpers): loading, bad input, the
save / from_pretrained round trip, the mask held in training, and a whole recipe end to end."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from hub_helpers import ADAMW, tiny_model, tiny_tweets  # noqa: E402

from prunescope import checkpoint, data, experiment  # noqa: E402
from prunescope import recipe as recipes  # noqa: E402
from prunescope.cli import main  # noqa: E402
from prunescope.errors import ConfigError, DataError, PrunescopeError  # noqa: E402
from prunescope.hub import models as hub_models  # noqa: E402
from prunescope.sparsifier import MaskHold, prune  # noqa: E402
from prunescope.train import TrainConfig, fit  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return tiny_model(root / "model"), tiny_tweets(root / "tweets.csv", 90)


@pytest.fixture(scope="module")
def splits(tiny):
    folder, csv = tiny
    return data.load("tweets", root=csv, val_size=12, tokenizer=str(folder), max_length=12)


def _model(folder, seed=0):
    torch.manual_seed(seed)
    return hub_models.build(hub_models.make_spec(str(folder), 3))


def _recipe(tiny, **sections):
    folder, csv = tiny
    raw = {"name": "tiny-hub", "seed": 0,
           "data": {"name": "tweets", "root": str(csv), "val_size": 12, "max_length": 12},
           "model": {"source": "huggingface", "path": str(folder), "num_labels": 3},
           "train": {"epochs": 2, **ADAMW}, "finetune": {"epochs": 1, **ADAMW}, **sections}
    return recipes.from_dict(raw)


def test_text_splits_are_tokens_with_their_texts(splits):
    assert splits.is_text and splits.input_shape == (2, 12)
    assert splits.train.x.dtype == torch.int64 and splits.train.x.shape[1:] == (2, 12)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 90
    text = splits.texts[int(splits.test.index[0])]
    assert splits.classes[int(splits.test.y[0])] in ("negative", "neutral", "positive")
    ids = splits.test.x[0, 0][splits.test.x[0, 1].bool()]
    assert len(ids) == min(12, len(text.split()) + 2)  # [CLS] words [SEP], one token per word


def test_train_and_test_subsets_are_stratified_and_fixed(tiny):
    folder, csv = tiny
    a = data.load("tweets", root=csv, val_size=6, tokenizer=str(folder), max_length=8,
                  train_size=30, test_size=9, seed=0)
    b = data.load("tweets", root=csv, val_size=6, tokenizer=str(folder), max_length=8,
                  train_size=30, test_size=9, seed=1)
    assert len(a.train) == 30 and len(a.test) == 9
    assert torch.bincount(a.test.y).tolist() == [3, 3, 3]
    assert torch.equal(a.test.index, b.test.index)  # the audit compares seeds on one test set
    with pytest.raises(ConfigError, match="train_size=999 is out of range"):
        data.load("tweets", root=csv, tokenizer=str(folder), train_size=999)


def test_default_targets_are_the_encoder_linears(tiny):
    from prunescope.targets import select

    names = select(_model(tiny[0]))
    assert names and all(".encoder." in n and n.endswith(".weight") for n in names)
    assert len(names) == 2 * 6  # q, k, v, attention output, intermediate, output per layer


def test_checkpoint_rebuilds_the_same_model(tiny, splits, tmp_path):
    model = _model(tiny[0], seed=3)
    mask = prune(model, "magnitude", sparsity=0.5, allocation="uniform")
    checkpoint.save(tmp_path / "m.safetensors", model,
                    meta={"model": checkpoint.model_spec(model, 3)}, mask=mask)
    state = checkpoint.load(tmp_path / "m.safetensors")
    again = checkpoint.build_model(state, tmp_path / "m.safetensors").eval()
    x = splits.test.x[:5]
    assert torch.equal(model.eval()(x), again(x))


def test_save_pretrained_round_trip_is_bit_identical(tiny, splits, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = _model(tiny[0], seed=1)
    mask = prune(model, "magnitude", sparsity=0.7, allocation="uniform")
    out = hub_models.save_pretrained(model, tmp_path / "hf", classes=splits.classes, mask=mask)
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    x = splits.test.x[:7]
    mine = model.eval()(x)
    theirs = loaded(input_ids=x[:, 0], attention_mask=x[:, 1]).logits
    assert torch.equal(mine, theirs)
    assert loaded.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    stored = dict(loaded.named_parameters())
    for name, keep in mask.items():
        assert torch.all(stored[name][~keep] == 0)
    from prunescope.mask import Mask

    assert Mask.load(out / hub_models.MASK_FILE).sparsity == pytest.approx(mask.sparsity)
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()


def test_training_holds_the_mask(tiny, splits, tmp_path):
    model = _model(tiny[0])
    mask = prune(model, "magnitude", sparsity=0.6, allocation="uniform")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, splits, TrainConfig(epochs=1, **ADAMW), tmp_path, hook=MaskHold(mask))
    params = dict(model.named_parameters())
    for name, keep in mask.items():
        assert torch.all(params[name][~keep] == 0)
        assert not torch.equal(params[name][keep], before[name][keep])  # the rest trained


def test_warmup_then_linear_decay():
    from prunescope.train import lr_at

    config = TrainConfig(epochs=1, lr=1.0, lr_schedule="linear", warmup=0.2, **{
        k: v for k, v in ADAMW.items() if k not in ("lr", "lr_schedule", "warmup")})
    rates = [lr_at(config, step, 10) for step in range(10)]
    assert rates[:2] == [0.5, 1.0]  # two warm-up steps
    assert rates[2] == pytest.approx(1.0) and rates[9] == pytest.approx(0.125)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:], strict=False))


@pytest.mark.parametrize("change, message", [
    ({"path": "/no/such/folder"}, "does not exist"),
    ({"num_labels": 5}, "model.num_labels is 5 but 'tweets' has 3 classes"),
    ({"source": "hub"}, "model.source must be one of"),
])
def test_bad_model_is_one_line(tiny, tmp_path, change, message):
    recipe = _recipe(tiny)
    raw = recipes.to_dict(recipe)
    raw["model"].update(change)
    with pytest.raises(ConfigError, match=message):
        experiment.run(recipes.from_dict(raw), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_without_tokenizer_or_safetensors(tiny, tmp_path):
    import shutil

    folder = shutil.copytree(tiny[0], tmp_path / "copy")
    for name in hub_models.TOKENIZER_FILES + ("special_tokens_map.json",):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="has no tokenizer"):
        hub_models.make_spec(folder, 3)
    (folder / hub_models.WEIGHTS).unlink()
    with pytest.raises(ConfigError, match="has no model.safetensors"):
        hub_models.make_spec(folder, 3)


def test_head_of_another_label_count_is_refused(tiny, tmp_path):
    model = _model(tiny[0])
    out = hub_models.save_pretrained(model, tmp_path / "hf", classes=("a", "b", "c"))
    with pytest.raises(ConfigError, match="has a head for 3 labels but the data has 2"):
        hub_models.make_spec(out, 2)


def test_image_data_for_a_text_model_is_refused(tiny, tmp_path):
    raw = recipes.to_dict(_recipe(tiny))
    raw["data"] = {"name": "digits", "val_size": 100}
    with pytest.raises(ConfigError, match="needs a text dataset"):
        experiment.run(recipes.from_dict(raw), tmp_path / "out")


def test_text_option_for_an_image_dataset_is_refused():
    with pytest.raises(ConfigError, match="dataset 'digits' takes no option 'max_length'"):
        data.load("digits", max_length=12)


def test_csv_without_the_columns(tmp_path, tiny):
    bad = tmp_path / "bad.csv"
    bad.write_text("label,words\npositive,good\n")
    with pytest.raises(DataError, match="has no column 'sentiment'"):
        data.load("tweets", root=bad, tokenizer=str(tiny[0]))


def test_recipe_end_to_end_with_audit_and_export(tiny, tmp_path):
    method = {"method": "layerwise", "solver": "sparsegpt", "calibration": 32}
    recipe = _recipe(tiny, prune={"methods": [method, {**method, "solver": "wanda",
                                                       "recover": False}],
                                  "sparsities": [0.5]},
                     audit={"seeds": 2, "methods": [method], "sparsities": [0.5],
                            "bootstrap": 10})
    results = experiment.run(recipe, tmp_path / "out", progress=False)
    assert [r["method"] for r in results["runs"]] == ["sparsegpt", "wanda-oneshot"]
    for run in results["runs"]:
        assert run["actual_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert run["effective_sparsity"] is None  # not defined for a transformer
    audit = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert audit["dataset"]["classes"] == ["negative", "neutral", "positive"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "CIE texts" in html or "CIEs of" not in html
    checkpoint_path = tmp_path / "out" / "sparsegpt" / "s0.5" / "model.safetensors"
    assert main(["export", str(checkpoint_path), "--format", "huggingface",
                 "--out", str(tmp_path / "hf")]) == 0
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert loaded.config.id2label[2] == "positive"


def test_export_huggingface_refuses_a_zoo_checkpoint(tmp_path):
    from prunescope import models

    model = models.build("lenet300", num_classes=10, image_size=8, in_channels=1)
    checkpoint.save(tmp_path / "m.safetensors", model,
                    meta={"model": checkpoint.model_spec(model, 10)})
    with pytest.raises(PrunescopeError, match="not a Hugging Face model"):
        from prunescope.export import export

        export(tmp_path / "m.safetensors", tmp_path / "hf", "huggingface")


def test_recovery_distilled_from_the_dense_model(tiny, tmp_path):
    method = {"method": "layerwise", "solver": "wanda", "calibration": 16}
    recipe = _recipe(tiny, prune={"methods": [method], "sparsities": [0.5]},
                     distill={"teacher": "dense", "temperature": 2.0, "weight": 0.5})
    results = experiment.run(recipe, tmp_path / "out", progress=False)
    assert results["runs"][0]["finetuned"] and results["runs"][0]["accuracy"] >= 0


def test_gmp_during_fine_tuning_of_the_pretrained_model(tiny, tmp_path):
    gmp = {"method": "gmp", "allocation": "uniform", "start": 0.0, "end": 0.5, "every": 1,
           "unit": "fraction"}
    recipe = _recipe(tiny, prune={"methods": [gmp], "sparsities": [0.6]})
    results = experiment.run(recipe, tmp_path / "out", progress=False)
    assert results["runs"][0]["actual_sparsity"] == pytest.approx(0.6, abs=0.01)


def test_missing_transformers_is_one_line(monkeypatch):
    import sys

    from prunescope.hub import require_transformers

    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"need the transformers package: pip install"):
        require_transformers()


def test_target_glob_matching_nothing_is_one_line(tiny, tmp_path):
    raw = recipes.to_dict(_recipe(tiny, prune={"methods": [{"method": "layerwise"}],
                                               "sparsities": [0.5],
                                               "include": ["*.no_such_layer.*"]}))
    with pytest.raises(PrunescopeError, match="no prunable tensor"):
        experiment.run(recipes.from_dict(raw), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_pattern_not_fitting_a_layer_is_one_line(tiny, tmp_path):
    raw = recipes.to_dict(_recipe(tiny, prune={"methods": [{"method": "layerwise",
                                                            "pattern": "2:3"}],
                                               "sparsities": [1 / 3]}))
    with pytest.raises(ConfigError, match="inputs, not a multiple of 3"):
        experiment.run(recipes.from_dict(raw), tmp_path / "out")
    assert not (tmp_path / "out").exists()
