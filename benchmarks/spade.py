"""SPADE saliency-accuracy benchmark: locating a backdoor trigger, with and without SPADE.

After the protocol of Soltani Moakhar et al. (ICML 2024, the "Trojan AUC" of their Table 1): a
model is trained on MNIST where a fraction of the training images carry a small checkerboard
patch (the trigger) in one of the four corners, chosen at random, and are relabelled to the
target class. On triggered test
images that the model sends to the target class, the trigger's pixels are the true evidence for
the decision. Each saliency method's map is scored by the ROC AUC of its pixel values at picking
out the trigger pixels, on the original network and on the image's SPADE trace, averaged over the
images.

SPADE's default settings were chosen on the first 120 triggered test images; the reported
images are the next 120 (``--offset``), so the figures are not measured on what was tuned.
The backdoored model is trained once into runs/bench-spade/ (reused afterwards). Prints a table
and writes bench/results/spade.json: a list of records
``{"saliency", "auc_original", "auc_spade", "images", ...}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from common import RESULTS, markdown_table

from prunescope import checkpoint, data, models
from prunescope.data import Splits, Subset
from prunescope.files import write_json
from prunescope.spade import Augmentations, SpadeConfig, explain, localisation_auc
from prunescope.train import FINAL, TrainConfig, evaluate, fit

RUN_DIR = Path(__file__).resolve().parent.parent / "runs" / "bench-spade"
TARGET, POISON_FRACTION, SEED = 0, 0.1, 0
PATCH = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0],
                      [1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])  # a 4x4 checkerboard
MARGIN = 1  # pixels between the trigger and the image border
TUNING_IMAGES = 120  # SpadeConfig's defaults were chosen on the first 120 triggered test images
METHODS = ("gradient", "integrated_gradients", "input_x_gradient", "guided_backprop",
           "smoothgrad")


def add_trigger(x: torch.Tensor, splits: Splits, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images ``[N, 1, H, W]`` with the trigger pasted in a random corner of each,
    and the evidence masks (bool ``[N, H, W]``, True on the trigger's pixels)."""
    out, evidence = x.clone(), torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool)
    size, far = PATCH.shape[0], x.shape[-1] - PATCH.shape[0] - MARGIN
    corners = torch.tensor([[MARGIN, MARGIN], [MARGIN, far], [far, MARGIN], [far, far]])
    chosen = corners[torch.randint(0, 4, (len(x),), generator=generator)]
    patch = (PATCH - splits.mean[0]) / splits.std[0]
    for i, (r, c) in enumerate(chosen.tolist()):
        out[i, :, r:r + size, c:c + size] = patch
        evidence[i, r:r + size, c:c + size] = True
    return out, evidence


def poisoned(splits: Splits) -> Splits:
    """The splits with ``POISON_FRACTION`` of the training images triggered and relabelled."""
    generator = torch.Generator().manual_seed(SEED)
    train = splits.train
    chosen = torch.randperm(len(train), generator=generator)[:int(POISON_FRACTION * len(train))]
    x, y = train.x.clone(), train.y.clone()
    x[chosen] = add_trigger(x[chosen], splits, generator)[0]
    y[chosen] = TARGET
    return dataclasses.replace(splits, train=Subset(x, y, train.index))


def backdoored_model(splits: Splits, name: str, epochs: int) -> torch.nn.Module:
    """Train (or reuse) ``name`` on the poisoned training set."""
    run_dir = RUN_DIR / f"{name}-e{epochs}-checkerboard{PATCH.shape[0]}-corners-p{POISON_FRACTION}"
    torch.manual_seed(SEED)
    model = models.build(name, num_classes=10)
    if (run_dir / FINAL).exists():
        checkpoint.load_model_state(model, checkpoint.load(run_dir / FINAL).model, run_dir)
        return model
    config = TrainConfig(epochs=epochs, batch_size=128, lr=0.05, weight_decay=1e-4)
    fit(model, poisoned(splits), config, run_dir, seed=SEED,
        meta={"model": checkpoint.model_spec(model, 10)}, desc=f"backdoor {name}")
    return model


def triggered_test(model: torch.nn.Module, splits: Splits
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Triggered test images of other classes that the model sends to TARGET, their evidence
    masks, and the attack's success rate over all of them."""
    test = splits.test
    x, evidence = add_trigger(test.x[test.y != TARGET], splits,
                              torch.Generator().manual_seed(SEED + 1))
    with torch.no_grad():
        hit = model.eval()(x).argmax(1) == TARGET
    return x[hit], evidence[hit], float(hit.double().mean())


def run(args: argparse.Namespace) -> list[dict]:
    splits = data.load("mnist", seed=SEED)
    model = backdoored_model(splits, args.model, args.epochs)
    clean = evaluate(model, splits.test)["accuracy"]
    images, evidences, success = triggered_test(model, splits)
    held_out = slice(args.offset, args.offset + args.images)
    images, evidences = images[held_out], evidences[held_out]
    if len(images) < args.images:
        raise SystemExit(f"only {len(images)} triggered test images after offset {args.offset}")
    print(f"{args.model}: clean test accuracy {clean:.4f}, attack success {success:.4f}")
    black = torch.full((1, 1, 1), -splits.mean[0] / splits.std[0])
    config = SpadeConfig(sparsity=args.sparsity, augmentations=Augmentations(
        count=args.augmentations, shift=args.shift, rotate=args.rotate, scale=args.scale,
        noise=args.noise), exclude=tuple(args.exclude), sequential=args.sequential,
        bias=not args.no_bias, output_layer=args.output_layer)
    scores: dict[str, dict[str, list[float]]] = {m: {"original": [], "spade": []}
                                                  for m in METHODS}
    seconds, kept = [], 0
    for image, evidence in zip(images, evidences, strict=True):
        started = time.perf_counter()
        explanation = explain(model, image, methods=METHODS, target=TARGET, baseline=black,
                              config=config)
        seconds.append(time.perf_counter() - started)
        kept += explanation.prediction("spade") == TARGET
        for method, maps in explanation.maps.items():
            for key, saliency in maps.items():
                scores[method][key].append(localisation_auc(saliency, evidence))
    print(f"{len(images)} triggered test images; the SPADE trace still predicts the target on "
          f"{kept}; one explanation ({len(METHODS)} methods x 2 networks) takes "
          f"{statistics.median(seconds):.2f} s (median)")
    return [{"saliency": method, "auc_original": statistics.mean(s["original"]),
             "auc_spade": statistics.mean(s["spade"]), "images": len(images),
             "spade_better_on": sum(b > a for a, b in zip(s["original"], s["spade"],
                                                            strict=True)) / len(images),
             "model": args.model, "trace_sparsity": args.sparsity,
             "seconds_per_explanation": statistics.median(seconds)}
            for method, s in scores.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet300")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--offset", type=int, default=TUNING_IMAGES,
                        help="skip this many triggered images (the defaults were tuned on the "
                             f"first {TUNING_IMAGES}; the report uses images after them)")
    parser.add_argument("--sparsity", type=float, default=SpadeConfig().sparsity)
    defaults = Augmentations()
    parser.add_argument("--augmentations", type=int, default=defaults.count)
    parser.add_argument("--shift", type=float, default=defaults.shift)
    parser.add_argument("--rotate", type=float, default=defaults.rotate)
    parser.add_argument("--scale", type=float, default=defaults.scale)
    parser.add_argument("--noise", type=float, default=defaults.noise)
    parser.add_argument("--exclude", nargs="*", default=[])
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--no-bias", action="store_true")
    parser.add_argument("--output-layer", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(RESULTS / "spade.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    records = run(args)
    print(markdown_table(records, ["saliency", "auc_original", "auc_spade", "spade_better_on",
                                   "images"]))
    write_json(args.out, records)
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
