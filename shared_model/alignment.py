"""HAF stage 2 and 3 pieces: shared-space projection, SVD alignment, random drop.

* :class:`Projection` — phi_m, HAF eq. 4: per-modality 2-layer MLP into the
  shared d-dim latent space (applied per adapter token).
* :func:`global_alignment_loss` — L_GA = mean L_SV + lambda_PD * L_PD (HAF eq. 5-7).
* :func:`random_modality_keep` — random-modality drop (HAF §3.5): for each
  patient with M_i >= 2 present modalities, drop k ~ U{1..M_i-1} of them.
* :func:`monotonic_fusion_loss` — HAF eq. 10-11 with lambda_MoFe applied (the
  author's code parses lambda but never uses it; DESIGN §4).

Deviations / precisions:

* L_PD (eq. 6) compares first left singular vectors, whose sign is arbitrary;
  we use |q_i^T q_j| (DESIGN §4). The numerator of eq. 6 is then 1/tau for every
  patient, as in the paper.
* SVD of padded matrices (a zero column per absent modality) has repeated zero
  singular values and NaN gradients; we group patients by presence pattern and
  run one unpadded batched SVD per group. The gradient through q_1 (a singular
  *vector*) is 1/(sigma_1^2 - sigma_j^2)-unstable when sigma_1 ~ sigma_2; for a
  patient whose relative gap (sigma_1^2 - sigma_2^2)/sigma_1^2 < ``gap_eps`` we
  use q_1 without gradient (its singular values still carry gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


class Projection(nn.Module):
    """phi_m (HAF eq. 4): Linear(D_inter->d) -> GELU -> Linear(d->d), per token."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@dataclass
class AlignmentLoss:
    """``total`` = mean L_SV + lambda_PD * L_PD (scalars); ``n`` patients with >= 2 modalities."""

    total: Tensor
    sv: Tensor
    pd: Tensor
    n: int


def global_alignment_loss(
    aligned: Tensor,
    present: Tensor,
    tau: float = 1.0,
    lambda_pd: float = 0.01,
    gap_eps: float = 1e-4,
) -> AlignmentLoss:
    """HAF eq. 5-7 on pooled aligned modality vectors.

    Args:
        aligned: float [B, M, d] — u^(m) of each patient (pooled projected tokens);
            rows of absent modalities are ignored.
        present: bool [B, M].
        tau: temperature of both losses (tau_1 in HAF; 1.0 in the author's scripts).
        lambda_pd: weight of L_PD (0.01, HAF §3.4.2).

    Per patient i with M_i >= 2 present modalities, U_i = [u/||u||] in R^{d x M_i},
    sigma = singular values (descending), L_SV_i = -log softmax(sigma / tau)[0]
    (eq. 5). L_PD = InfoNCE over those patients on q_1 (eq. 6) with |q_i^T q_j|.
    Returns zeros (attached to ``aligned``) when fewer than 1 (L_SV) or 2 (L_PD)
    patients qualify.
    """
    zero = aligned.sum() * 0.0
    counts = present.sum(dim=1)
    eligible = counts >= 2
    if not bool(eligible.any()):
        return AlignmentLoss(zero, zero, zero, 0)
    unit = F.normalize(aligned, dim=-1, eps=1e-8)
    sv_terms: list[Tensor] = []
    q1s: list[Tensor] = []
    patterns, inverse = torch.unique(present[eligible], dim=0, return_inverse=True)
    rows = torch.nonzero(eligible).squeeze(1)
    for g in range(patterns.shape[0]):
        pat = patterns[g]
        members = rows[inverse == g]
        u = unit[members][:, pat, :].transpose(1, 2)  # [n_g, d, M_g]
        with torch.no_grad():
            s_ng = torch.linalg.svdvals(u)
            gap = (s_ng[:, 0] ** 2 - s_ng[:, 1] ** 2) / s_ng[:, 0].clamp_min(1e-12) ** 2
            stable = gap >= gap_eps
        q_parts: list[Tensor] = []
        if bool(stable.any()):
            uq, s, _ = torch.linalg.svd(u[stable], full_matrices=False)
            sv_terms.append(-torch.log_softmax(s / tau, dim=1)[:, 0])
            q_parts.append(uq[:, :, 0])
        if bool((~stable).any()):
            s = torch.linalg.svdvals(u[~stable])  # gradient of sigma is stable
            sv_terms.append(-torch.log_softmax(s / tau, dim=1)[:, 0])
            with torch.no_grad():
                q_parts.append(torch.linalg.svd(u[~stable], full_matrices=False)[0][:, :, 0])
        q1s.extend(q_parts)
    sv = torch.cat(sv_terms).mean()
    q1 = torch.cat(q1s, dim=0)  # [n, d]
    n = q1.shape[0]
    if n >= 2:
        logits = (q1 @ q1.T).abs() / tau
        pd = F.cross_entropy(logits, torch.arange(n, device=logits.device))
    else:
        pd = zero
    return AlignmentLoss(sv + lambda_pd * pd, sv, pd, int(n))


def random_modality_keep(present: Tensor, rng: torch.Generator) -> Tensor:
    """Random-modality drop mask (HAF §3.5): bool [B, M], True = keep.

    For each patient with M_i >= 2 present modalities, k ~ U{1..M_i-1} of the
    present ones are dropped (uniformly chosen); others keep everything. Draws
    from ``rng`` (on its own device), so the global RNG (dropout) is untouched.
    """
    b, m = present.shape
    gen_dev = rng.device
    scores = torch.rand(b, m, generator=rng, device=gen_dev).to(present.device)
    frac = torch.rand(b, generator=rng, device=gen_dev).to(present.device)
    n_present = present.sum(dim=1)
    k = 1 + torch.floor(frac * (n_present - 1).clamp_min(0).to(frac.dtype)).long()
    k = torch.where(n_present >= 2, k.clamp_max((n_present - 1).clamp_min(0)), torch.zeros_like(k))
    scores = scores.masked_fill(~present, float("inf"))  # absent ones are never "dropped"
    rank = torch.argsort(torch.argsort(scores, dim=1), dim=1)  # 0 = smallest score
    drop = (rank < k[:, None]) & present
    return ~drop


@dataclass
class MonotonicLoss:
    """HAF eq. 11: ``total = l_full + l_partial + lambda * mono`` with ``mono`` = eq. 10."""

    total: Tensor
    mono: Tensor
    violated: bool  # indicator I = 1[l_full > l_partial]


def monotonic_fusion_loss(l_full: Tensor, l_partial: Tensor, lam: float) -> MonotonicLoss:
    """L_fusion = l+ + l- + lambda * max(0, l+ - l-) (HAF eq. 10-11)."""
    mono = torch.clamp_min(l_full - l_partial, 0.0)
    return MonotonicLoss(l_full + l_partial + lam * mono, mono, bool(l_full.detach() > l_partial.detach()))
