"""Pruning reports: measured from the model, printed as a table, saved as JSON and Markdown.

Nothing in a report is copied from the request: sparsity, parameters and FLOPs are counted
from the weights the model holds when the report is made (:mod:`prunekit.decisions.flops`); accuracies
are evaluated on held-out data by the caller and passed in. The requested target is shown
beside the measured value, labelled as such.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

from prunekit.decisions.flops import count_handle


def build_report(handle, accuracy: Optional[Dict[str, float]] = None, run: Optional[dict] = None,
                 ranks: Optional[Dict[str, int]] = None, extra: Optional[dict] = None) -> dict:
    """A report of ``handle``'s model as it is now. ``ranks`` are the algorithm's per-layer ranks
    (measured by its last spectrum computation); ``extra`` adds sections (e.g. decomposition)."""
    counts = count_handle(handle)
    layers = counts.pop("layers")
    rows = [c.to_dict() for c in layers]
    if ranks:
        for r in rows:
            if r["name"] in ranks:
                r["rank"] = int(ranks[r["name"]])
    report = {
        "run": {k: v for k, v in (run or {}).items() if v is not None},
        "model": handle.model_name,
        "backend": handle.ops.name,
        "accuracy": dict(accuracy or {}),
        "totals": counts,
        "layers": rows,
    }
    if ranks:
        report["ranks"] = {k: int(v) for k, v in ranks.items()}
    report.update(extra or {})
    return report


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _latencies(report: dict) -> list:
    """The dense-vs-narrow inference timings the job recorded (after compaction, or at
    initialization for PreCropping)."""
    return [s["latency"] for s in (report.get("compaction"), report.get("at_initialization")) if s and s.get("latency")]


def format_report(report: dict, max_layers: int = 60) -> str:
    t = report["totals"]
    lines = []
    run = report.get("run", {})
    head = f"prunekit report: {report['model']} on {report['backend']}"
    if run.get("algorithm"):
        head += f", {run['algorithm']}"
    if run.get("dataset"):
        head += f", {run['dataset']}"
    lines.append(head)
    settings = report.get("algorithm_config")
    if settings:  # every setting's effective value: the algorithm's defaults and what the run set
        lines.append(f"{run.get('algorithm', 'algorithm')} settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    lines.append(f"{'layer':<28} {'kind':<6} {'shape':<18} {'params':>9} {'nonzero':>9} {'sparsity':>8} {'MACs':>9} {'rank':>5}")
    rows = report["layers"]
    shown = rows if len(rows) <= max_layers else rows[:max_layers]
    for r in shown:
        shape = "x".join(str(d) for d in r["weight_shape"])
        lines.append(f"{r['name']:<28} {r['kind']:<6} {shape:<18} {r['params']:>9} {r['nonzero']:>9} "
                     f"{r['sparsity']:>8.2%} {_fmt_count(r['effective_macs']):>9} {r.get('rank', ''):>5}")
    if len(rows) > len(shown):
        lines.append(f"... {len(rows) - len(shown)} more layers in the JSON report")
    lines.append("")
    target = run.get("target_sparsity")
    tgt = f" (target {target:.2%})" if isinstance(target, (int, float)) else ""
    lines.append(f"prunable weights: {t['prunable_nonzero']:,} of {t['prunable_params']:,} non-zero, "
                 f"sparsity {t['prunable_sparsity']:.2%}{tgt}")
    lines.append(f"all parameters:   {t['total_nonzero']:,} of {t['total_params']:,} non-zero")
    lines.append(f"FLOPs (MACs/sample): dense {_fmt_count(t['dense_macs'])}, effective {_fmt_count(t['effective_macs'])} "
                 f"({t['macs_kept_fraction']:.2%} kept)")
    dec = report.get("decomposition")
    if dec:
        rule = (f"singular values >= {dec['threshold']}" if dec.get("threshold") is not None
                else f"{dec.get('energy')} of each filter's energy")  # TRP's nd scheme: an energy rule
        lines.append(f"decomposition ({dec['scheme']}, {rule}): parameters "
                     f"{dec['params_before']:,} -> {dec['params_after']:,}, MACs {_fmt_count(dec['macs_before'])} -> "
                     f"{_fmt_count(dec['macs_after'])} ({dec['flops_reduction']:.2f}x fewer)")
    for lat in _latencies(report):
        lines.append(f"inference latency (batch {lat['batch']}, median): dense {lat['dense_ms']:.1f} ms, compacted "
                         f"{lat['compacted_ms']:.1f} ms: {lat['speedup']:.2f}x faster for {lat['macs_speedup']:.2f}x "
                         f"fewer MACs")
    acc = report.get("accuracy", {})
    if acc:
        lines.append("accuracy:         " + ", ".join(f"{k} {v:.2%}" for k, v in acc.items()))
    for k in ("train_seconds", "steps"):
        if k in run:
            lines.append(f"{k.replace('_', ' ')}: {run[k]}")
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    t = report["totals"]
    out = [f"# prunekit report: {report['model']} ({report['backend']})", ""]
    if report.get("run"):
        out += ["| setting | value |", "| --- | --- |"]
        out += [f"| {k} | {v} |" for k, v in report["run"].items()]
        out.append("")
    if report.get("algorithm_config"):  # every setting's effective value, defaults included
        out += [f"| {report.get('run', {}).get('algorithm', 'algorithm')} setting (effective) | value |", "| --- | --- |"]
        out += [f"| {k} | {v} |" for k, v in report["algorithm_config"].items()]
        out.append("")
    if report.get("accuracy"):
        out += ["| accuracy | value |", "| --- | --- |"]
        out += [f"| {k} | {v:.2%} |" for k, v in report["accuracy"].items()]
        out.append("")
    out += ["| total | value |", "| --- | --- |",
            f"| prunable sparsity (measured) | {t['prunable_sparsity']:.4%} |",
            f"| non-zero / all parameters | {t['total_nonzero']:,} / {t['total_params']:,} |",
            f"| dense MACs per sample | {t['dense_macs']:,} |",
            f"| effective MACs per sample | {t['effective_macs']:,} |"]
    for lat in _latencies(report):
        out += [f"| inference ms, batch {lat['batch']}, dense / compacted (median) | "
                f"{lat['dense_ms']:.1f} / {lat['compacted_ms']:.1f} |",
                f"| realised / MACs speed-up | {lat['speedup']:.2f}x / {lat['macs_speedup']:.2f}x |"]
    out.append("")
    out += ["| layer | kind | shape | params | non-zero | sparsity | kept out-channels | effective MACs |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["layers"]:
        shape = "×".join(str(d) for d in r["weight_shape"])
        out.append(f"| {r['name']} | {r['kind']} | {shape} | {r['params']} | {r['nonzero']} | {r['sparsity']:.2%} | "
                   f"{r['kept_out_channels']} | {r['effective_macs']:,} |")
    out += _markdown_figures(report)
    return "\n".join(out) + "\n"


def _markdown_figures(report: dict) -> list:
    """The run's PNG figures (file names relative to the report) and the trajectory's ends."""
    out = []
    figures = report.get("figures") or {}
    captions = {"layers": "Per-layer sparsity, kept output channels and ranks (measured)",
                "trajectory": "Sparsity measured from the masks, mean rank and train loss over training"}
    for key, name in figures.items():
        out += ["", f"## {captions.get(key, key)}", "", f"![{key}]({name})"]
    traj = report.get("trajectory") or []
    if traj:
        out += ["", "| trajectory | step | sparsity (masks) | mean rank | train loss |", "| --- | --- | --- | --- | --- |"]
        for label, p in (("first", traj[0]), ("last", traj[-1])):
            rank = f"{p['mean_rank']:.2f}" if "mean_rank" in p else ""
            loss = f"{p['loss']:.4f}" if "loss" in p else ""
            out.append(f"| {label} ({p.get('phase', '')}) | {p['step']} | {p['sparsity']:.4%} | {rank} | {loss} |")
    return out


def save_report(report: dict, folder: str) -> Dict[str, str]:
    os.makedirs(folder, exist_ok=True)
    paths = {"json": os.path.join(folder, "report.json"), "markdown": os.path.join(folder, "report.md")}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=1)
    with open(paths["markdown"], "w") as f:
        f.write(report_markdown(report))
    return paths
