"""Atomic checkpoints of a federated run, written after every round.

A checkpoint holds everything a resumed run needs to end with the same model as
an uninterrupted one: the global arrays, the last finished round, the server
optimiser's state (FedAdam/FedYogi moments and step counts), the model spec, the
resolved config and the per-round history. It is written to a temporary file in
the same folder and moved over the old one with ``os.replace`` (atomic on POSIX),
so a crash mid-write never leaves a half-written checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared_model.atomic import atomic_path
from shared_model.config import flatten_keys

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    optimizer_state: dict[str, Any]
    model_spec: str
    settings: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    sites: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    path = Path(run_dir) / CHECKPOINT_NAME
    with atomic_path(path) as tmp:
        torch.save(
            {
                "round": ckpt.round,
                "arrays": {k: torch.from_numpy(np.array(v, copy=True, order="C")) for k, v in ckpt.arrays.items()},
                "optimizer_state": ckpt.optimizer_state,
                "model_spec": ckpt.model_spec,
                "settings": ckpt.settings,
                "history": ckpt.history,
                "sites": ckpt.sites,
            },
            tmp,
        )
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The run's last checkpoint, or None when there is none."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt or foreign file: say which and why
        raise RuntimeError(f"cannot read checkpoint {path}: {exc}") from exc
    missing = [k for k in _REQUIRED_FIELDS if not isinstance(raw, dict) or k not in raw]
    if missing:  # e.g. a final_model.pt state_dict copied over it
        raise RuntimeError(f"cannot read checkpoint {path}: not an oncofed checkpoint "
                           f"(missing {', '.join(missing)})")
    try:
        return Checkpoint(
            round=int(raw["round"]),
            arrays={k: v.numpy() for k, v in raw["arrays"].items()},
            optimizer_state=raw["optimizer_state"],
            model_spec=raw["model_spec"],
            settings=raw["settings"],
            history=list(raw.get("history", [])),
            sites=dict(raw.get("sites", {})),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise RuntimeError(f"cannot read checkpoint {path}: a field has the wrong type ({exc})") from exc


_REQUIRED_FIELDS = ("round", "arrays", "optimizer_state", "model_spec", "settings")


# Settings a resumed run may change: how long it runs and waits, where files are, how a node
# runs (threads, device). Everything else decides what the rounds compute and must match.
RESUME_MAY_CHANGE = frozenset({
    "num_rounds", "node_wait_timeout", "round_timeout", "resume", "min_sites", "sites_dir", "results_dir",
    "model_config_path", "model_overrides", "config.train.num_threads", "config.train.device",
})


def resume_problems(ckpt: Checkpoint, settings: dict[str, Any], sites: dict[str, Any]) -> list[str]:
    """Why a run with ``settings`` (``FederationSettings.as_dict()``) and ``sites`` (each site's
    declaration: split, n_train, n_test, ...) cannot continue ``ckpt``; [] when it can.

    A resumed run must compute what the interrupted one would have: the same split (else one
    round's test patients could train the next), seed, local epochs, server optimiser and its
    hyper-parameters, evaluation grid and model config. A site present in both must declare the
    same split and patient counts. ``model_config_path`` / ``model_overrides`` may change as
    long as the resolved config they give is the same."""
    old, new = flatten_keys(ckpt.settings), flatten_keys(settings)
    problems = [f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}"
                for k in sorted(set(old) | set(new)) if k not in RESUME_MAY_CHANGE and old.get(k) != new.get(k)]
    for name in sorted(set(ckpt.sites) & set(sites)):
        for k in ("split", "n_train", "n_test", "n_patients"):
            a, b = ckpt.sites[name].get(k), sites[name].get(k)
            if a != b:
                problems.append(f"site {name} {k}: checkpoint {a!r}, now {b!r}")
    return problems
