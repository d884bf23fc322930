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
    return Checkpoint(
        round=int(raw["round"]),
        arrays={k: v.numpy() for k, v in raw["arrays"].items()},
        optimizer_state=raw["optimizer_state"],
        model_spec=raw["model_spec"],
        settings=raw["settings"],
        history=list(raw.get("history", [])),
        sites=dict(raw.get("sites", {})),
    )
