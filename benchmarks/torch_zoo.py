"""prunekit beside Torch-Pruning on the models PyTorch users train (issue #11).

Part ``groups`` (per model, randomly initialised, seeded, at ``--image`` pixels), both tools on
the same model in one process:

* prunable groups: prunekit's ``find_channel_groups`` (groups with ``prunable``), Torch-Pruning
  1.6.1's ``DependencyGraph.get_all_groups`` rooted at Conv2d/Linear, the classifier ignored (it
  yields only groups it can prune);
* agreement of coupled channel sets: each group as the set of conv/linear layers whose *output*
  channels it removes (prunekit: producers and depthwise convs; Torch-Pruning: the
  ``prune_out_channels`` items of Conv2d/Linear), ``both`` = sets found by both tools, shown as a
  share of each tool's sets;
* MACs and parameters after the same 50 % uniform pruning: prunekit ``channel`` with
  ``channels_removed=0.5, allocation="uniform"`` (L1); Torch-Pruning ``MetaPruner`` with
  ``pruning_ratio=0.5`` and ``MagnitudeImportance(p=1)``, local; both counted by
  Torch-Pruning's ``count_ops_and_params`` (the same counter), as a fraction of the dense model;
* compacted vs masked: the largest |difference| of the logits over the largest |logit| between
  the compacted model and the masked model (the dense model with the removed channels zeroed:
  prunekit's channel masks; for Torch-Pruning, its own decisions replayed as zeros on a copy --
  output rows, norm weight and bias, input columns of plain convs and linears, and any
  parameter it pruned). ``ModelError`` is prunekit's refusal; any other exception a crash; a
  difference above 1e-4 without a refusal a silent mismatch.

Part ``latency``: the channel baseline at ``macs_kept=0.5`` (uniform, ``round_to=8``) compacted,
timed side by side with the dense model (``torch.compile``, Inductor with freezing; CPU, batch
``--batch``, ``--latency-image`` pixels) by ``backend.time_inference``; realised speed-up over
MACs speed-up (the target is >= 0.8).

    pip install --no-deps torch-pruning==1.6.1        # or: pip install -e ".[bench]"
    python benchmarks/torch_zoo.py --part groups
    python benchmarks/torch_zoo.py --part latency --batch 16 --models resnet18,resnet50
    python benchmarks/torch_zoo.py --part groups --write   # record the figures in RESULTS.md
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torchvision  # noqa: E402

from prunekit.algorithms import make_algorithm  # noqa: E402
from prunekit.contract.backend import get_backend  # noqa: E402
from prunekit.decisions.flops import count_model  # noqa: E402
from prunekit.errors import ModelError  # noqa: E402

TORCH = get_backend("torch")
TV = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "googlenet",
      "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x1_0", "convnext_tiny", "vit_b_16"]
TIMM = ["timm/efficientnet_b0", "timm/mobilenetv3_small_100", "timm/rexnet_100", "timm/convnext_atto",
        "timm/resnet18"]


def build(name: str, image: int) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("timm/"):
        import timm
        m = timm.create_model(name[5:], num_classes=1000)
    elif name == "googlenet":
        m = torchvision.models.googlenet(num_classes=1000, aux_logits=False, init_weights=True)
    elif name.startswith("vit_"):
        m = getattr(torchvision.models, name)(num_classes=1000, image_size=image)
    else:
        m = getattr(torchvision.models, name)(num_classes=1000)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms away from identity, so a removed channel's norm output is not zero
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return m.eval()


def classifier(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _out_sets_prunekit(groups):
    return {frozenset(g.producers + g.depthwise) for g in groups if g.prunable}


def _count(model, x):
    import torch_pruning as tp
    macs, params = tp.utils.count_ops_and_params(model, x)
    return float(macs), float(params)


def prunekit_side(name, model, image, x):
    """prunekit: groups, 50 % uniform, compacted vs masked. Returns a dict (status ok/refused/crash)."""
    out = {"status": "ok"}
    from prunekit.decisions.channel_groups import find_channel_groups
    try:
        m = copy.deepcopy(model)
        h = TORCH.wrap(m, (3, image, image), name)
        groups = find_channel_groups(h)
        out["groups"] = sum(g.prunable for g in groups)
        out["sets"] = _out_sets_prunekit(groups)
        algo = make_algorithm("channel", channels_removed=0.5, allocation="uniform").bind(h, 1)
        algo.decide()  # masks applied: m is now the masked model
        with torch.no_grad():
            masked = m(x)
        small = TORCH.compact(h, algo.channel_keep)
        with torch.no_grad():
            out["diff"] = rel(small.model(x), masked)
        out["macs"], out["params"] = _count(small.model, x[:1])
    except ModelError as e:
        out.update(status="refused", why=str(e).split(";")[0][:150])
    except Exception as e:  # a crash: counted, shown
        out.update(status="crash", why=f"{type(e).__name__}: {str(e)[:150]}")
    return out


def _tp_mask(masked: nn.Module, names, decisions):
    """Replay Torch-Pruning's decisions ``[(module name, handler name, original idxs)]`` as zeros on ``masked``."""
    mods = dict(masked.named_modules())
    with torch.no_grad():
        for name, handler, idxs in decisions:
            m = mods.get(name)
            if m is None or not idxs:
                continue
            idx = torch.as_tensor(sorted(set(int(i) for i in idxs)))
            if handler == "prune_out_channels":
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.weight[idx] = 0
                    if m.bias is not None:
                        m.bias[idx] = 0
                elif getattr(m, "weight", None) is not None and m.weight.dim() == 1:  # norms
                    m.weight[idx] = 0
                    if getattr(m, "bias", None) is not None:
                        m.bias[idx] = 0
            elif handler == "prune_in_channels" and isinstance(m, (nn.Conv2d, nn.Linear)):
                if isinstance(m, nn.Conv2d) and m.groups > 1:
                    continue  # depthwise / grouped: their inputs go with their outputs
                m.weight[:, idx] = 0


def _width(m: nn.Module, handler: str) -> int:
    """The size of the axis ``handler`` prunes on module ``m``, before pruning."""
    if handler == "prune_in_channels":
        return int(getattr(m, "in_channels", getattr(m, "in_features", 0)) or m.weight.shape[1])
    return int(m.weight.shape[0]) if getattr(m, "weight", None) is not None else int(getattr(m, "num_features", 0))


def torch_pruning_side(name, model, image, x):
    import torch_pruning as tp
    out = {"status": "ok"}
    try:
        m = copy.deepcopy(model)
        names = {mod: n for n, mod in m.named_modules()}
        ignored = [classifier(m)]
        dg = tp.DependencyGraph().build_dependency(m, example_inputs=x[:1])
        sets = set()
        count = 0
        for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
            count += 1
            sets.add(frozenset(names[dep.target.module] for dep, _ in group
                               if dg.is_out_channel_pruning_fn(dep.handler)
                               and isinstance(dep.target.module, (nn.Conv2d, nn.Linear))))
        out["groups"], out["sets"] = count, sets
        pruner = tp.pruner.MetaPruner(m, x[:1], importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=0.5, ignored_layers=ignored, global_pruning=False)
        decisions = []
        alive = {}  # (module, handler) -> original indices still present: a group's idxs are current ones
        for group in pruner.step(interactive=True):
            for dep, idxs in group:
                target, handler = dep.target.module, getattr(dep.handler, "__name__", "")
                if target not in names or handler not in ("prune_out_channels", "prune_in_channels"):
                    continue
                key = (target, handler)
                if key not in alive:
                    alive[key] = list(range(_width(target, handler)))
                orig = [alive[key][int(i)] for i in idxs if int(i) < len(alive[key])]
                drop = set(int(i) for i in idxs)
                alive[key] = [c for j, c in enumerate(alive[key]) if j not in drop]
                decisions.append((names[target], handler, orig))
            group.prune()
        masked = copy.deepcopy(model)
        _tp_mask(masked, names, decisions)
        with torch.no_grad():
            out["diff"] = rel(m(x), masked(x))
        out["macs"], out["params"] = _count(m, x[:1])
    except Exception as e:
        out.update(status="crash", why=f"{type(e).__name__}: {str(e)[:150]}")
    return out


def groups_part(models, image):
    rows = []
    head = (f"{'model':28s} {'pk groups':>9s} {'tp groups':>9s} {'both':>5s} {'of pk':>6s} {'of tp':>6s} "
            f"{'pk MACs':>8s} {'tp MACs':>8s} {'pk params':>9s} {'tp params':>9s} {'pk diff':>9s} {'tp diff':>9s}")
    print(head, flush=True)
    for name in models:
        t0 = time.time()
        model = build(name, image)
        x = torch.randn(2, 3, image, image, generator=torch.Generator().manual_seed(2))
        dense_macs, dense_params = _count(model, x[:1])
        pk = prunekit_side(name, model, image, x)
        tp_ = torch_pruning_side(name, model, image, x)
        both = len(pk.get("sets", set()) & tp_.get("sets", set()))
        row = {"model": name, "pk": pk, "tp": tp_, "both": both, "dense_macs": dense_macs,
               "dense_params": dense_params, "seconds": time.time() - t0}
        rows.append(row)
        print(_line(row), flush=True)
        for side, r in (("prunekit", pk), ("torch-pruning", tp_)):
            if r["status"] != "ok":
                print(f"    {side} {r['status']}: {r['why']}", flush=True)
    return rows


def _fmt(r, key, scale=1.0, spec="8.3f"):
    return format(r[key] / scale, spec) if key in r else format("-", ">" + spec.split(".")[0])


def _line(row):
    pk, tp_ = row["pk"], row["tp"]
    npk, ntp = len(pk.get("sets", ())), len(tp_.get("sets", ()))
    of_pk = f"{row['both'] / npk:6.2f}" if npk else f"{'-':>6s}"
    of_tp = f"{row['both'] / ntp:6.2f}" if ntp else f"{'-':>6s}"

    def diff(r):
        return f"{r['diff']:9.1e}" if "diff" in r else f"{r['status']:>9s}"
    return (f"{row['model']:28s} {pk.get('groups', '-'):>9} {tp_.get('groups', '-'):>9} {row['both']:5d} {of_pk} {of_tp} "
            f"{_fmt(pk, 'macs', row['dense_macs'])} {_fmt(tp_, 'macs', row['dense_macs'])} "
            f"{_fmt(pk, 'params', row['dense_params'], '9.3f')} {_fmt(tp_, 'params', row['dense_params'], '9.3f')} "
            f"{diff(pk)} {diff(tp_)}")


def latency_part(models, image, batch, repeats, rounds):
    rows = []
    print(f"{'model':20s} {'MACs kept':>9s} {'dense ms':>9s} {'compact ms':>10s} {'MACs x':>7s} {'real x':>7s} "
          f"{'eff.':>5s}", flush=True)
    for name in models:
        model = build(name, image)
        h = TORCH.wrap(model, (3, image, image), name)
        try:
            algo = make_algorithm("channel", macs_kept=0.5, allocation="uniform", round_to=8).bind(h, 1)
            small = TORCH.compact(h, algo.choose())
        except ModelError as e:
            print(f"{name:20s} refused: {str(e)[:120]}", flush=True)
            continue
        dense = count_model(h.layers, h.weights_numpy(), h.state_numpy())["dense_macs"]
        macs = count_model(small.layers, small.weights_numpy(), small.state_numpy())["dense_macs"]
        t = TORCH.time_inference([h, small], batch, warmup=2, repeats=repeats, deploy="compiled", rounds=rounds)
        macs_x, real_x = dense / macs, t[0]["median_ms"] / t[1]["median_ms"]
        row = {"model": name, "macs_kept": macs / dense, "dense_ms": t[0]["median_ms"],
               "compact_ms": t[1]["median_ms"], "macs_x": macs_x, "real_x": real_x, "eff": real_x / macs_x}
        rows.append(row)
        print(f"{name:20s} {row['macs_kept']:9.3f} {row['dense_ms']:9.1f} {row['compact_ms']:10.1f} "
              f"{macs_x:7.2f} {real_x:7.2f} {row['eff']:5.2f}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("groups", "latency"), default="groups")
    p.add_argument("--models", default=",".join(TV + TIMM))
    p.add_argument("--image", type=int, default=64, help="input size of the groups part")
    p.add_argument("--latency-image", type=int, default=224)
    p.add_argument("--batch", type=int, default=64, help="latency batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: its default)")
    p.add_argument("--write", action="store_true", help="record the figures in benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    models = [m for m in a.models.split(",") if m]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if a.part == "groups":
        rows = groups_part(models, a.image)
        crashes = {s: sum(r[k]["status"] == "crash" for r in rows) for s, k in (("prunekit", "pk"), ("tp", "tp"))}
        silent = {s: sum(r[k].get("diff", 0) > 1e-4 for r in rows) for s, k in (("prunekit", "pk"), ("tp", "tp"))}
        summary = (f"crashes: prunekit {crashes['prunekit']}, Torch-Pruning {crashes['tp']}; compacted != masked "
                   f"(> 1e-4) without a refusal: prunekit {silent['prunekit']}, Torch-Pruning {silent['tp']}")
        print(summary)
        if a.write:
            from benchmarks.results import machine, write_section
            import torch_pruning as tp
            lines = [f"Machine: {machine()}; Torch-Pruning {tp.__version__}; load average {load:.1f} at the start "
                     "(other helpers share the 2 cores).",
                     f"Command: `python benchmarks/torch_zoo.py --part groups --image {a.image}`", "", "```",
                     f"{'model':28s} {'pk groups':>9s} {'tp groups':>9s} {'both':>5s} {'of pk':>6s} {'of tp':>6s} "
                     f"{'pk MACs':>8s} {'tp MACs':>8s} {'pk params':>9s} {'tp params':>9s} {'pk diff':>9s} {'tp diff':>9s}"]
            lines += [_line(r) for r in rows] + ["```", "", summary]
            for r in rows:
                for side, k in (("prunekit", "pk"), ("Torch-Pruning", "tp")):
                    if r[k]["status"] != "ok":
                        lines.append(f"- {r['model']}: {side} {r[k]['status']}: {r[k]['why']}")
            write_section("Torch zoo beside Torch-Pruning (issue #11)", lines)
    else:
        rows = latency_part(models, a.latency_image, a.batch, a.repeats, a.rounds)
        if a.write:
            from benchmarks.results import machine, write_section
            lines = [f"Machine: {machine()}; load average {load:.1f} at the start: other helpers load the 2 "
                     "cores, the ratios are of the two models timed in turn in one process.",
                     f"Command: `python benchmarks/torch_zoo.py --part latency --batch {a.batch} "
                     f"--latency-image {a.latency_image} --models {','.join(models)}`", "", "```",
                     f"{'model':20s} {'MACs kept':>9s} {'dense ms':>9s} {'compact ms':>10s} {'MACs x':>7s} "
                     f"{'real x':>7s} {'eff.':>5s}"]
            lines += [f"{r['model']:20s} {r['macs_kept']:9.3f} {r['dense_ms']:9.1f} {r['compact_ms']:10.1f} "
                      f"{r['macs_x']:7.2f} {r['real_x']:7.2f} {r['eff']:5.2f}" for r in rows] + ["```"]
            write_section("Torch zoo latency, compacted vs dense (issue #11)", lines)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.exit(130)
