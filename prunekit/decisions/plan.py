"""Pruning plans: the decisions of a run as plain data, replayable on either backend.

A plan holds, per layer name, any of: a weight mask, a rank, a keep ratio, the kept output
channel indices. It is saved as ``<path>.json`` (metadata, ranks, ratios, channel lists and the
model signature) plus ``<path>.npz`` (masks, stored as booleans). Loading checks the files
before anything is changed, and applying checks the plan against the model's layer signature,
so a plan from another model fails with a message naming the first mismatch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from prunekit.contract.layers import LayerInfo, signature
from prunekit.errors import PlanError

PLAN_FORMAT = "prunekit-plan/1"


@dataclass
class PruningPlan:
    model: str = ""
    algorithm: str = ""
    backend: str = ""
    layer_signature: List[Tuple[str, Tuple[int, ...]]] = field(default_factory=list)
    masks: Dict[str, np.ndarray] = field(default_factory=dict)
    ranks: Dict[str, int] = field(default_factory=dict)
    keep_ratios: Dict[str, float] = field(default_factory=dict)
    kept_channels: Dict[str, List[int]] = field(default_factory=dict)
    meta: Dict[str, object] = field(default_factory=dict)

    # ------------------------------------------------------------------ files
    @staticmethod
    def _paths(path: str) -> Tuple[str, str]:
        base = path[:-5] if path.endswith(".json") else path
        return base + ".json", base + ".npz"

    def save(self, path: str) -> Tuple[str, str]:
        json_path, npz_path = self._paths(path)
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        doc = {
            "format": PLAN_FORMAT,
            "model": self.model,
            "algorithm": self.algorithm,
            "backend": self.backend,
            "layer_signature": [[n, list(s)] for n, s in self.layer_signature],
            "ranks": {k: int(v) for k, v in self.ranks.items()},
            "keep_ratios": {k: float(v) for k, v in self.keep_ratios.items()},
            "kept_channels": {k: [int(i) for i in v] for k, v in self.kept_channels.items()},
            "mask_layers": sorted(self.masks),
            "meta": self.meta,
        }
        tmp_json, tmp_npz = json_path + ".tmp", npz_path + ".tmp.npz"
        with open(tmp_json, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        np.savez_compressed(tmp_npz, **{k: np.asarray(v).astype(bool) for k, v in self.masks.items()})
        os.replace(tmp_npz, npz_path)
        os.replace(tmp_json, json_path)
        return json_path, npz_path

    @classmethod
    def load(cls, path: str) -> "PruningPlan":
        json_path, npz_path = cls._paths(path)
        if not os.path.exists(json_path):
            raise PlanError(f"no pruning plan at {json_path}")
        try:
            with open(json_path) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"pruning plan {json_path} is damaged: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
            raise PlanError(f"{json_path} is not a prunekit plan (format {doc.get('format') if isinstance(doc, dict) else None!r})")
        masks = {}
        wanted = doc.get("mask_layers", [])
        if not isinstance(wanted, list):
            raise PlanError(f"pruning plan {json_path} is damaged: mask_layers is not a list")
        if wanted:
            if not os.path.exists(npz_path):
                raise PlanError(f"pruning plan {json_path} names masks but {npz_path} is missing")
            try:
                with np.load(npz_path, allow_pickle=False) as z:
                    raw = {k: z[k] for k in z.files}
            except Exception as e:  # zipfile/npy errors of many kinds (an object array: refused, never unpickled)
                raise PlanError(f"mask file {npz_path} is damaged: {e}") from None
            masks = {k: check_binary_mask(k, m, npz_path) for k, m in raw.items()}
            missing = sorted(set(wanted) - set(masks))
            if missing:
                raise PlanError(f"mask file {npz_path} lacks masks for {missing[:3]}")
        try:  # a well-formed json whose fields have the wrong types is damaged too
            return cls(
                model=doc.get("model", ""),
                algorithm=doc.get("algorithm", ""),
                backend=doc.get("backend", ""),
                layer_signature=[(n, tuple(int(d) for d in s)) for n, s in doc.get("layer_signature", [])],
                masks=masks,
                ranks={k: int(v) for k, v in doc.get("ranks", {}).items()},
                keep_ratios={k: float(v) for k, v in doc.get("keep_ratios", {}).items()},
                kept_channels={k: [int(i) for i in v] for k, v in doc.get("kept_channels", {}).items()},
                meta=doc.get("meta", {}),
            )
        except (TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"pruning plan {json_path} is damaged: {type(e).__name__}: {e}") from None

    # ------------------------------------------------------------------ checks
    def check_matches(self, layers: Sequence[LayerInfo], model_name: Optional[str] = None) -> None:
        """Raise :class:`PlanError` unless this plan was made for a model with these layers."""
        if model_name and self.model and self.model != model_name:
            raise PlanError(f"plan was made for model {self.model!r}, not {model_name!r}")
        mine = {n: tuple(s) for n, s in self.layer_signature}
        theirs = {n: tuple(s) for n, s in signature(layers)}
        if mine and mine != theirs:
            for n, s in mine.items():
                if n not in theirs:
                    raise PlanError(f"plan names layer {n!r}, which this model does not have")
                if theirs[n] != s:
                    raise PlanError(f"plan's layer {n!r} has weight shape {s}, the model's is {theirs[n]}")
            extra = sorted(set(theirs) - set(mine))
            raise PlanError(f"model has layers the plan does not know: {extra[:3]}")
        for n, m in self.masks.items():
            check_binary_mask(n, m, "plan")
            if n not in theirs:
                raise PlanError(f"plan has a mask for layer {n!r}, which this model does not have")
            if tuple(m.shape) != theirs[n]:
                raise PlanError(f"plan's mask for {n!r} has shape {tuple(m.shape)}, the weight is {theirs[n]}")


def check_binary_mask(name: str, mask, where: str) -> np.ndarray:
    """``mask`` as booleans if every entry is 0 or 1 (or a boolean); otherwise :class:`PlanError`
    naming the layer and the first other value (a mask of 0.5s, or of weights, is not a decision
    a plan can replay: reading it as ``!= 0`` would keep everything)."""
    m = np.asarray(mask)
    if m.dtype == bool:
        return m
    if m.dtype.kind not in "biuf":
        raise PlanError(f"{where}: mask {name!r} holds {m.dtype} values; a mask holds 0/1 (or booleans)")
    bad = ~((m == 0) | (m == 1))
    if bad.any():
        value = m[bad].flat[0]
        raise PlanError(f"{where}: mask {name!r} holds {int(bad.sum())} value(s) other than 0 and 1 "
                        f"(first: {value!r}); a mask holds 0/1 (or booleans)")
    return m.astype(bool)
