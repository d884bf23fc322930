"""Prediction heads on the fused vector f [B, d].

* :class:`HazardHead` — PARACHUTE's hazard network g_theta (§3.5): 3-layer MLP
  d -> H -> H -> 1 giving the Cox log-risk (log hazard ratio, unitless);
  H = ``model.hazard_hidden`` (default 64, PARACHUTE's code 256: defaults.yaml).
* :class:`StatusHead` — binary status logit (HAF eq. 9), MLP d -> H -> 1.
* :class:`AuxHead` — stage-1 supervision of one modality's adapter (HAF eq. 3,
  used with ``detach_stages``): Linear(D_inter -> 1 [+1 status]).

GELU activations (smooth, so the curvature GCS measures through the head is
not piecewise zero) and dropout ``cfg.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

Tensor = torch.Tensor


class HazardHead(nn.Module):
    def __init__(self, d: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def forward(self, f: Tensor) -> Tensor:
        """f [B, d] -> log-risk [B]."""
        return self.net(f).squeeze(-1)


class StatusHead(nn.Module):
    def __init__(self, d: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, f: Tensor) -> Tensor:
        """f [B, d] -> status logit [B]."""
        return self.net(f).squeeze(-1)


class AuxHead(nn.Module):
    """Per-modality linear head: log-risk and status logit. Reads the pooled adapter output
    [P, D_inter] (stage-1 head, ``model.unimodal_input=adapter``) or the modality's raw input
    summary [P, D_in] (the wide linear term, ``unimodal_input=input``; D_in = D_m, tabular 2 D_m)."""

    def __init__(self, d_inter: int, with_status: bool, zero_init: bool = False) -> None:
        super().__init__()
        self.with_status = with_status
        self.net = nn.Linear(d_inter, 2 if with_status else 1)  # d_inter: the width it reads (D_inter or D_in)
        if zero_init:  # a linear Cox term on raw inputs starts at beta = 0, as lifelines does
            nn.init.zeros_(self.net.weight)
            nn.init.zeros_(self.net.bias)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor | None]:
        """pooled [P, D_inter or D_in] -> (log-risk [P], status logit [P] or None)."""
        out = self.net(pooled)
        return out[:, 0], (out[:, 1] if self.with_status else None)
