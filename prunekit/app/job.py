"""The main job: train a reference model on real data, prune it, measure it, write a report.

Phases, on the chosen backend:
1. dense training for ``dense_epochs`` (skipped when 0), then test accuracy "before pruning";
2. pruning for ``prune_epochs``: the algorithm's schedule runs over the first
   ``end_fraction`` of this phase and the rest fine-tunes at the final masks;
3. test accuracy "after pruning", a report measured from the model's weights, the pruning
   plan (JSON + npz) and the final weights (npz) in the output folder.

Every setting is validated before data is read or a file is written.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np

from prunekit.algorithms import DEFAULT_ALGORITHM, algorithm_class, algorithm_config, make_algorithm, setting_types
from prunekit.app import checkpoint, run_inputs
from prunekit.app import data as datasets
from prunekit.app.divergence import DivergenceError, failed_run
from prunekit.app.distributed import check_batch_size, parallel_backend, start_distributed
from prunekit.app.plots import write_run_plots
from prunekit.app.report import build_report, format_report, save_report
from prunekit.app.resume import init_decision, resume_at_init
from prunekit.app.run_state import RunProgress
from prunekit.app.validation import check_run_config, check_run_environment
from prunekit.contract.backend import check_backend_name, default_backend_name, get_backend
from prunekit.decisions.flops import count_handle
from prunekit.decisions.selection import check_sparsity
from prunekit.errors import ConfigError


@dataclass
class RunConfig:
    backend: str = field(default_factory=default_backend_name)
    model: str = "resnet20"
    dataset: str = "cifar10"
    data_root: Optional[str] = None
    algorithm: str = DEFAULT_ALGORITHM
    # the algorithm's common settings: None leaves the algorithm's own default (``algorithm_kwargs``)
    sparsity: Optional[float] = None
    granularity: Optional[str] = None
    scope: Optional[str] = None
    schedule: Optional[str] = None
    frequency: Optional[int] = None  # steps between mask updates
    end_fraction: Optional[float] = None
    dense_epochs: int = 3
    prune_epochs: int = 3
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    train_limit: Optional[int] = 10000
    test_limit: Optional[int] = 2000
    augment: bool = True
    seed: int = 0
    device: Optional[str] = None
    out: str = "runs/latest"
    progress: bool = True
    distributed: Optional[bool] = None  # data parallel (torchrun / msrun); None: when launched by one
    params: Dict[str, Any] = field(default_factory=dict)  # algorithm hyperparameters (--set key=value)
    decompose_threshold: Optional[float] = None  # TRP's ``threshold`` setting, by its command-line name
    checkpoint_every: Optional[int] = None  # steps between checkpoints; None: once per epoch; 0: none
    resume: bool = False  # continue from <out>/checkpoint (an error if there is none)
    deterministic: bool = False  # deterministic kernels, one thread: bitwise-reproducible resumes on CPU
    latency_batch: int = 64  # channel pruning: batch of the dense-vs-compacted inference timing (0: none)
    # a user's own model, weights and images (prunekit.app.run_inputs)
    model_args: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of a source/factory model
    num_classes: Optional[int] = None  # the model's classes (default: the data set's; must match it)
    input_size: Optional[int] = None  # folder data set: images resized/cropped to this (default 64)
    weights: Optional[str] = None  # start from these weights (.npz of shared names, or the backend's format)
    val_fraction: float = 0.2  # folder data set without val/: share of each class held out for testing
    normalization: Optional[str] = None  # computed, imagenet or MEAN/STD (default: the data set's own)
    overwrite: bool = False  # replace the run already in <out> (without it, or resume, such an out is refused)

    def validate(self) -> "RunConfig":
        check_run_config(self)  # types, ranges and choices of every field (prunekit.app.validation)
        self.backend = check_backend_name(self.backend)
        self.algorithm = algorithm_class(self.algorithm).name
        if self.sparsity is not None:
            self.sparsity = check_sparsity(self.sparsity)
        self.dataset = datasets.check_dataset_name(self.dataset)
        run_inputs.check_settings(self)  # the model (reference, source or factory) and its inputs
        for key in ("dense_epochs", "prune_epochs"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{key} must be a non-negative integer, got {v!r}")
        if self.prune_epochs < 1:
            raise ConfigError(f"prune_epochs must be >= 1 to prune, got {self.prune_epochs}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.checkpoint_every is not None and (isinstance(self.checkpoint_every, bool)
                                                  or not isinstance(self.checkpoint_every, int)
                                                  or self.checkpoint_every < 0):
            raise ConfigError(f"checkpoint_every must be a non-negative integer or None, got {self.checkpoint_every!r}")
        if isinstance(self.latency_batch, bool) or not isinstance(self.latency_batch, int) or self.latency_batch < 0:
            raise ConfigError(f"latency_batch must be a non-negative integer (0: no timing), got {self.latency_batch!r}")
        for key in ("train_limit", "test_limit"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{key} must be a positive integer or None, got {v!r}")
        # builds the algorithm config once, so its own checks (granularity, scope, ...) run now
        self.algorithm_kwargs()
        return self

    def common_settings(self) -> dict:
        """The run's common settings that the user gave (not None), by the algorithm's setting
        names: ``decompose_threshold`` is the ``threshold`` setting of a decomposing algorithm."""
        given = {k: getattr(self, k) for k in COMMON_SETTINGS if getattr(self, k) is not None}
        if self.decompose_threshold is not None:
            if "threshold" not in setting_types(self.algorithm):
                raise ConfigError(f"decompose_threshold={self.decompose_threshold!r}: {self.algorithm} makes no "
                                  f"decomposition (it has no 'threshold' setting)")
            if "threshold" in self.params and self.params["threshold"] != self.decompose_threshold:
                raise ConfigError(f"decompose_threshold={self.decompose_threshold!r} and --set threshold="
                                  f"{self.params['threshold']!r} are the same setting; give one")
            given["threshold"] = self.decompose_threshold
        return given

    def ignored_settings(self) -> list:
        """Common settings the user gave that the algorithm does not have (the job says so)."""
        names = set(setting_types(self.algorithm))
        return sorted(k for k in self.common_settings() if k not in names)

    def algorithm_kwargs(self, prune_steps: Optional[int] = None) -> dict:
        """The algorithm's config: its own defaults, then the run's common settings that the user
        gave and the algorithm has, then ``params`` (``--set key=value``), checked by the registry and
        the algorithm's config class. No job-wide default replaces an algorithm's, so the settings
        do not depend on the phase length (``prune_steps``, still accepted from older callers)."""
        names = set(setting_types(self.algorithm))
        kwargs = {k: v for k, v in self.common_settings().items() if k in names}
        kwargs.update(self.params)
        return {"config": algorithm_config(self.algorithm, **kwargs)}


#: RunConfig fields passed to the algorithm under the same name when given
COMMON_SETTINGS = ("sparsity", "granularity", "scope", "schedule", "frequency", "end_fraction")


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety, not a dependency
        return None
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0, file=sys.stderr)


def _train_epochs(trainer, ds, cfg: RunConfig, epochs: int, first_epoch: int, desc: str, algorithm=None,
                  progress: Optional[RunProgress] = None, done: int = 0) -> float:
    """Train ``epochs`` epochs from ``first_epoch``, skipping the phase's first ``done`` steps
    (a resumed run); ``progress`` records the trajectory and writes the checkpoints."""
    steps_per_epoch = datasets.num_batches(len(ds.y_train), cfg.batch_size)
    bar = _progress(epochs * steps_per_epoch - done, desc, cfg.progress)
    t0 = time.perf_counter()
    loss = None
    for epoch in range(first_epoch + done // steps_per_epoch, first_epoch + epochs):
        start = done % steps_per_epoch if epoch == first_epoch + done // steps_per_epoch else 0
        for i, (x, y) in enumerate(datasets.batches(ds.x_train, ds.y_train, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                                     augment=cfg.augment and ds.name in ("cifar10", "folder"),
                                                     mean=ds.mean, std=ds.std, start_batch=start), start):
            try:
                loss = trainer.train_step(x, y)
            except DivergenceError as e:  # no checkpoint of this step: the last good one stays
                raise failed_run(e, cfg, progress) from None
            if progress is not None:
                progress.after_step(trainer, algorithm, loss, len(y))
            if bar is not None:
                bar.update(1)
                if i % 10 == 0:
                    post = {"epoch": epoch, **(progress.postfix(loss, algorithm) if progress is not None
                                               else {"loss": f"{float(loss):.3f}"})}
                    bar.set_postfix(post)
    if bar is not None:
        bar.close()
    return time.perf_counter() - t0


def _evaluate(trainer, ds, cfg: RunConfig) -> float:
    _, acc = trainer.evaluate(datasets.batches(ds.x_test, ds.y_test, 256, seed=cfg.seed, epoch=0, shuffle=False,
                                               drop_last=False, mean=ds.mean, std=ds.std))
    return acc


def run(cfg: RunConfig, echo=print) -> dict:
    """Run the whole job; returns the report (also saved under ``cfg.out``)."""
    cfg.validate()
    check_run_environment(cfg)  # the device and the output folder, before anything is read or written
    cfg, echo, comm = _start_data_parallel(cfg, echo)  # rank 0 alone prints and writes files
    if cfg.ignored_settings():
        echo(f"{cfg.algorithm} has no setting(s) {', '.join(cfg.ignored_settings())}: ignored "
             f"(its settings and their values are in the report)")
    # an algorithm that prunes at initialization scores the untrained model: no dense phase
    at_init = algorithm_class(cfg.algorithm).prunes_at_init
    if at_init:
        if cfg.dense_epochs:
            echo(f"{cfg.algorithm} prunes at initialization: dense_epochs={cfg.dense_epochs} ignored")
            cfg = dataclasses.replace(cfg, dense_epochs=0)
    backend = get_backend(cfg.backend)
    backend = parallel_backend(backend, comm)  # its Trainer is data parallel when comm is set
    identity = _identity(cfg)
    saved = None
    if cfg.resume:  # checked before any data is read or file written
        saved = checkpoint.load_checkpoint(cfg.out)
        checkpoint.check_identity(saved["identity"], identity, checkpoint.checkpoint_path(cfg.out))
    if cfg.deterministic:
        backend.make_deterministic()
    run_inputs.preflight(backend, cfg)
    ds = run_inputs.load_data(cfg, progress=cfg.progress)
    # bi-level algorithms: the weights train on the rest (the fraction is known before the steps are)
    fraction = make_algorithm(cfg.algorithm, **cfg.algorithm_kwargs()).held_out_fraction
    ds, held_out = _split_held_out(ds, cfg, fraction)
    handle = run_inputs.build_model(backend, cfg, ds, echo)
    steps_per_epoch = datasets.num_batches(len(ds.y_train), cfg.batch_size)
    if steps_per_epoch < 1:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(ds.y_train)} training images")
    echo(f"{cfg.model} on {cfg.dataset} ({len(ds.y_train)} train / {len(ds.y_test)} test images), backend {cfg.backend}, "
         f"{len(handle.layers)} prunable layers")
    progress = RunProgress(steps_per_epoch, cfg.dense_epochs, cfg.prune_epochs, cfg.checkpoint_every, identity,
                           cfg.out, backend, handle)
    if saved is not None:
        progress.load(saved)
        if not at_init:  # an at-initialization run saved the model its decision built: loaded below
            handle.load_state_numpy(saved["model"])
        backend.set_rng_state(saved["rng"]["framework"])
        checkpoint.set_host_rng_state(saved["rng"]["host"])
        echo(f"resuming from {checkpoint.describe(saved)} of {checkpoint.checkpoint_path(cfg.out)}")
    accuracy = progress.accuracy

    if cfg.dense_epochs and not progress.dense_done():
        echo("phase 1: dense training")
        dense = backend.Trainer(handle, None, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay,
                                total_steps=cfg.dense_epochs * steps_per_epoch)
        if saved is not None and saved.get("trainer_phase") == "dense":
            backend.restore_training_state(dense, saved["optimizer"])
        progress.seconds["dense"] += _train_epochs(dense, ds, cfg, cfg.dense_epochs, 0, "dense training",
                                                   progress=progress, done=progress.start_in_phase("dense"))
        accuracy["before_pruning"] = _evaluate(dense, ds, cfg)
        progress.save(dense, None, "dense")  # the phase's end, evaluated
    if "before_pruning" in accuracy:
        echo(f"test accuracy before pruning: {accuracy['before_pruning']:.2%}")

    prune_steps = cfg.prune_epochs * steps_per_epoch
    algorithm = make_algorithm(cfg.algorithm, **cfg.algorithm_kwargs())
    if held_out is not None:
        algorithm.validation = _endless_batches(held_out[0], held_out[1], ds, cfg)
    lr = cfg.lr if not cfg.dense_epochs else cfg.lr * 0.5
    train_algorithm, init_extra = algorithm, {}
    if at_init:  # score, build the model to train (narrow dense, or masked), then train it
        handle, init_extra = _prune_at_init(backend, handle, algorithm, ds, cfg, echo)
        progress.handle = handle  # checkpoints save the model that trains
        train_algorithm = algorithm.training_algorithm()
        progress.decision = init_decision(algorithm)  # checkpointed; a resumed run must re-decide the same
        if saved is not None:
            resume_at_init(saved, handle, progress.decision, backend)
    # an algorithm that is itself the update rule names the optimizer it assumes
    overrides = algorithm.trainer_overrides()
    if overrides:
        echo("pruning phase optimizer set by " + cfg.algorithm + ": "
             + ", ".join(f"{k}={v}" for k, v in overrides.items()))
    trainer = backend.Trainer(handle, train_algorithm, overrides.get("optimizer", cfg.optimizer), overrides.get("lr", lr),
                              overrides.get("momentum", cfg.momentum), overrides.get("weight_decay", cfg.weight_decay),
                              total_steps=prune_steps, **({"lr_schedule": overrides["lr_schedule"]}
                                                          if "lr_schedule" in overrides else {}))
    if saved is not None and saved.get("trainer_phase") == "prune":
        if train_algorithm is not None:
            train_algorithm.load_state_dict(saved["algorithm"])
        backend.restore_training_state(trainer, saved["optimizer"])
    progress.seconds["prune"] += _train_epochs(trainer, ds, cfg, cfg.prune_epochs, cfg.dense_epochs,
                                               f"pruning ({cfg.algorithm})", train_algorithm, progress=progress,
                                               done=progress.start_in_phase("prune"))
    dense_seconds, prune_seconds = progress.seconds["dense"], progress.seconds["prune"]
    trainer.finish()
    progress.record("final", train_algorithm)  # measured after the algorithm's final decisions
    accuracy["after_pruning"] = _evaluate(trainer, ds, cfg)
    extra = dict(init_extra)
    # None: the algorithm's own threshold setting (which ``--decompose-threshold``, when given, has set)
    transform = algorithm.final_transform(handle, backend, cfg.decompose_threshold)
    if transform is not None:  # a model rebuilt from the trained one (e.g. a low-rank decomposition)
        handle, extra[transform.name] = transform.handle, transform.section
        tester = backend.Trainer(handle, None, cfg.optimizer, lr, cfg.momentum, cfg.weight_decay, total_steps=1)
        accuracy[f"after_{transform.name}"] = _evaluate(tester, ds, cfg)
    # (an algorithm that pruned at initialization trained the narrow model already)
    channel_keep = None if at_init else (algorithm.channel_keep or None)
    if channel_keep:  # a channel-pruning algorithm: build the narrower dense model and measure it
        handle, extra["compaction"] = _compact(backend, handle, channel_keep, echo, cfg.latency_batch)
        tester = backend.Trainer(handle, None, cfg.optimizer, lr, cfg.momentum, cfg.weight_decay, total_steps=1)
        accuracy["after_compaction"] = _evaluate(tester, ds, cfg)

    run_info = {"backend": cfg.backend, "algorithm": cfg.algorithm, "dataset": cfg.dataset,
                "train_images": int(len(ds.y_train)), "test_images": int(len(ds.y_test)),
                "target_sparsity": algorithm.target_sparsity,
                **{k: v for k, v in _config_record(algorithm.config).items() if k in ("granularity", "scope", "schedule")},
                "ignored_settings": cfg.ignored_settings() or None, "dense_epochs": cfg.dense_epochs, "prune_epochs": cfg.prune_epochs,
                "steps": (cfg.dense_epochs + cfg.prune_epochs) * steps_per_epoch,
                "train_seconds": round(dense_seconds + prune_seconds, 1), "seed": cfg.seed,
                "checkpoints": progress.checkpoints_written or None,
                "checkpoint_seconds": round(progress.seconds["checkpoint"], 2) if progress.checkpoints_written else None,
                "resumed_at_steps": progress.resumed_at or None, **run_inputs.run_info(cfg, ds)}
    report = build_report(handle, accuracy, run_info, ranks=algorithm.ranks, extra=extra)
    report["algorithm_config"] = _config_record(algorithm.config)
    report["trajectory"] = progress.trajectory
    if comm is not None and not comm.is_main:
        return report
    os.makedirs(cfg.out, exist_ok=True)
    report["figures"] = write_run_plots(report, cfg.out)
    paths = save_report(report, cfg.out)
    plan = algorithm.plan()
    if channel_keep:
        plan.kept_channels = {k: [int(i) for i in v] for k, v in channel_keep.items()}
    plan_paths = plan.save(os.path.join(cfg.out, "plan"))
    np.savez_compressed(os.path.join(cfg.out, "weights.npz"), **handle.state_numpy())
    echo(format_report(report))
    echo(f"report: {paths['markdown']}, {paths['json']}; plan: {plan_paths[0]}; weights: {os.path.join(cfg.out, 'weights.npz')}")
    return report


def _compact(backend, handle, channel_keep, echo, latency_batch: int = 0):
    """Channel pruning's last step: the narrower dense model and the report section, with
    parameters and MACs of both models measured from their layers (and, with ``latency_batch``,
    their inference latency: :func:`_latency`)."""
    from prunekit.decisions.channel_groups import find_channel_groups

    before = count_handle(handle)
    groups = {g.name: g.size for g in find_channel_groups(handle)}
    new_handle = backend.compact(handle, channel_keep)
    after = count_handle(new_handle)
    section = {**_sizes(before, after),
               "macs_kept_fraction": after["dense_macs"] / max(1, before["dense_macs"]),
               "groups": {k: {"size": groups[k], "kept": len(v), "kept_channels": [int(i) for i in v]}
                          for k, v in channel_keep.items()}}
    echo(f"compacted: {before['total_params']} -> {after['total_params']} parameters, "
         f"{before['dense_macs']} -> {after['dense_macs']} MACs")
    if latency_batch:
        section["latency"] = _latency(backend, handle, new_handle, before, after, latency_batch, echo)
    return new_handle, section


def _latency(backend, dense, small, before: dict, after: dict, batch: int, echo) -> dict:
    """Inference latency of the dense and the narrower model, timed side by side on the run's
    device (``backend.time_inference``: eval mode, 2 warm-up batches each, then 3 rounds of 2
    batches of each model in turn; PyTorch eager, MindSpore compiled with ``mindspore.jit``), with
    the realised speed-up (of the medians) beside the MACs one."""
    t_dense, t_small = backend.time_inference([dense, small], batch, warmup=2, repeats=2, rounds=3)
    speedup = t_dense["median_ms"] / max(1e-9, t_small["median_ms"])
    macs_speedup = before["dense_macs"] / max(1, after["dense_macs"])
    out = {"batch": batch, "deploy": t_dense["deploy"], "timed_batches": t_dense["timed"],
           "dense_ms": round(t_dense["median_ms"], 3), "compacted_ms": round(t_small["median_ms"], 3),
           "speedup": round(speedup, 3), "macs_speedup": round(macs_speedup, 3),
           "efficiency": round(speedup / macs_speedup, 3)}
    echo(f"inference, batch {batch}: dense {out['dense_ms']:.1f} ms, compacted {out['compacted_ms']:.1f} ms "
         f"({speedup:.2f}x faster; MACs {macs_speedup:.2f}x fewer)")
    return out


def _start_data_parallel(cfg: RunConfig, echo):
    """Data parallel under torchrun / msrun (``cfg.distributed``, or detected when None): joins the
    process group; ranks other than 0 print nothing, show no progress, write no checkpoints and time
    no inference after compaction."""
    comm = start_distributed(get_backend(cfg.backend), cfg.distributed, cfg.device)
    if comm is None:
        return cfg, echo, None
    check_batch_size(cfg.batch_size, comm.size)
    cfg = dataclasses.replace(cfg, device=comm.model_device(cfg.device))
    if not comm.is_main:
        cfg = dataclasses.replace(cfg, progress=False, checkpoint_every=0, latency_batch=0)
        echo = _silent
    return cfg, echo, comm


def _sizes(before: dict, after: dict) -> dict:
    """Parameters and MACs of a model before and after a transformation, from their counts."""
    return {"params_before": before["total_params"], "params_after": after["total_params"],
            "macs_before": before["dense_macs"], "macs_after": after["dense_macs"]}


def _config_record(config) -> dict:
    """The algorithm's effective settings (its config dataclass, defaults filled in), as JSON
    values: what produced the run, recorded in its report."""
    if not dataclasses.is_dataclass(config):
        return {}
    return json.loads(json.dumps(dataclasses.asdict(config), default=repr))


def _silent(*args, **kwargs) -> None:
    pass


def _prune_at_init(backend, handle, algorithm, ds, cfg: RunConfig, echo):
    """Score the untrained model (training batches, no augmentation, for data-driven scores) and
    return the model to train and the report section: parameters and MACs of both models, measured."""
    data = datasets.batches(ds.x_train, ds.y_train, cfg.batch_size, seed=cfg.seed, epoch=0, augment=False,
                            mean=ds.mean, std=ds.std)
    batches = [b for _, b in zip(range(algorithm.scoring_batches), data)]
    before = count_handle(handle)
    t0 = time.perf_counter()
    model = algorithm.prepare(handle, backend, batches, seed=cfg.seed)
    seconds = time.perf_counter() - t0
    after = count_handle(model)
    section = {"at_initialization": {**algorithm.describe(), "seconds": round(seconds, 2), **_sizes(before, after),
                                     "nonzero_after": after["total_nonzero"],
                                     "effective_macs_after": after["effective_macs"]}}
    echo(f"{cfg.algorithm} at initialization ({seconds:.1f} s): {before['total_params']} -> {after['total_params']} "
         f"parameters, {before['dense_macs']} -> {after['dense_macs']} MACs")
    if cfg.latency_batch and model is not handle and after["dense_macs"] < before["dense_macs"]:
        section["at_initialization"]["latency"] = _latency(backend, handle, model, before, after, cfg.latency_batch,
                                                           echo)
    return model, section


def _split_held_out(ds, cfg: RunConfig, fraction: Optional[float]):
    """For an algorithm with a ``held_out_fraction``, split that share of the training set off
    (``data.split_train_val``): ``(dataset of the rest, (x, y) held out)``; else ``(ds, None)``."""
    if not fraction:
        return ds, None
    x_train, y_train, x_val, y_val = datasets.split_train_val(ds.x_train, ds.y_train, fraction, seed=cfg.seed)
    return dataclasses.replace(ds, x_train=x_train, y_train=y_train), (x_val, y_val)


def _endless_batches(x, y, ds, cfg: RunConfig):
    """Held-out batches without end (a new shuffle each pass), no augmentation."""
    size = min(cfg.batch_size, len(y))
    epoch = 0
    while True:
        yield from datasets.batches(x, y, size, seed=cfg.seed + 1, epoch=epoch, augment=False, mean=ds.mean, std=ds.std)
        epoch += 1


def _identity(cfg: RunConfig) -> dict:
    """What a checkpoint must match to be resumed by this run (see :mod:`prunekit.app.checkpoint`)."""
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return {"backend": cfg.backend, "model": cfg.model, "algorithm": cfg.algorithm, "dataset": cfg.dataset,
            "config": checkpoint.run_fingerprint(settings)}

