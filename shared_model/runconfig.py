"""Flower run config (``[tool.flwr.app.config]`` + ``--run-config``) -> typed settings.

Server and clients receive the same run config; both parse it here so they agree
on the model configuration, the seed and the evaluation grid.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from shared_model import pooled_eval
from shared_model.config import Config, load_config, parse_bool, parse_float, parse_int


def oncofed_home() -> Path:
    """``$ONCOFED_HOME`` or ``~/.oncofed``: default place of built sites and run outputs."""
    return Path(os.environ.get("ONCOFED_HOME", Path.home() / ".oncofed")).expanduser()


def parse_overrides(text: str) -> dict[str, str]:
    """``"model.use_gcs=false; train.lr=0.001"`` -> ``{"model.use_gcs": "false", ...}``."""
    out: dict[str, str] = {}
    for item in text.replace("\n", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"model-overrides: {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _floats(text: str, key: str) -> tuple[float, ...]:
    """``"365,1095"`` -> ``(365.0, 1095.0)``; ValueError naming ``key`` for a part that is not a number."""
    return tuple(parse_float(x.strip(), f"run config {key}") for x in str(text).split(",") if x.strip())


@dataclass
class FederationSettings:
    sites: tuple[str, ...]
    sites_dir: Path
    results_dir: Path
    run_name: str
    num_rounds: int
    local_epochs: int
    seed: int
    min_sites: int
    node_wait_timeout: float
    round_timeout: float
    server_optimizer: str
    server_lr: float
    server_beta1: float
    server_beta2: float
    server_tau: float
    proximal_mu: float
    split: str
    resume: bool
    eval_time_bins: int
    eval_risk_bins: int
    eval_horizon_days: float
    eval_horizons_days: tuple[float, ...]
    eval_risk_groups: int
    model_config_path: str
    model_overrides: str
    config: Config

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "config"}
        d = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
        d["config"] = self.config.to_dict()
        return d


# train.* keys that only centralised training reads (the federated client trains a fixed number of
# local epochs per round, never selects an epoch, never refits or warm-starts): setting them in
# model-overrides is refused rather than silently ignored. (A model-config YAML may carry them, as the
# presets do, for its centralised use.)
FEDERATED_NO_EFFECT = {
    "train.seed": "set the run config's seed",
    "train.epochs": "use local-epochs and num-server-rounds",
    "train.val_fraction": "federated clients train on all their training patients",
    "train.early_stopping_patience": "no epoch is selected in a federated run",
    "train.select_metric": "no epoch is selected in a federated run",
    "train.min_epochs": "no epoch is selected in a federated run",
    "train.refit": "centralised runs only",
    "train.linear_warm_start": "centralised runs only",
    "train.linear_warm_start_l2": "centralised runs only",
    "train.linear_warm_start_pca": "centralised runs only",
}


SERVER_OPTIMIZERS = ("fedavg", "fedprox", "fedadam", "fedyogi")  # built by server.server_optimizers


def settings_from_run_config(rc: Mapping[str, Any]) -> FederationSettings:
    """Parse a Flower run config; missing keys take the pyproject defaults' values."""

    def get(key: str, default: Any) -> Any:
        return rc.get(key, default)

    def get_int(key: str, default: int) -> int:
        return parse_int(get(key, default), f"run config {key}")

    def get_float(key: str, default: float) -> float:
        return parse_float(get(key, default), f"run config {key}")

    home = oncofed_home()
    sites_dir = str(get("sites-dir", "")) or str(home / "sites")
    results_dir = str(get("results-dir", "")) or str(home / "results")
    server_optimizer = str(get("server-optimizer", "fedavg"))
    if server_optimizer not in SERVER_OPTIMIZERS:
        raise ValueError(f"server-optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, got {server_optimizer!r}")
    proximal_mu = get_float("proximal-mu", 0.01)
    overrides = parse_overrides(str(get("model-overrides", "")))
    inert = [f"{k} ({FEDERATED_NO_EFFECT[k]})" for k in overrides if k in FEDERATED_NO_EFFECT]
    if inert:
        raise ValueError("model-overrides sets keys that a federated run does not use: " + "; ".join(inert))
    if "train.proximal_mu" in overrides:  # one place for FedProx's mu, the one config.json records
        raise ValueError("model-overrides sets train.proximal_mu: set the run config's proximal-mu "
                         "(used with server-optimizer=fedprox) instead")
    # FedProx is a client-side term: only active when the fedprox optimizer is chosen.
    overrides.setdefault("train.proximal_mu", proximal_mu if server_optimizer == "fedprox" else 0.0)
    overrides.setdefault("train.seed", get_int("seed", 0))
    cfg: Config = load_config(str(get("model-config", "")) or None, overrides)
    settings = FederationSettings(
        sites=tuple(s.strip() for s in str(get("sites", "")).split(",") if s.strip()),
        sites_dir=Path(sites_dir).expanduser(),
        results_dir=Path(results_dir).expanduser(),
        run_name=str(get("run-name", "")),
        num_rounds=get_int("num-server-rounds", 10),
        local_epochs=get_int("local-epochs", 1),
        seed=get_int("seed", 0),
        min_sites=get_int("min-sites", 3),
        node_wait_timeout=get_float("node-wait-timeout", 60.0),
        round_timeout=get_float("round-timeout", 900.0),
        server_optimizer=server_optimizer,
        server_lr=get_float("server-lr", 0.01),
        server_beta1=get_float("server-beta1", 0.9),
        server_beta2=get_float("server-beta2", 0.99),
        server_tau=get_float("server-tau", 1e-3),
        proximal_mu=proximal_mu,
        split=str(get("split", "default")),
        resume=parse_bool(get("resume", False), "resume"),
        eval_time_bins=get_int("eval-time-bins", 512),
        eval_risk_bins=get_int("eval-risk-bins", 512),
        eval_horizon_days=get_float("eval-horizon-days", 0.0),
        eval_horizons_days=_floats(get("eval-horizons-days", "365,1095,1825"), "eval-horizons-days"),
        eval_risk_groups=get_int("eval-risk-groups", 2),
        model_config_path=str(get("model-config", "")),
        model_overrides=str(get("model-overrides", "")),
        config=cfg,
    )
    if settings.num_rounds < 1:
        raise ValueError("num-server-rounds must be >= 1")
    if settings.min_sites < 1:
        raise ValueError("min-sites must be >= 1")
    if settings.sites and settings.min_sites > len(settings.sites):
        raise ValueError(f"min-sites={settings.min_sites} but the run config lists only {len(settings.sites)} "
                         f"sites ({', '.join(settings.sites)}): the run could never start")
    if not (settings.node_wait_timeout >= 0 and settings.round_timeout > 0):
        raise ValueError(f"node-wait-timeout must be >= 0 and round-timeout > 0 seconds, got "
                         f"{settings.node_wait_timeout} and {settings.round_timeout}")
    try:  # the evaluation grid's settings, checked now instead of after round 1's training
        pooled_eval.make_grid(np.array([2.0, 0.0, 2.0]), None, horizon_days=settings.eval_horizon_days,
                              n_time_bins=settings.eval_time_bins, n_risk_bins=settings.eval_risk_bins,
                              horizons_days=settings.eval_horizons_days)
    except ValueError as exc:
        raise ValueError(f"run config eval-*: {exc}") from exc
    if settings.local_epochs < 1:
        raise ValueError(f"local-epochs must be >= 1 (a round with no local epoch sends the global weights "
                         f"back unchanged), got {settings.local_epochs}")
    if server_optimizer == "fedprox" and not (proximal_mu > 0 and math.isfinite(proximal_mu)):
        raise ValueError(f"proximal-mu must be > 0 with server-optimizer=fedprox (0 is plain FedAvg), "
                         f"got {proximal_mu}")
    if server_optimizer in ("fedadam", "fedyogi"):  # Reddi et al. 2021: eta > 0, beta in [0, 1), tau > 0
        if not (math.isfinite(settings.server_lr) and settings.server_lr > 0):
            raise ValueError(f"server-lr must be a finite number > 0 with server-optimizer={server_optimizer}, "
                             f"got {settings.server_lr}")
        for key, beta in (("server-beta1", settings.server_beta1), ("server-beta2", settings.server_beta2)):
            if not 0 <= beta < 1:  # 1 - beta**t = 0 would divide by zero: NaN weights after round 1
                raise ValueError(f"{key} must be in [0, 1) with server-optimizer={server_optimizer}, got {beta}")
        if not (math.isfinite(settings.server_tau) and settings.server_tau > 0):
            raise ValueError(f"server-tau must be a finite number > 0 with server-optimizer={server_optimizer} "
                             f"(it keeps the update's denominator away from 0), got {settings.server_tau}")
    if settings.eval_risk_groups not in (2, 3):
        raise ValueError("eval-risk-groups must be 2 (median split) or 3 (tertiles)")
    return settings
