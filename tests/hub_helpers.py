"""A tiny Hugging Face model folder and a tiny tweets file, written by tests (no weights or
data are downloaded): a 2-layer BertForSequenceClassification-ready BertModel with a word-level
vocabulary, and labelled texts whose sentiment words decide the label."""

from __future__ import annotations

import csv
import random
from pathlib import Path

WORDS = {"positive": ["good", "great", "love", "happy", "nice"],
         "negative": ["bad", "awful", "hate", "sad", "worse"],
         "neutral": ["car", "road", "today", "drive", "city", "news", "sign", "time"]}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# how the tests fine-tune the tiny BERT (the track's optimizer at a rate a tiny model learns at)
ADAMW = {"optimizer": "adamw", "lr": 0.005, "weight_decay": 0.01, "lr_schedule": "linear",
         "warmup": 0.1, "max_grad_norm": 1.0, "batch_size": 16}


def tiny_model(folder: Path, *, layers: int = 2, hidden: int = 32) -> Path:
    """A randomly initialised BertModel (seed 0) with its tokenizer, saved in ``folder``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + sorted({w for words in WORDS.values() for w in words})
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_tweets(path: Path, count: int = 60, seed: int = 0) -> Path:
    """``count`` distinct labelled texts in the tweets CSV format (sentiment, confidence, text)."""
    rng = random.Random(seed)
    rows, seen = [], set()
    labels = ["negative", "neutral", "positive"]
    while len(rows) < count:
        label = labels[len(rows) % 3]
        words = [rng.choice(WORDS["neutral"]) for _ in range(rng.randint(2, 6))]
        if label != "neutral":
            words.insert(rng.randrange(len(words) + 1), rng.choice(WORDS[label]))
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            rows.append((label, "1.0", text))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentiment", "confidence", "text"])
        writer.writerows(rows)
    return path
