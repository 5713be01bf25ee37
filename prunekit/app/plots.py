"""Figures of a pruning run, drawn from its report with matplotlib (Agg backend, PNG files).

* :func:`plot_layers`: per layer, the measured sparsity, the kept output channels (as a
  fraction of the layer's) and, where the algorithm has ranks, the rank — bar charts;
* :func:`plot_trajectory`: sparsity measured from the masks, mean rank and train loss over the
  steps of the run (the job records them as it trains, see :mod:`prunekit.app.run_state`);
* :func:`plot_comparison`: test accuracy against measured sparsity or FLOPs across runs;
* :func:`write_run_plots`: the run's figures into its output folder, returning their names.

Everything plotted comes from the report, i.e. from what was measured on the model.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

from prunekit.errors import ConfigError

COMPARE_AXES = ("sparsity", "flops")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    _pyplot().close(fig)
    return path


def plot_layers(report: dict, path: str) -> str:
    """Bar charts of per-layer sparsity, kept output channels and (if any) ranks."""
    plt = _pyplot()
    rows = report["layers"]
    names = [r["name"] for r in rows]
    ranked = [r for r in rows if "rank" in r]
    panels = 3 if ranked else 2
    width = max(6.0, 0.32 * len(names) + 2.0)
    fig, axes = plt.subplots(panels, 1, figsize=(width, 2.6 * panels), squeeze=False)
    x = list(range(len(names)))
    ax = axes[0][0]
    ax.bar(x, [100.0 * r["sparsity"] for r in rows], color="#c0392b")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    total = report.get("totals", {}).get("prunable_sparsity")
    title = f"{report.get('model', '')} ({report.get('backend', '')}) per-layer sparsity, measured"
    if isinstance(total, (int, float)):
        ax.axhline(100.0 * total, color="k", lw=0.8, ls="--", label=f"all prunable: {total:.1%}")
        ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    ax.set_title(title, fontsize=10)
    ax = axes[1][0]
    ax.bar(x, [100.0 * r["kept_out_channels"] / max(1, r["weight_shape"][0]) for r in rows], color="#2e86c1")
    ax.set_ylabel("kept out-channels (%)")
    ax.set_ylim(0, 105)
    if ranked:
        ax = axes[2][0]
        full = [min(r["weight_shape"][0], math.prod(int(v) for v in r["weight_shape"][1:])) if "rank" in r else 0 for r in rows]
        ax.bar(x, full, color="#d5dbdb", label="full rank")
        ax.bar(x, [r.get("rank", 0) for r in rows], color="#27ae60", label="rank")
        ax.set_ylabel("rank")
        ax.legend(loc="upper left", fontsize=8)
    for row in axes:
        row[0].set_xticks(x)
        row[0].set_xticklabels(names, rotation=90, fontsize=7)
        row[0].set_xlim(-0.6, len(names) - 0.4)
    return _save(fig, path)


def plot_trajectory(trajectory: List[dict], path: str, title: str = "") -> str:
    """Sparsity (measured from the masks), mean rank (if recorded) and train loss over steps."""
    plt = _pyplot()
    if not trajectory:
        raise ConfigError("the run recorded no trajectory to plot")
    has_rank = any("mean_rank" in p for p in trajectory)
    panels = 3 if has_rank else 2
    fig, axes = plt.subplots(panels, 1, figsize=(7.0, 2.4 * panels), sharex=True, squeeze=False)
    steps = [p["step"] for p in trajectory]
    ax = axes[0][0]
    ax.plot(steps, [100.0 * p["sparsity"] for p in trajectory], color="#c0392b", marker=".", ms=3)
    ax.set_ylabel("sparsity (%)")
    ax.set_title(title or "measured over training", fontsize=10)
    _mark_phases(ax, trajectory)
    row = 1
    if has_rank:
        pts = [p for p in trajectory if "mean_rank" in p]
        axes[row][0].plot([p["step"] for p in pts], [p["mean_rank"] for p in pts], color="#27ae60", marker=".", ms=3)
        axes[row][0].set_ylabel("mean rank")
        row += 1
    pts = [p for p in trajectory if "loss" in p]
    ax = axes[row][0]
    ax.plot([p["step"] for p in pts], [p["loss"] for p in pts], color="#34495e", marker=".", ms=3, label="train loss")
    ax.set_ylabel("train loss")
    acc = [p for p in pts if "train_accuracy" in p]
    if acc:
        twin = ax.twinx()
        twin.plot([p["step"] for p in acc], [100.0 * p["train_accuracy"] for p in acc], color="#e67e22", lw=0.9)
        twin.set_ylabel("running train acc (%)", color="#e67e22")
    ax.set_xlabel("step")
    return _save(fig, path)


def _mark_phases(ax, trajectory: List[dict]) -> None:
    dense = [p["step"] for p in trajectory if p.get("phase") == "dense"]
    if dense:
        ax.axvline(max(dense), color="grey", lw=0.8, ls=":")


def write_run_plots(report: dict, folder: str) -> Dict[str, str]:
    """The run's figures into ``folder``; returns {figure: file name relative to the folder}."""
    os.makedirs(folder, exist_ok=True)
    out = {"layers": os.path.basename(plot_layers(report, os.path.join(folder, "layers.png")))}
    if report.get("trajectory"):
        run = report.get("run", {})
        title = f"{report.get('model', '')} {run.get('algorithm', '')} ({report.get('backend', '')}), measured"
        out["trajectory"] = os.path.basename(plot_trajectory(report["trajectory"], os.path.join(folder, "trajectory.png"),
                                                             title))
    return out


# ---------------------------------------------------------------------------- comparison
def load_run_reports(folders: Sequence[str]) -> List[dict]:
    """The report.json of each run folder; ConfigError naming the first folder without one."""
    if not folders:
        raise ConfigError("compare needs at least one run folder")
    reports = []
    for folder in folders:
        path = os.path.join(folder, "report.json")
        if not os.path.isdir(folder):
            raise ConfigError(f"{folder} is not a folder")
        if not os.path.exists(path):
            raise ConfigError(f"{folder} has no report.json: not the output folder of a finished prunekit run")
        try:
            with open(path) as f:
                report = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} is not a readable JSON report: {e}") from None
        if not isinstance(report, dict) or "totals" not in report:
            raise ConfigError(f"{path} is not a prunekit report (no 'totals')")
        report["_folder"] = folder
        reports.append(report)
    return reports


def _accuracy(report: dict, key: Optional[str]) -> float:
    acc = report.get("accuracy", {})
    if key is not None:
        if key not in acc:
            raise ConfigError(f"{report['_folder']}: report has no accuracy {key!r}; it has {', '.join(acc) or 'none'}")
        return float(acc[key])
    for k in ("after_decomposition", "after_pruning"):
        if k in acc:
            return float(acc[k])
    raise ConfigError(f"{report['_folder']}: report has no test accuracy after pruning")


def comparison_points(reports: List[dict], x: str = "sparsity", accuracy: Optional[str] = None) -> List[dict]:
    """One point per run: label, x (measured sparsity, or effective MACs per sample), test accuracy."""
    if x not in COMPARE_AXES:
        raise ConfigError(f"unknown comparison axis {x!r}; expected one of {', '.join(COMPARE_AXES)}")
    points = []
    for r in reports:
        t = r["totals"]
        value = t["prunable_sparsity"] if x == "sparsity" else t["effective_macs"]
        run = r.get("run", {})
        label = f"{os.path.basename(os.path.normpath(r['_folder']))} ({run.get('algorithm', '?')}, {r.get('backend', '?')})"
        points.append({"label": label, "x": float(value), "accuracy": _accuracy(r, accuracy),
                       "algorithm": run.get("algorithm", "?")})
    return points


def plot_comparison(points: List[dict], path: str, x: str = "sparsity") -> str:
    """Test accuracy against measured sparsity (or effective MACs) across runs, one marker per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    colours = {}
    palette = ["#c0392b", "#2e86c1", "#27ae60", "#8e44ad", "#e67e22", "#16a085", "#7f8c8d"]
    scale = (lambda v: 100.0 * v) if x == "sparsity" else (lambda v: v / 1e6)
    seen: Dict[tuple, int] = {}
    for p in points:
        colour = colours.setdefault(p["algorithm"], palette[len(colours) % len(palette)])
        xv, yv = scale(p["x"]), 100.0 * p["accuracy"]
        ax.scatter([xv], [yv], color=colour, s=36)
        key = (round(xv, 6), round(yv, 6))  # runs at the same point: labels stacked, not overprinted
        ax.annotate(p["label"], (xv, yv), fontsize=7, xytext=(4, 3 + 9 * seen.get(key, 0)), textcoords="offset points")
        seen[key] = seen.get(key, 0) + 1
    for algorithm, colour in colours.items():  # one line per algorithm, in order of the x axis
        pts = sorted((scale(p["x"]), 100.0 * p["accuracy"]) for p in points if p["algorithm"] == algorithm)
        if len(pts) > 1:
            ax.plot([a for a, _ in pts], [b for _, b in pts], color=colour, lw=0.8, alpha=0.6, label=algorithm)
    if any(len([p for p in points if p["algorithm"] == a]) > 1 for a in colours):
        ax.legend(fontsize=8)
    ax.set_xlabel("measured sparsity of prunable weights (%)" if x == "sparsity" else "effective MMACs per sample")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{len(points)} run(s): test accuracy against measured {'sparsity' if x == 'sparsity' else 'FLOPs'}",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)
