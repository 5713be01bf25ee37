"""The ``prunekit`` command.

    prunekit run --backend torch --model resnet20 --dataset cifar10 --sparsity 0.9
    prunekit run --recipe examples/recipes/rpg-torch.yaml --prune-epochs 1
    prunekit run ... --resume              (continue from OUT/checkpoint after a crash)
    prunekit compare runs/a runs/b --out comparison.png [--x sparsity|flops]
    prunekit conformance [--backends torch,mindspore] [--out conformance-results]
    prunekit list
    prunekit export runs/latest --format onnx|mindir|torch|mindspore-ckpt

Errors that prunekit raises on purpose (bad settings, missing data, mismatched plans) are
printed as one line, ``prunekit: error: ...``, with exit status 2; nothing is written first.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import List, Optional

from prunekit.algorithms import PLANNED, algorithm_names
from prunekit.app.job import RunConfig, run
from prunekit.contract.backend import backend_names, backend_specs
from prunekit.errors import ConfigError, PrunekitError


def _none_or_int(text: str):
    """``all``/``none``: the whole set; otherwise a whole number (0 and below are refused by the
    run's validation, naming the key)."""
    if str(text).lower() in ("none", "all"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of images or 'all', got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes (an unknown flag, ``--lr abc``) end like every other prunekit error:
    one ``prunekit: error:`` line, exit status 2 (``--help`` shows the usage)."""

    def error(self, message):
        self.exit(2, f"prunekit: error: {message} (see {self.prog} --help)\n")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    d = RunConfig()
    p.add_argument("--backend", default=d.backend, help=f"{', '.join(backend_names())} (default %(default)s)")
    from prunekit.app.data import DATASETS
    from prunekit.app.model_sources import describe_sources
    from prunekit.contract.reference_models import MODELS
    p.add_argument("--model", default=d.model,
                   help=f"a reference model ({', '.join(MODELS)}; the only ones whose plans replay across backends), "
                        f"or {describe_sources()} (default %(default)s)")
    p.add_argument("--model-arg", dest="model_args", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword argument of a source or factory model (repeatable; value read as YAML; "
                        "model_args in a recipe)")
    p.add_argument("--num-classes", type=int, default=d.num_classes,
                   help="classes of the model's output (default: the data set's; must match it)")
    p.add_argument("--input-size", type=int, default=d.input_size,
                   help="folder data set: images resized (shorter side) and center-cropped to this (default 64)")
    p.add_argument("--weights", default=d.weights, metavar="FILE",
                   help="start from trained weights: a .npz of shared names, or the backend's own format ("
                        + ", ".join(f"{'/'.join(s.weight_suffixes)} for {s.name}" for s in backend_specs()
                                    if s.weight_suffixes)
                        + "), checked against the model before training")
    p.add_argument("--dataset", default=d.dataset,
                   help=f"{', '.join(DATASETS)} (folder: --data-root DIR with train/ and val/, or one sub-folder "
                        "per class; default %(default)s)")
    p.add_argument("--data-root", default=None,
                   help="data folder (cifar-10-batches-py, the JPEG zips, idx files, or an image folder)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="folder data set without val/: share of each class held out for testing (default %(default)s)")
    p.add_argument("--normalization", default=d.normalization,
                   help="computed, imagenet or MEAN/STD, e.g. 0.5,0.5,0.5/0.25,0.25,0.25 (default: the data set's "
                        "statistics; computed from the training images for a folder)")
    p.add_argument("--algorithm", default=d.algorithm,
                   help=f"pruning algorithm: {', '.join(algorithm_names())} (default %(default)s)")
    own = "(default: the algorithm's own)"
    p.add_argument("--sparsity", type=float, default=d.sparsity, help=f"final sparsity in [0, 1) {own}")
    p.add_argument("--granularity", default=d.granularity, choices=["unstructured", "channel"], help=own)
    p.add_argument("--scope", default=d.scope, choices=["global", "layer"], help=own)
    p.add_argument("--schedule", default=d.schedule, help=f"cubic, exponential or oneshot {own}")
    p.add_argument("--frequency", type=int, default=d.frequency, help=f"steps between mask updates {own}")
    p.add_argument("--end-fraction", type=float, default=d.end_fraction,
                   help=f"share of the pruning phase the algorithm's schedule runs over {own}")
    p.add_argument("--dense-epochs", type=int, default=d.dense_epochs)
    p.add_argument("--prune-epochs", type=int, default=d.prune_epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--optimizer", default=d.optimizer, help="sgd or adam")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--train-limit", type=_none_or_int, default=d.train_limit,
                   help="training images used, class-balanced ('all' for the full set; default %(default)s)")
    p.add_argument("--test-limit", type=_none_or_int, default=d.test_limit)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None, help="the backend's device, e.g. cpu or cuda; default: CPU")
    p.add_argument("--out", default=d.out, help="output folder (default %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--distributed", dest="distributed", action="store_const", const=True, default=None,
                   help="data-parallel training; start with the backend's launcher ("
                        + ", ".join(f"{s.launcher.split()[0]} for {s.name}" for s in backend_specs() if s.launcher)
                        + "), which also turns it on by itself")
    p.add_argument("--set", dest="params", action="append", default=[], metavar="KEY=VALUE",
                   help="an algorithm setting, e.g. --set partial_k=0.1 --set lam=0.5 (repeatable; the value is "
                        "read as YAML and checked against the algorithm's settings)")
    p.add_argument("--decompose-threshold", type=float, default=d.decompose_threshold,
                   help="TRP's `threshold` setting (the same as --set threshold=X): singular values kept by the "
                        "final decomposition (default: the algorithm's own, 0.05)")
    p.add_argument("--recipe", default=None, help="a YAML recipe; flags given beside it override its values")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="STEPS",
                   help="steps between checkpoints in OUT/checkpoint (default: once per epoch, and at phase ends; "
                        "0: none)")
    p.add_argument("--overwrite", action="store_true", default=d.overwrite,
                   help="replace the run already in OUT (without it, an OUT holding a run is refused)")
    p.add_argument("--resume", action="store_true", default=d.resume,
                   help="continue the run from OUT/checkpoint (an error if there is none or it does not match)")
    p.add_argument("--deterministic", action="store_true", default=d.deterministic,
                   help="deterministic kernels on one thread, so a resumed run matches an uninterrupted one bitwise")
    p.add_argument("--latency-batch", type=int, default=d.latency_batch, metavar="N",
                   help="channel pruning: time inference of the dense and the compacted model on batches of N "
                        "(default %(default)s; 0: no timing)")


def explicit_options(parser: argparse.ArgumentParser, argv: List[str]) -> set:
    """The destinations of the options that ``argv`` actually names (for recipe overrides)."""
    given = set()
    for action in parser._actions:
        for opt in action.option_strings:
            if any(tok == opt or tok.startswith(opt + "=") for tok in argv):
                given.add(action.dest)
    return given


def parse_settings(items: List[str], option: str = "--set") -> dict:
    """``["lam=0.5", "semantics=release"]`` -> ``{"lam": 0.5, "semantics": "release"}``."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} expects KEY=VALUE, got {item!r}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 as text: a number written so is a number
            for kind in (int, float):
                try:
                    parsed = kind(parsed)
                    break
                except ValueError:
                    pass
        out[key.strip()] = parsed
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = _Parser(prog="prunekit", description="Neural-network pruning on "
                                     + " and ".join(s.title or s.name for s in backend_specs()) + ".")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run_parser = sub.add_parser("run", help="train, prune and report on a reference model or your own")
    _add_run_args(run_parser)
    conf = sub.add_parser("conformance", help="check that the backends make identical decisions")
    conf.add_argument("--backends", default=",".join(backend_names()))
    conf.add_argument("--out", default="conformance-results")
    conf.add_argument("-k", dest="select", default=None, help="run only cases whose name contains this text")
    sub.add_parser("list", help="list models, algorithms, backends and datasets")
    cmp_parser = sub.add_parser("compare", help="plot test accuracy against measured sparsity or FLOPs across runs")
    cmp_parser.add_argument("runs", nargs="+", help="run output folders (each with a report.json)")
    cmp_parser.add_argument("--out", default="comparison.png", help="PNG file to write (default %(default)s)")
    cmp_parser.add_argument("--x", default="sparsity", choices=["sparsity", "flops"],
                            help="horizontal axis: measured sparsity or effective MACs (default %(default)s)")
    cmp_parser.add_argument("--accuracy", default=None,
                            help="accuracy key of the reports (default: after_decomposition, else after_pruning)")
    from prunekit.app.export import export_formats
    formats = export_formats()
    exp = sub.add_parser("export", help="export a run's pruned model ("
                         + ", ".join(f"{f}: {s} file, {b} backend" for f, (b, s) in formats.items()) + ")")
    exp.add_argument("run_dir", help="a run's output folder (weights.npz, report.json, plan.json)")
    exp.add_argument("--format", required=True, choices=list(formats))
    exp.add_argument("--out", default=None, help="output file (default: <run_dir>/model.<onnx|mindir|pt|ckpt>)")
    exp.add_argument("--check-batch", type=int, default=8, help="images the written file is checked on (default %(default)s)")
    exp.add_argument("--tolerance", type=float, default=1e-4,
                     help="max output difference allowed, relative to max(1, max |logit|) (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            fields = {f.name for f in dataclasses.fields(RunConfig)}
            values = {k: v for k, v in vars(args).items() if k in fields}
            values["params"] = parse_settings(values.get("params", []))
            values["model_args"] = parse_settings(values.get("model_args", []), "--model-arg")
            if args.recipe:
                from prunekit.app.recipe import load_recipe
                given = explicit_options(run_parser, list(argv if argv is not None else sys.argv[1:]))
                cfg = load_recipe(args.recipe, {k: v for k, v in values.items() if k in given})
            else:
                cfg = RunConfig(**values)
            run(cfg)
            return 0
        if args.command == "compare":
            from prunekit.app.plots import comparison_points, load_run_reports, plot_comparison
            points = comparison_points(load_run_reports(args.runs), args.x, args.accuracy)
            if not args.out.lower().endswith(".png"):
                raise ConfigError(f"--out must name a .png file, got {args.out!r}")
            plot_comparison(points, args.out, args.x)
            for p in points:
                print(f"{p['label']}: {args.x} {p['x']:.4g}, test accuracy {p['accuracy']:.2%}")
            print(f"comparison: {args.out}")
            return 0
        if args.command == "conformance":
            from prunekit.conformance.runner import main as conformance_main
            return conformance_main([b for b in args.backends.split(",") if b], args.out, args.select)
        if args.command == "export":
            from prunekit.app.export import export_run
            result = export_run(args.run_dir, args.format, args.out, args.check_batch, args.tolerance)
            extra = f" (structure: {result['structure']})" if result.get("structure") else ""
            print(f"wrote {result['path']}{extra}; outputs on {result['check_batch']} images differ from the "
                  f"{result['source_backend']} model by at most {result['max_abs_diff']:.3g}")
            return 0
        if args.command == "list":
            from prunekit.app.data import DATASETS
            from prunekit.app.model_sources import available_sources
            from prunekit.contract.reference_models import MODELS
            print("models:     " + ", ".join(MODELS) + " (reference models: plans replay across backends)")
            sources = available_sources()
            print("sources:    " + "; ".join(f"{', '.join(f'{s}:NAME' for s in v)} ({b})" for b, v in sources.items())
                  + ("; " if sources else "") + "package.module:function (your factory, any backend)")
            print("algorithms: " + ", ".join(algorithm_names()) + (f" (planned: {', '.join(PLANNED)})" if PLANNED else ""))
            print("backends:   " + ", ".join(backend_names()))
            print("datasets:   " + ", ".join(DATASETS))
            return 0
    except PrunekitError as e:
        print(f"prunekit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine refused a read or write (full disk, permissions changed meanwhile)
        print(f"prunekit: error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
