"""Robust distillation benchmark (issue 12, item 3): a 95%-sparse LeNet-300-100 on ``mnist_lt``.

For each seed a dense LeNet-300-100 trains on long-tailed MNIST (the teacher), is pruned one-shot
to 95% (global magnitude) and fine-tuned with its mask held four ways: cross-entropy alone (no
distillation), plain distillation (Hinton et al., T = 4, a = 0.5), worst-class robust
distillation from the dense teacher (same T and a, blend b = 0.5) and robust distillation from a
robust teacher (a dense model trained with the teacher-free robust objective, also b = 0.5; with
b = 1 from scratch two of three seeds collapsed onto one class). Test
accuracy and worst-class recall (MNIST's balanced test set) per student; prints the mean over
seeds with a 95% t-interval and the paired difference of robust against plain distillation;
writes bench/results/robust_distill.json.

    .venv/bin/python benchmarks/robust_distill.py [--seeds 3] [--epochs 8] [--finetune 4]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from common import markdown_table, write_results

from prunescope.distill import DistillConfig
from prunescope.run import Run
from prunescope.sparsifier import MaskHold, prune
from prunescope.train import TrainConfig, predict

SPARSITY = 0.95
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
ROBUST = {"robust": True, "blend": 0.5, "step_size": 0.1, "every": 10, "val_batch_size": 1000}
STUDENTS = {
    "no distillation": None,
    "plain distillation": DistillConfig(teacher="dense", temperature=4.0, weight=0.5),
    "robust distillation": DistillConfig(teacher="dense", temperature=4.0, weight=0.5, **ROBUST),
    "robust distillation, robust teacher": "robust-teacher",
}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, T95[len(values) - 1] * statistics.stdev(values) / len(values) ** 0.5


def recalls(run: Run, model: torch.nn.Module) -> tuple[float, list[float]]:
    """Test accuracy and per-class recall."""
    test = run.splits.test
    hits = predict(model, test).argmax(1) == test.y
    per_class = [hits[test.y == c].double().mean().item() for c in range(run.splits.num_classes)]
    return hits.double().mean().item(), per_class


def robust_teacher(run: Run) -> Path:
    """A dense model trained with the teacher-free robust objective; its checkpoint."""
    config = DistillConfig(teacher="none", weight=0.0, **ROBUST)
    teacher_run = dataclasses.replace(run, distill=config)
    directory = run.out / "robust-teacher"
    teacher_run.fit(run.fresh_model(), directory, run.train, desc="robust teacher")
    return directory / "model.safetensors"


def run_seed(seed: int, epochs: int, finetune: int, out: Path) -> list[dict]:
    run = Run.from_dataset("mnist_lt", "lenet300", out / f"seed{seed}", seed=seed, progress=False,
                           train=TrainConfig(epochs=epochs, batch_size=128, lr=0.05,
                                             weight_decay=1e-4))
    tune = TrainConfig(epochs=finetune, batch_size=128, lr=0.01, weight_decay=1e-4)
    dense = run.fresh_model()
    run.fit(dense, run.dense_path().parent, run.train, desc="dense", distill=False)
    records = [{"seed": seed, "student": "dense teacher", **_scores(run, dense, 0.0)}]
    robust_path = robust_teacher(run)
    records.append({"seed": seed, "student": "robust teacher (dense)",
                    **_scores(run, run.load(robust_path), 0.0)})
    pruned = copy.deepcopy(dense)
    mask = prune(pruned, "magnitude", "global", SPARSITY)
    for name, config in STUDENTS.items():
        start = time.perf_counter()
        if config == "robust-teacher":
            config = DistillConfig(teacher=str(robust_path), temperature=4.0, weight=0.5,
                                   **ROBUST)
        student_run = dataclasses.replace(run, distill=config)
        student = copy.deepcopy(pruned)
        student_run.fit(student, run.out / name.replace(" ", "-").replace(",", ""), tune,
                        hook=MaskHold(mask), desc=name, distill=config is not None)
        records.append({"seed": seed, "student": name,
                        **_scores(run, student, time.perf_counter() - start)})
    return records


def _scores(run: Run, model: torch.nn.Module, seconds: float) -> dict:
    accuracy, per_class = recalls(run, model)
    worst = min(range(len(per_class)), key=per_class.__getitem__)
    return {"accuracy": accuracy, "worst_class_recall": per_class[worst], "worst_class": worst,
            "per_class_recall": per_class, "seconds": seconds}


def summary(records: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["student"] for r in records):
        mine = [r for r in records if r["student"] == name]
        acc, acc_hw = interval([r["accuracy"] for r in mine])
        worst, worst_hw = interval([r["worst_class_recall"] for r in mine])
        rows.append({"student": name, "accuracy": f"{100 * acc:.2f} ± {100 * acc_hw:.2f}",
                     "worst-class recall": f"{100 * worst:.2f} ± {100 * worst_hw:.2f}",
                     "worst classes": " ".join(str(r["worst_class"]) for r in mine)})
    return rows


def paired(records: list[dict], a: str, b: str, key: str) -> tuple[float, float]:
    """Mean and 95% half-width of ``a - b`` over seeds for ``key``."""
    by_seed = {(r["seed"], r["student"]): r[key] for r in records}
    seeds = sorted({r["seed"] for r in records})
    return interval([by_seed[s, a] - by_seed[s, b] for s in seeds])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--finetune", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-robust-distill"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    start, records = time.perf_counter(), []
    for seed in range(args.seeds):
        records += run_seed(seed, args.epochs, args.finetune, args.out)
    print(markdown_table(summary(records), ["student", "accuracy", "worst-class recall",
                                            "worst classes"]))
    for other in ("plain distillation", "no distillation"):
        for key in ("worst_class_recall", "accuracy"):
            mean, hw = paired(records, "robust distillation", other, key)
            print(f"robust - {other}, {key}: {100 * mean:+.2f} ± {100 * hw:.2f} points")
    print(f"total {time.perf_counter() - start:.0f} s")
    write_results("robust_distill", records)


if __name__ == "__main__":
    main()
