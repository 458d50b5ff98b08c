"""The ``prunescope`` command line: demo, run, train, prune, transfer, evaluate, inspect,
export, list, audit, report, explain, erase, prune-data.

Every user error ends in one line ``error: <what is wrong and how to fix it>`` on stderr and
exit code 2; an interrupted run says how to resume. Nothing that imports torch is imported before
a handler needs it, and a recipe file is read (:mod:`prunescope.yamlfile`) before that, so a
missing or malformed recipe is reported at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from pathlib import Path

from prunescope import __version__, logs, yamlfile
from prunescope.errors import PrunescopeError

EXIT_USAGE = 2
# The fine-tuning defaults of prunescope.pipeline.FINETUNE, for --help without importing torch
# (tests/test_cli.py checks that they agree)
FINETUNE_LR, FINETUNE_EPOCHS = 0.01, 2


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` to an option's help unless the option is required, has no default
    (its help says what omitting it does) or the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or action.default in (None, []) or action.default is argparse.SUPPRESS
                or "default" in text or not action.option_strings):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage in one line and shows every option's default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"error: {message}; see '{self.prog} --help'\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prunescope`` console script; returns the exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logs.setup()
    try:
        return args.handler(args) or 0
    except PrunescopeError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except OSError as exc:  # e.g. --out names a file, no permission, disk full
        _error(f"{exc}; check the paths and their permissions")
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 130


def _error(message: str) -> None:
    """One ``error:`` line; under torchrun, once per machine (every process meets the same
    recipe error)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prunescope",
                     description="Make PyTorch networks sparse and show what the sparsity costs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser("demo", help="the main job: LeNet-300-100 on MNIST, 10 methods x "
                               "6 sparsities, table and plot")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    _add_common(demo)
    demo.set_defaults(handler=_demo)

    run = commands.add_parser("run", help="run a recipe: train dense, prune, fine-tune, evaluate")
    run.add_argument("recipe", help="YAML recipe (see recipes/)")
    run.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    _add_common(run)
    run.set_defaults(handler=_run)

    train = commands.add_parser("train", help="train a dense model (a recipe's dense stage)")
    train.add_argument("recipe", nargs="?", help="YAML recipe (default: MNIST LeNet-300-100)")
    train.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    _add_common(train)
    train.set_defaults(handler=_train)

    prune = commands.add_parser("prune", help="prune a checkpoint, optionally fine-tune it")
    prune.add_argument("--checkpoint", required=True, help="a model.safetensors from a run")
    prune.add_argument("--criterion", default="magnitude",
                       help="how weights are scored (see 'prunescope list')")
    prune.add_argument("--allocation", default="global",
                       help="how the sparsity is spread over the layers (see 'prunescope list')")
    prune.add_argument("--sparsity", type=float,
                       help="fraction of weights pruned, in [0, 1); omit for an N:M pattern, "
                       "which fixes it (default: none)")
    prune.add_argument("--pattern", default="unstructured", help="unstructured, N:M or block:RxC")
    prune.add_argument("--effective", action="store_true",
                       help="reach the sparsity as effective sparsity")
    prune.add_argument("--finetune-epochs", type=int, default=0,
                       help="epochs of fine-tuning with the mask held (0: none)")
    prune.add_argument("--bn-recalibration", type=int, default=0, metavar="BATCHES",
                       help="re-estimate batch-norm statistics on this many batches of 100")
    prune.add_argument("--lr", type=float,
                       help=f"fine-tuning learning rate (default: {FINETUNE_LR:g}, the "
                       "pipeline's fine-tuning default)")
    prune.add_argument("--min-density", type=float,
                       help="per-layer floor of kept weights, in [0, 1); 0 lets a layer be "
                       "pruned away (default: one weight per output unit)")
    prune.add_argument("--sparse-kernels", action="store_true",
                       help="fine-tune on the sparse kernels where measured faster (prints the "
                       "choice per layer; see docs/kernels.md)")
    prune.add_argument("--data-root",
                       help="dataset directory, if the checkpoint's dataset needs one "
                       "(default: the one recorded in the checkpoint)")
    _add_device(prune)
    prune.add_argument("--out", required=True, help="output directory")
    _add_progress(prune)
    prune.set_defaults(handler=_prune)

    transfer = commands.add_parser(
        "transfer", help="sparse transfer: fine-tune a sparse checkpoint on another dataset "
                         "with its mask held (new head and unfitting layers train dense)")
    transfer.add_argument("--checkpoint", required=True,
                          help="a sparse model.safetensors (from prune or run)")
    transfer.add_argument("--dataset", required=True, help="the target dataset (see 'list')")
    transfer.add_argument("--epochs", type=int,
                          help=f"epochs of training on the target (default: {FINETUNE_EPOCHS}, "
                          "the pipeline's fine-tuning default)")
    transfer.add_argument("--lr", type=float, help=f"learning rate (default: {FINETUNE_LR:g}, "
                          "the pipeline's fine-tuning default)")
    transfer.add_argument("--sparse-kernels", action="store_true",
                          help="train on the sparse kernels where measured faster")
    transfer.add_argument("--data-root", help="the target dataset's directory, if it needs one "
                          "(default: none)")
    transfer.add_argument("--seed", type=int, default=0,
                          help="the target's split, the new layers' initialisation, shuffling")
    _add_device(transfer)
    transfer.add_argument("--out", required=True, help="output directory")
    _add_progress(transfer)
    transfer.set_defaults(handler=_transfer)

    evaluate = commands.add_parser("evaluate", help="accuracy and sparsity of a checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help="a model.safetensors from a run, "
                          "or a file of 'prunescope export --format sparse' (run from the file "
                          "on the sparse kernels, on the CPU)")
    evaluate.add_argument("--split", choices=("train", "val", "test"), default="test",
                          help="the split of the checkpoint's dataset to evaluate on")
    evaluate.add_argument("--data-root", help="dataset directory, if the dataset needs one "
                          "(default: the one recorded in the checkpoint)")
    evaluate.add_argument("--sparse-kernels", action="store_true",
                          help="infer on the sparse kernels where measured faster (prints the "
                          "choice per layer and the time of the pass)")
    evaluate.add_argument("--level", type=float, help="the level (sparsity) of a nested "
                          "checkpoint to evaluate (an elsa run's nested.safetensors; default: "
                          "none, required for a nested checkpoint)")
    _add_device(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    inspect = commands.add_parser("inspect", help="per-layer and global sparsity, model, "
                                  "dataset and epoch of a checkpoint or mask file (loads no data)")
    inspect.add_argument("file", metavar="CHECKPOINT",
                         help="a checkpoint (model.safetensors, last.safetensors) or a "
                         "mask.safetensors")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--level", type=float, help="the level of a nested checkpoint whose "
                         "layers to show (default: the sparsest)")
    inspect.set_defaults(handler=_inspect)

    export = commands.add_parser("export", help="write a checkpoint for deployment: compact "
                                 "(nonzero values + indices), sparse (runs on prunescope's "
                                 "kernels), ONNX (dense with zeros) or a Hugging Face folder")
    export.add_argument("file", metavar="CHECKPOINT", help="a model.safetensors from a run")
    export.add_argument("--format", choices=("compact", "sparse", "onnx", "huggingface"),
                        default="compact",
                        help="compact: safetensors of the kept values and their indices "
                        "(prunescope.export.load_compact reads it back); sparse: the model for "
                        "sparse inference on prunescope's kernels, architecture and fingerprint "
                        "included (prunescope evaluate --checkpoint FILE runs it; "
                        "prunescope.kernels.runtime.load in Python); onnx: the model with "
                        "its zeros, needs pip install 'prunescope[onnx]'; huggingface: a "
                        "folder transformers' from_pretrained loads (config, safetensors, "
                        "tokenizer), with the mask beside it")
    export.add_argument("--out", required=True, help="the file (the folder for huggingface) "
                        "to write")
    export.set_defaults(handler=_export)

    listing = commands.add_parser("list", help="registered models, datasets, criteria, ...")
    listing.set_defaults(handler=_list)

    audit = commands.add_parser("audit", help="who pays for sparsity: compare dense and "
                                "compressed runs, write audit.json and report.html")
    audit.add_argument("--dense", nargs="+", required=True, metavar="RUN",
                       help="dense run directories (each holding a model.safetensors); several "
                       "seeds form a population")
    audit.add_argument("--compressed", nargs="+", required=True, metavar="RUN",
                       help="compressed run directories; runs of one method and sparsity form "
                       "a population")
    audit.add_argument("--out", required=True, help="directory for audit.json and report.html")
    audit.add_argument("--split", choices=("train", "val", "test"), default="test")
    audit.add_argument("--bootstrap", type=int, default=100,
                       help="bootstrap resamples for the confidence intervals (0: none)")
    audit.add_argument("--data-root", help="dataset directory, if the dataset needs one")
    audit.add_argument("--cache-dir", help="where computed predictions are kept for the next "
                       "audit (default: OUT/.cache/predictions; input runs are never written)")
    audit.set_defaults(handler=_audit)

    report = commands.add_parser("report", help="re-render report.html from an audit.json "
                                 "(needs no torch)")
    report.add_argument("audit_json", metavar="audit.json")
    report.add_argument("--out", help="HTML file (default: report.html beside the JSON)")
    report.set_defaults(handler=_report)

    explain = commands.add_parser("explain", help="SPADE: saliency maps of one input on the "
                                  "network and on a copy pruned for that input; PNGs + HTML")
    explain.add_argument("--checkpoint", required=True, help="a model.safetensors from a run")
    explain.add_argument("--input", required=True,
                         help="test:N / val:N / train:N (the checkpoint's dataset), or a .png, "
                         ".jpg or .npy image with pixels in [0, 1]")
    explain.add_argument("--out", default="runs/explain", help="directory (default: runs/explain)")
    explain.add_argument("--methods", nargs="+", help="saliency methods (default: all)")
    explain.add_argument("--target", type=int, help="class to explain (default: the prediction)")
    explain.add_argument("--sparsity", type=float, help="sparsity of the pruned copy")
    explain.add_argument("--augmentations", type=int, help="size of the augmentation batch")
    explain.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                         help="feed each layer the pruned layers' outputs")
    explain.add_argument("--data-root", help="dataset directory, if the dataset needs one")
    explain.set_defaults(handler=_explain)
    _add_erase(commands)
    _add_prune_data(commands)
    return parser


def _add_prune_data(commands) -> None:
    prune_data = commands.add_parser(
        "prune-data", help="prune a training set (random, EL2N, forgetting; DRoP class quotas) "
        "and train on what is left; kept.json + result.json")
    prune_data.add_argument("--dataset", default="mnist_lt", help="dataset name")
    prune_data.add_argument("--model", default="lenet300", help="model name")
    prune_data.add_argument("--density", type=float, required=True,
                            help="kept fraction of the training set, in (0, 1]")
    prune_data.add_argument("--strategy", default="random",
                            help="random, el2n or forgetting (higher scores kept)")
    prune_data.add_argument("--quota", default="none",
                            help="none, drop_code (1 - recall) or drop_paper (N_k (1 - recall))")
    for name, default, text in (("query-models", 3, "DRoP query models"),
                                ("query-epochs", 2, "epochs of each query model"),
                                ("score-models", 3, "EL2N scoring models"),
                                ("score-epochs", 2, "epochs of each scoring model")):
        prune_data.add_argument(f"--{name}", type=int, default=default, help=text)
    prune_data.add_argument("--epochs", type=int, default=10,
                            help="E, epochs on the full data; the pruned set trains "
                            "floor((0.5 + 0.5 d) E / d)")
    prune_data.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    prune_data.add_argument("--batch-size", type=int, default=128, help="batch size")
    prune_data.add_argument("--seed", type=int, default=0, help="seed of splits, models, "
                            "selection")
    prune_data.add_argument("--no-train", dest="fit", action="store_false",
                            help="write kept.json only")
    prune_data.add_argument("--data-root", help="dataset directory, if the dataset needs one")
    _add_device(prune_data)
    prune_data.add_argument("--out", required=True, help="output directory")
    prune_data.set_defaults(handler=_prune_data)


def _add_erase(commands) -> None:
    erase = commands.add_parser("erase", help="SSSE: erase training samples from a checkpoint "
                                "with one second-order step; erased model + result.json")
    erase.add_argument("--checkpoint", required=True, help="a model.safetensors from a run")
    chosen = erase.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--class", dest="label", metavar="K",
                        help="erase the training samples of class K (index or name); one of "
                        "--class, --group, --samples, no default")
    chosen.add_argument("--group", metavar="G",
                        help="erase the training samples of group G (index or name; datasets "
                        "with groups, e.g. mnist_lt, colored_mnist); no default")
    chosen.add_argument("--samples", metavar="FILE",
                        help="erase these positions in the training split (a JSON list, or "
                        "integers separated by spaces, commas or newlines); no default")
    erase.add_argument("--fraction", type=float, default=1.0,
                       help="with --class or --group: erase this seeded fraction of it")
    erase.add_argument("--epsilon", type=float, default=1e-3,
                       help="step size of the update (1: the plain Newton step, which "
                       "overshoots on MNIST; see docs/erasure.md)")
    erase.add_argument("--dampening", type=float, default=0.1,
                       help="Fisher dampening, relative to the mean Fisher diagonal")
    erase.add_argument("--block-size", type=int, default=128,
                       help="weights per Fisher block (per tensor, the largest divisor of its "
                       "size up to this)")
    erase.add_argument("--fisher-samples", type=int, default=1024,
                       help="training examples whose gradients form the Fisher")
    erase.add_argument("--seed", type=int, default=0,
                       help="draws the Fisher's examples and the --fraction subset")
    erase.add_argument("--data-root", help="dataset directory, if the dataset needs one "
                       "(default: the one recorded in the checkpoint)")
    _add_device(erase)
    erase.add_argument("--out", required=True, help="output directory")
    erase.set_defaults(handler=_erase)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.epochs=2 (repeatable; "
                        "default: none)")
    parser.add_argument("--seed", type=int, help="seed of init, split, shuffling and random "
                        "criteria (same as --set seed=N; default: the recipe's)")
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                        help="deterministic algorithms (default: the recipe's, true)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (a GPU when there is "
                        "one); same as --set device=... (default: the recipe's)")
    _add_progress(parser)


def _add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: when stderr is a terminal)")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="where the model computes: cpu, cuda, cuda:N, mps or "
                        "auto (a GPU when there is one) (default: cpu)")


def _overrides(args) -> list[str]:
    """``--set`` items plus the ``--seed`` / ``--deterministic`` / ``--device`` shortcuts."""
    extra = [] if args.seed is None else [f"seed={args.seed}"]
    if args.deterministic is not None:
        extra.append(f"deterministic={str(args.deterministic).lower()}")
    if args.device is not None:
        extra.append(f"device={json.dumps(args.device)}")  # a YAML string, whatever it holds
    return [*args.overrides, *extra]


def _demo(args) -> int:
    from prunescope import recipe

    source = resources.files("prunescope") / "recipes" / "demo.yaml"
    with resources.as_file(source) as path:
        loaded = recipe.load(path, _overrides(args))
    return _run_recipe(loaded, Path(args.out), args.progress)


def _run(args) -> int:
    raw = yamlfile.read(args.recipe)  # before torch is imported: a bad path fails at once
    from prunescope import recipe

    loaded = recipe.from_dict(raw, _overrides(args), source=str(args.recipe))
    return _run_recipe(loaded, Path(args.out or f"runs/{loaded.name}"), args.progress)


def _train(args) -> int:
    from dataclasses import replace

    raw = yamlfile.read(args.recipe) if args.recipe else {"name": "dense"}
    from prunescope import recipe

    loaded = recipe.from_dict(raw, _overrides(args), source=str(args.recipe or "recipe"))
    loaded = replace(loaded, prune=None, finetune=None)
    return _run_recipe(loaded, Path(args.out or f"runs/{loaded.name}"), args.progress)


def _run_recipe(loaded, out: Path, progress: bool | None) -> int:
    from prunescope import distributed, experiment
    from prunescope.tables import format_results

    try:
        results = experiment.run(loaded, out, progress=progress)
    finally:
        distributed.teardown()
    if not distributed.is_writer():
        return 0
    print(format_results(results))
    print(f"\nresults: {out / 'results.json'}")
    if results["runs"]:
        print(f"plot:    {out / 'accuracy_vs_sparsity.png'}")
    if (out / "report.html").is_file():
        print(f"report:  {out / 'report.html'}")
    return 0


def _audit(args) -> int:
    from prunescope.audit import run_audit
    from prunescope.errors import ConfigError

    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    run_audit(args.dense, args.compressed, Path(args.out), split=args.split,
              n_boot=args.bootstrap, data_root=args.data_root,
              cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    print(f"audit:  {Path(args.out) / 'audit.json'}\nreport: {Path(args.out) / 'report.html'}")
    return 0


def _report(args) -> int:
    from prunescope.report import rerender

    print(f"report: {rerender(args.audit_json, args.out)}")
    return 0


def _explain(args) -> int:
    from prunescope.spade import DEFAULT_METHODS
    from prunescope.spade.command import config_from, explain_checkpoint

    result = explain_checkpoint(
        Path(args.checkpoint), args.input, Path(args.out),
        config=config_from(args.sparsity, args.augmentations, args.sequential),
        methods=args.methods or DEFAULT_METHODS, target=args.target, data_root=args.data_root)
    print(json.dumps(result, indent=2))
    return 0


def _prune(args) -> int:
    from prunescope import commands

    result = commands.prune_checkpoint(
        Path(args.checkpoint), Path(args.out), criterion=args.criterion,
        allocation=args.allocation, sparsity=args.sparsity, pattern=args.pattern,
        effective=args.effective, finetune_epochs=args.finetune_epochs, lr=args.lr,
        sparse_kernels=args.sparse_kernels, min_density=args.min_density,
        bn_recalibration=args.bn_recalibration,
        data_root=args.data_root, progress=args.progress, device=args.device,
    )
    print(json.dumps(result, indent=2))
    return 0


def _transfer(args) -> int:
    from prunescope import commands

    result = commands.transfer_checkpoint(
        Path(args.checkpoint), args.dataset, Path(args.out), epochs=args.epochs, lr=args.lr,
        sparse_kernels=args.sparse_kernels, data_root=args.data_root, progress=args.progress,
        seed=args.seed, device=args.device,
    )
    print(json.dumps(result, indent=2))
    return 0


def _evaluate(args) -> int:
    from prunescope import commands
    from prunescope.kernels import sparse_file

    if sparse_file.is_sparse_file(args.checkpoint):
        return _evaluate_sparse(args)
    print(json.dumps(commands.evaluate_checkpoint(Path(args.checkpoint), args.split,
                                                  args.data_root,
                                                  sparse_kernels=args.sparse_kernels,
                                                  device=args.device, level=args.level),
                     indent=2))
    return 0


def _evaluate_sparse(args) -> int:
    """``evaluate`` of a sparse inference file: runs from the file on the kernels (CPU only)."""
    from prunescope.errors import ConfigError
    from prunescope.kernels import runtime

    if args.level is not None:
        raise ConfigError(f"{args.checkpoint} is a sparse inference file, which has no levels; "
                          "drop --level")
    if args.device not in (None, "cpu"):
        raise ConfigError(f"{args.checkpoint} is a sparse inference file, which runs on the "
                          f"CPU kernels; drop --device {args.device}")
    print(json.dumps(runtime.evaluate(args.checkpoint, args.split, args.data_root), indent=2))
    return 0


def _erase(args) -> int:
    from prunescope.erasure import EraseSpec, erase_checkpoint

    spec = EraseSpec(epsilon=args.epsilon, dampening=args.dampening,
                     block_size=args.block_size, fisher_samples=args.fisher_samples,
                     seed=args.seed)
    result = erase_checkpoint(Path(args.checkpoint), Path(args.out), label=args.label,
                              samples=Path(args.samples) if args.samples else None,
                              group=args.group,
                              fraction=args.fraction, spec=spec, data_root=args.data_root,
                              device=args.device)
    print(json.dumps(result, indent=2))
    return 0


def _prune_data(args) -> int:
    from prunescope.data_pruning import DataPruningSpec
    from prunescope.data_pruning.command import prune_data_command
    from prunescope.train import TrainConfig

    spec = DataPruningSpec(args.density, args.strategy, args.quota, args.query_models,
                           args.query_epochs, args.score_models, args.score_epochs)
    train = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    result = prune_data_command(args.dataset, args.model, Path(args.out), spec, train,
                                seed=args.seed, root=args.data_root, device=args.device,
                                fit=args.fit)
    print(json.dumps(result, indent=2))
    return 0


def _inspect(args) -> int:
    from prunescope import export, nested

    if args.level is not None or nested.is_nested(args.file):
        info = nested.inspect(args.file, args.level)
        text = export.format_inspection(info) + "\n" + nested.format_levels(info)
    else:
        info = export.inspect(args.file)
        text = export.format_inspection(info)
    print(json.dumps(info, indent=2) if args.json else text)
    return 0


def _export(args) -> int:
    from prunescope import export

    print(json.dumps(export.export(args.file, args.out, args.format), indent=2))
    return 0


def _list(args) -> int:
    from prunescope import data, models
    from prunescope.allocation import ALLOCATIONS
    from prunescope.criteria import CRITERIA
    from prunescope.schedules import SCHEDULES

    for title, names in (("models", models.names()), ("datasets", data.names()),
                         ("criteria", CRITERIA.names()), ("allocations", ALLOCATIONS.names()),
                         ("patterns", ["unstructured", "N:M (e.g. 2:4)", "block:RxC"]),
                         ("schedules", SCHEDULES.names())):
        print(f"{title:12s} {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
