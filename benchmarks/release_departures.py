"""The measured effect of each departure from the authors' released code that prunekit offers
as a setting (docs/DECISIONS.md, "Departures from the released code"): the default and the
release's behaviour side by side on the same model, weights and data.

    PRUNEKIT_DATA=/work/shared/datasets .venv/bin/python benchmarks/release_departures.py [rpg trp precrop dsa]

PyTorch backend, ResNet-20 (CIFAR twin, seed 0), CIFAR-10 training images (a class-balanced
subset) where data is needed. Prints one line per setting.
"""
from __future__ import annotations

import numpy as np

from prunekit.algorithms import make_algorithm
from prunekit.algorithms.magnitude import magnitude_masks
from prunekit.algorithms.trp import plan_decompositions
from prunekit.app import data
from prunekit.contract.backend import get_backend
from prunekit.decisions.channel_groups import find_channel_groups
from prunekit.decisions.pai_scores import score_masks
from prunekit.decisions.schedules import SparsitySchedule
from prunekit.decisions.selection import keep_count, residual_rank

BACKEND = get_backend("torch")
MODEL = "resnet20"


def handle(seed: int = 0):
    return BACKEND.model_handle(MODEL, 10, 3, 32, seed=seed)


def cifar_batches(n: int, size: int):
    ds = data.load_dataset("cifar10", train_limit=n * size, test_limit=10)
    return [b for _, b in zip(range(n), ds.batches("train", size, seed=0))]


def mask_difference(ops, a, b) -> int:
    return int(sum(np.count_nonzero(ops.to_numpy(a[n]) != ops.to_numpy(b[n])) for n in a))


def rpg_schedule():
    for lag in (0, 1):
        s = SparsitySchedule(0.9, 0, 1000, 100, "exponential", lag=lag)
        dens = [round(1 - s.sparsity_at(t), 4) for t in range(100, 1001, 100)]
        print(f"rpg density_lag={lag}: density at the updates of a 1000-step schedule, every 100: {dens}")


def rpg_ranks():
    h = handle()
    masks = magnitude_masks(h, h.layers, 0.9, "unstructured", "global")
    for n, m in masks.items():
        h.mul_weight_(n, m)
    full_k, changed, nonzero, convs = 0, 0, 0, 0
    for l in h.layers:
        if l.kind != "conv":
            continue
        convs += 1
        w = h.ops.to_numpy(h.weight(l.name)).astype(np.float64)
        s = np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)
        e = float(np.sum(s * s))
        k = residual_rank(s, 0.1, e)
        capped = residual_rank(s, 0.1, e, max_rank=len(s) - 1)
        full_k += k == len(s)
        changed += k != capped
        nonzero += 0 < k < len(s)  # RPG's rank_mean="nonzero": a layer has a term where k < full rank
    print(f"rpg rank_below_full: {MODEL} magnitude-pruned to 90 %: k = full rank on {full_k} of {convs} conv layers "
          f"(their term is zero); the cap changes k on {changed}")
    print(f"rpg rank_mean=nonzero: {nonzero} of {convs} conv layers have a non-zero term at partial_k 0.1: "
          f"the rank gradient is {convs / max(1, nonzero):.3f}x the default's")


def rpg_final_ranks(batches):
    algo = make_algorithm("rpg", sparsity=0.9, frequency=4, end_fraction=0.8, spectrum="exact")
    h = handle()
    trainer = BACKEND.Trainer(h, algo, "sgd", 0.05, 0.9, 5e-4, total_steps=len(batches))
    last = None
    for x, y in batches:
        trainer.train_step(x, y)
        last = dict(algo.ranks)
    trainer.finish()
    diff = sum(1 for n in last if last[n] != algo.ranks[n])
    print(f"rpg final ranks: {len(batches)}-step run, batch {len(batches[0][1])}: the last rank computation's ranks "
          f"differ from the final weights' on {diff} of {len(last)} conv layers")


def trp_threshold():
    h = handle()
    algo = make_algorithm("trp", energy=0.9, lam=0.0).bind(h, 1)
    algo.before_step(0)  # one TRP projection: every layer at its energy-0.9 rank, as after training
    trp_layers = [l.name for l in algo.layers]
    before = sum(h.layer(n).numel for n in trp_layers)
    for t in (0.05, 1e-12, -1.0):
        dec = plan_decompositions(h, "channel", threshold=t, layers=trp_layers)
        after = sum(d.first.weight.size + d.second.weight.size for d in dec)
        print(f"trp threshold={t}: the {len(trp_layers)} decomposed layers of {MODEL} after one projection "
              f"(energy 0.9): {before} -> {after} weights ({after / before:.2f}x)")


def trp_period():
    steps_per_epoch, every, epochs = 391, 5, 164
    global_steps = {t for t in range(steps_per_epoch * epochs) if t % every == 0}
    per_epoch = {e * steps_per_epoch + i for e in range(epochs) for i in range(steps_per_epoch) if i % every == 0}
    print(f"trp period (every={every}, {steps_per_epoch} steps/epoch, {epochs} epochs, counted not trained): "
          f"global steps {len(global_steps)} projections, per-epoch restart {len(per_epoch)}, "
          f"{len(global_steps & per_epoch)} on the same steps; every=1: identical")


def precrop_scores(batches):
    h = handle()
    layers = [l for l in make_algorithm("precrop").select_layers(h.layers)]
    names = [l.name for l in layers]
    keep = keep_count(sum(l.numel for l in layers), 0.9)
    ops = h.ops
    _, train = score_masks(h, "snip", names, keep, batches, train=True)
    _, evl = score_masks(h, "snip", names, keep, batches, train=False)
    print(f"precrop bn_mode: SNIP at 90 % on {MODEL}, {len(batches)} CIFAR-10 batches of {len(batches[0][1])}: "
          f"train and eval masks differ in {mask_difference(ops, train, evl)} weights ({keep} kept)")
    channels = {}
    for mode in ("train", "eval"):
        algo = make_algorithm("precrop", score="snip", bn_mode=mode)
        algo.score(h, batches)
        plan = algo.plan_channels(find_channel_groups(h))
        channels[mode] = {g: len(v) for g, v in plan.keep.items()}
    diff = sum(1 for g in channels["train"] if channels["train"][g] != channels["eval"][g])
    print(f"precrop bn_mode: kept channels differ in {diff} of {len(channels['train'])} groups "
          f"(train {sum(channels['train'].values())}, eval {sum(channels['eval'].values())} channels)")
    _, near = score_masks(h, "synflow", names, keep, rounds=100, round_rule="nearest")
    _, ref = score_masks(h, "synflow", names, keep, rounds=100, round_rule="reference")
    print(f"precrop round_rule: SynFlow 100 rounds at 90 %: nearest and reference masks differ in "
          f"{mask_difference(ops, near, ref)} weights ({keep} kept)")
    _, plain = score_masks(h, "grasp", names, keep, batches)
    _, reinit = score_masks(h, "grasp", names, keep, batches, reinit_linear_seed=0)
    print(f"precrop reinit_linear: GraSP at 90 %: masks with and without the linear redraw differ in "
          f"{mask_difference(ops, plain, reinit)} weights ({keep} kept)")


def trained_like_bn(h, seed: int = 0) -> None:
    """BN scales drawn from U(0.1, 1), as after training (at initialisation every γ is 1, so every
    channel is equally important and no keep probability is capped)."""
    rng = np.random.default_rng(seed)
    h.load_state_numpy({k: (rng.uniform(0.1, 1.0, v.shape).astype(np.float32)
                            if k.endswith(".weight") and v.ndim == 1 else v) for k, v in h.state_numpy().items()})


def dsa_gradient(batches, model=MODEL):
    """∂L/∂α of one α step from the same weights (BN scales :func:`trained_like_bn`), gates and batch,
    with and without the capped channels' weight, every searchable ratio set to ``alpha`` (bind
    projects the initial θ = 5 onto the budget; capping needs ratios near 1)."""
    for alpha in (0.99, 0.95, 0.9):
        records, searchable = {}, None
        for capped in (False, True):
            algo = make_algorithm("dsa", budget=0.5, capped_gradient=capped)
            h = BACKEND.model_handle(model, 10, 3, 32, seed=0)
            trained_like_bn(h)
            algo.bind(h, 100)
            algo.alpha = np.where(algo.searchable, alpha, algo.alpha)
            algo.validation = iter(batches)
            records[capped] = algo.arch_step(0)["grad_alpha"]
            searchable = algo.searchable
        a, b = records[False], records[True]
        idx = np.flatnonzero(searchable)
        rel = np.abs(a[idx] - b[idx]) / np.maximum(np.abs(b[idx]), 1e-30)
        where = f"α = {alpha}"
        print(f"dsa capped_gradient: one α step on {model} ({where}, BN scales U(0.1, 1)), one CIFAR-10 batch of {len(batches[0][1])}: "
              f"∂L/∂α differs by {100 * rel.min():.1f} % to {100 * rel.max():.1f} % (median "
              f"{100 * np.median(rel):.1f} %) over {len(idx)} groups")


def dsa_importance(model: str):
    algo = {rule: make_algorithm("dsa", importance=rule).bind(BACKEND.model_handle(model, 10, 3, 32, seed=0), 100)
            for rule in ("mean", "primal")}
    for a in algo.values():
        trained_like_bn(a.handle)
    b = {rule: a.importance() for rule, a in algo.items()}
    multi = [g.name for g, s in zip(algo["mean"].groups, algo["mean"].searchable) if s and len(g.norms) > 1]
    orders = sum(1 for n in multi if not np.array_equal(np.argsort(-b["mean"][n], kind="stable"),
                                                         np.argsort(-b["primal"][n], kind="stable")))
    print(f"dsa importance=primal: {model}: {len(multi)} searchable groups with more than one BN; with BN scales "
          f"drawn from U(0.1, 1), the channel order by importance differs in {orders} of them")


def main(sections):
    batches = cifar_batches(4, 64)
    run = {"rpg": lambda: (rpg_schedule(), rpg_ranks(), rpg_final_ranks(cifar_batches(12, 32))),
           "trp": lambda: (trp_threshold(), trp_period()),
           "precrop": lambda: precrop_scores(batches[:2]),
           "dsa": lambda: (dsa_gradient(batches), dsa_importance("resnet20"), dsa_importance("resnet20b"))}
    for name in sections or run:
        run[name]()


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])  # sections: rpg trp precrop dsa (default: all)
