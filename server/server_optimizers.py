"""Server optimisers applied per parameter group (Reddi et al., 2021, "Adaptive
Federated Optimization"), with checkpointable state.

The client-weighted aggregate x̄ of a round gives the pseudo-gradient Δ = x̄ − x.
* ``fedavg`` / ``fedprox``: x ← x̄ (FedProx differs on the clients only: the
  proximal term μ/2‖w − x‖² in local training).
* ``fedadam``: m ← β₁m + (1−β₁)Δ, v ← β₂v + (1−β₂)Δ², x ← x + η̂ m/(√v + τ),
  with η̂ = η √(1−β₂^{t+1}) / (1−β₁^{t+1}) exactly as ``flwr.serverapp.strategy.FedAdam``.
* ``fedyogi``: v ← v − (1−β₂)Δ² sign(v − Δ²), x ← x + η m/(√v + τ) (as flwr's FedYogi).

Buffers (``averaged``: BatchNorm running statistics, fitted projections) are statistics, not
parameters: they take the client-weighted aggregate x̄ under every optimiser, with no moments
(an adaptive step could push a running variance below 0).

Per group: a group that no client informed this round (total weight 0) is left
untouched — its value, moments and step count do not change — so a modality no
site has never drifts under momentum. ``t`` counts each group's own updates.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from shared_model.runconfig import SERVER_OPTIMIZERS


class ServerOptimizer:
    name = "fedavg"

    def step(
        self,
        current: Mapping[str, np.ndarray],
        aggregate: Mapping[str, np.ndarray],
        groups: Mapping[str, Sequence[str]],
        informed: set[str],
        averaged: set[str] = frozenset(),
    ) -> dict[str, np.ndarray]:
        """New global arrays from the current ones and this round's aggregate (``averaged``: keys
        that take the aggregate itself whatever the optimiser)."""
        out = {k: np.array(v, copy=True) for k, v in current.items()}
        for g in informed:
            for k in groups[g]:
                out[k] = np.array(aggregate[k], copy=True)
        return out

    def state_dict(self) -> dict:
        return {"name": self.name}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("name") != self.name:
            raise ValueError(
                f"checkpoint was written by server optimizer {state.get('name')!r}, "
                f"this run uses {self.name!r}"
            )


class _Adaptive(ServerOptimizer):
    def __init__(self, eta: float, beta1: float, beta2: float, tau: float) -> None:
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.t: dict[str, int] = {}

    def _update_v(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _lr(self, t: int) -> float:  # pragma: no cover
        raise NotImplementedError

    def step(self, current, aggregate, groups, informed, averaged=frozenset()):
        out = {k: np.array(v, copy=True) for k, v in current.items()}
        for g in informed:
            t = self.t.get(g, 0) + 1
            self.t[g] = t
            lr = self._lr(t)
            for k in groups[g]:
                if k in averaged:
                    out[k] = np.array(aggregate[k], copy=True)
                    continue
                x = np.asarray(current[k], dtype=np.float64)
                delta = np.asarray(aggregate[k], dtype=np.float64) - x
                m = self.m.get(k, np.zeros_like(x))
                v = self.v.get(k, np.zeros_like(x))
                m = self.beta1 * m + (1.0 - self.beta1) * delta
                v = self._update_v(v, delta)
                self.m[k], self.v[k] = m, v
                out[k] = np.asarray(x + lr * m / (np.sqrt(v) + self.tau), dtype=np.asarray(current[k]).dtype)
        return out

    def state_dict(self) -> dict:
        return {
            "name": self.name,
            "m": {k: v.copy() for k, v in self.m.items()},
            "v": {k: v.copy() for k, v in self.v.items()},
            "t": dict(self.t),
        }

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.m = {k: np.asarray(v, dtype=np.float64) for k, v in state["m"].items()}
        self.v = {k: np.asarray(v, dtype=np.float64) for k, v in state["v"].items()}
        self.t = {k: int(v) for k, v in state["t"].items()}


class FedAdam(_Adaptive):
    name = "fedadam"

    def _update_v(self, v, delta):
        return self.beta2 * v + (1.0 - self.beta2) * delta**2

    def _lr(self, t: int) -> float:
        return self.eta * np.sqrt(1 - self.beta2 ** (t + 1.0)) / (1 - self.beta1 ** (t + 1.0))


class FedYogi(_Adaptive):
    name = "fedyogi"

    def _update_v(self, v, delta):
        return v - (1.0 - self.beta2) * delta**2 * np.sign(v - delta**2)

    def _lr(self, t: int) -> float:
        return self.eta


class FedProx(ServerOptimizer):
    name = "fedprox"


def make_server_optimizer(
    name: str, *, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
) -> ServerOptimizer:
    """``fedavg`` | ``fedprox`` | ``fedadam`` | ``fedyogi`` (run config ``server-optimizer``)."""
    if name == "fedavg":
        return ServerOptimizer()
    if name == "fedprox":
        return FedProx()
    if name == "fedadam":
        return FedAdam(eta, beta1, beta2, tau)
    if name == "fedyogi":
        return FedYogi(eta, beta1, beta2, tau)
    raise ValueError(f"unknown server-optimizer {name!r} ({' | '.join(SERVER_OPTIMIZERS)})")
