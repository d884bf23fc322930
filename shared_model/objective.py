"""The one training step used by every trainer (centralised and federated).

:func:`training_step` computes, for one batch (switches from ``model.cfg``):

* the full pass: encode -> fuse -> heads; task loss l+ = Cox (mean over the
  batch, ``cfg.cox_ties``) + ``status_weight`` x BCE;
* random-modality drop (HAF §3.5, ``cfg.random_drop``): the fusion is re-run on
  the *same* encodings with k ~ U{1..M_i-1} modalities of each patient replaced
  by their missing tokens (HAF drops "on top of the aligned geometry", so the
  encoders are not run twice; this also halves the cost), giving l-, and
  HAF eq. 11: l+ + l- + lambda_mono * max(0, l+ - l-). When no patient has >= 2
  modalities nothing is dropped and only l+ is used;
* HAF alignment L_GA (eq. 5-7) on the full pass, weight ``lambda_align``;
* per-modality auxiliary losses: stage 1 with ``detach_stages`` (HAF eq. 3, 12),
  or unimodal supervision of undetached encoders with ``unimodal_aux`` > 0;
* with ``unimodal_risk`` the late-fusion residual sum_m a_m(b) is added to the
  heads' outputs in both passes (the drop pass uses the dropped modalities'
  missing tokens); under GCS it enters the head loss as a detached input, so
  the unimodal path receives the plain Cox gradient like the heads;
* ``extra_loss(model)`` (e.g. the FedProx proximal term), plainly;
* GCS (``cfg.use_gcs``, PARACHUTE Algorithm 1): the head loss
  L_head = (1 + lambda_mono I) l+ with I = 1[l+ > l-] (the full pass's share of
  eq. 11) is evaluated on detached features; the fusion path receives the
  steered gradient, the heads the plain one (:mod:`shared_model.gcs`); all other
  terms are backpropagated plainly. Without GCS the same terms are summed and
  backpropagated at once, so with the gate forced to 0 both paths give the same
  gradients.

Random numbers: ``rng`` (a dedicated generator, on any device) draws the drop
masks and one seed per step for the Rademacher probes; it is consumed
identically with and without GCS. Dropout uses the global torch RNG, also
consumed identically (the gate's look-ahead runs the heads in eval mode).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from shared_model.alignment import global_alignment_loss, random_modality_keep
from shared_model.batch import Batch
from shared_model.gcs import curvature_steering
from shared_model.losses import task_loss
from shared_model.model import FusionModel, add_unimodal

Tensor = torch.Tensor


def _task(model: FusionModel, risk: Tensor, status: Tensor | None, batch: Batch, rows: Tensor | None = None):
    cfg = model.cfg
    if rows is None:
        return task_loss(risk, status, batch.time, batch.event, batch.status, batch.status_mask,
                         ties=cfg.cox_ties, status_weight=cfg.status_weight)
    return task_loss(risk, status, batch.time[rows], batch.event[rows], batch.status[rows],
                     batch.status_mask[rows], ties=cfg.cox_ties, status_weight=cfg.status_weight)


def aux_weight(cfg) -> float:
    """Weight of the per-modality aux losses: ``unimodal_aux`` if > 0, else 1 with
    ``detach_stages`` (HAF stage 1), else 0 (no aux heads)."""
    if cfg.unimodal_aux > 0:
        return float(cfg.unimodal_aux)
    return 1.0 if cfg.detach_stages else 0.0


def _aux_loss(model: FusionModel, batch: Batch, encodings) -> Tensor | None:
    """``aux_weight`` x the sum over modalities of each aux head's task loss (patients with m)."""
    if aux_weight(model.cfg) == 0:
        return None  # aux heads built only for unimodal_risk
    total = None
    for enc in encodings.values():
        if enc.aux_risk is None or enc.rows.numel() < 2:
            continue
        loss = _task(model, enc.aux_risk, enc.aux_status, batch, enc.rows).total
        total = loss if total is None else total + loss
    return None if total is None else aux_weight(model.cfg) * total


def _check_finite(name: str, value: Tensor, batch: Batch) -> None:
    if not bool(torch.isfinite(value.detach()).all()):
        rows = batch.index.tolist()
        raise FloatingPointError(
            f"non-finite {name} ({float(value.detach())}) on the batch of site rows {rows[:16]}"
            f"{'...' if len(rows) > 16 else ''}; check these patients' inputs or lower the learning rate"
        )


def training_step(
    model: FusionModel,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    *,
    rng: torch.Generator,
    extra_loss: Callable[[FusionModel], Tensor] | None = None,
    grad_clip: float | None = None,
) -> dict[str, float]:
    """One optimiser step on ``batch``; returns the loss components as floats.

    Keys: ``total`` (the optimised objective), ``task`` (l+), ``cox``, ``bce``
    (full pass), ``partial`` (l-), ``mono`` (max(0, l+ - l-)), ``align``,
    ``align_sv``, ``align_pd``, ``aux``, ``extra``, ``gate`` (mean omega),
    ``curvature`` (mean c_b), ``gamma``, ``lookahead`` (gate objective J),
    ``grad_norm`` (before clipping), ``dropped`` (fraction of present modality
    entries dropped), ``ridge`` (``model.unimodal_l2`` penalty on the per-modality
    heads). GCS keys are 0 when GCS is off.
    """
    cfg = model.cfg
    if len(batch) < 2:
        raise ValueError(f"a training batch needs >= 2 patients (Cox risk sets), got {len(batch)}")
    model.train()
    optimizer.zero_grad(set_to_none=True)
    probe_seed = int(torch.randint(0, 2**62, (1,), generator=rng, device=rng.device))

    encodings = model.encode(batch)
    fused, _, present, missing_flag = model.fuse(batch, encodings)
    head_in = fused.detach().requires_grad_(True) if cfg.use_gcs else fused
    terms = model.unimodal_terms(batch, encodings)
    terms_in = terms
    if cfg.use_gcs and terms is not None:  # leaves, so the unimodal path gets the plain gradient
        terms_in = tuple(None if t is None else t.detach().requires_grad_(True) for t in terms)
    risk, status = add_unimodal(model.heads_forward(head_in), terms_in)
    full = _task(model, risk, status, batch)

    stats: dict[str, float] = {k: 0.0 for k in (
        "partial", "mono", "align", "align_sv", "align_pd", "aux", "extra", "gate", "curvature",
        "gamma", "lookahead", "dropped", "ridge")}
    coef_full = 1.0
    plain_terms: list[Tensor] = []
    total_value = full.total.detach()
    if cfg.random_drop:
        keep = random_modality_keep(present, rng)
        dropped = present & ~keep
        n_drop = int(dropped.sum())
        stats["dropped"] = n_drop / max(int(present.sum()), 1)
        if n_drop:
            fused_p, _, _, _ = model.fuse(batch, encodings, keep)
            risk_p, status_p = add_unimodal(model.heads_forward(fused_p),
                                            model.unimodal_terms(batch, encodings, keep))
            part = _task(model, risk_p, status_p, batch)
            violated = bool(full.total.detach() > part.total.detach())
            lam = cfg.lambda_mono if violated else 0.0
            coef_full = 1.0 + lam  # d/dl+ of eq. 11
            plain_terms.append((1.0 - lam) * part.total)  # d/dl- of eq. 11
            mono = torch.clamp_min(full.total.detach() - part.total.detach(), 0.0)
            total_value = total_value + part.total.detach() + cfg.lambda_mono * mono
            stats["partial"] = float(part.total.detach())
            stats["mono"] = float(mono)
    if cfg.use_alignment and cfg.lambda_align > 0:
        aligned, apresent = model.aligned(batch, encodings)
        al = global_alignment_loss(aligned, apresent, tau=cfg.align_tau, lambda_pd=cfg.lambda_pd)
        if al.n:
            plain_terms.append(cfg.lambda_align * al.total)
            total_value = total_value + cfg.lambda_align * al.total.detach()
        stats.update(align=float(al.total.detach()), align_sv=float(al.sv.detach()),
                     align_pd=float(al.pd.detach()))
    aux = _aux_loss(model, batch, encodings)
    if aux is not None:
        plain_terms.append(aux)
        total_value = total_value + aux.detach()
        stats["aux"] = float(aux.detach())
    ridge = model.unimodal_penalty()
    if ridge is not None:
        plain_terms.append(ridge)
        total_value = total_value + ridge.detach()
        stats["ridge"] = float(ridge.detach())
    if extra_loss is not None:
        extra = extra_loss(model)
        plain_terms.append(extra)
        total_value = total_value + extra.detach()
        stats["extra"] = float(extra.detach())
    _check_finite("training loss", total_value, batch)

    head_loss = coef_full * full.total
    plain = [t for t in plain_terms if t.requires_grad]
    plain_grads: list[Tensor | None] = [None] * len(plain)
    if cfg.use_gcs:
        gen = torch.Generator(device=fused.device).manual_seed(probe_seed)
        if terms is not None:  # plain gradient of the head loss into the unimodal path
            pairs = [(t, t_in) for t, t_in in zip(terms, terms_in) if t is not None]
            grads = torch.autograd.grad(head_loss, [t_in for _, t_in in pairs], retain_graph=True,
                                        allow_unused=True)
            for (t, _), g_t in zip(pairs, grads):
                if g_t is not None and t.requires_grad:
                    plain.append(t)
                    plain_grads.append(g_t)
        fixed_terms = None if terms_in is None else tuple(
            None if t is None else t.detach() for t in terms_in)

        def head_loss_fn(f: Tensor) -> Tensor:
            r, s = add_unimodal(model.heads_forward(f), fixed_terms)
            return coef_full * _task(model, r, s, batch).total

        res = curvature_steering(
            head_loss, head_in, model.head_parameters(), model.head_modules(), head_loss_fn,
            model.gcs_gate, missing_flag, gen,
            min_denominator=cfg.gcs_min_denominator, lookahead=cfg.gcs_lookahead,
            force_gate=cfg.gcs_force_gate,
        )
        for p, g in zip(model.head_parameters(), res.head_grads):
            if g is not None:
                p.grad = g.clone() if p.grad is None else p.grad + g
        torch.autograd.backward([fused, *plain], [res.feature_grad, *plain_grads])
        stats.update(gate=float(res.omega.mean()), curvature=float(res.curvature.mean()), gamma=res.gamma,
                     lookahead=0.0 if math.isnan(res.lookahead) else res.lookahead)
    else:
        loss = head_loss
        for t in plain:
            loss = loss + t
        loss.backward()

    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip is not None and grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
    _check_finite("gradient norm", grad_norm, batch)
    optimizer.step()
    stats.update(
        total=float(total_value), task=float(full.total.detach()), cox=float(full.cox.detach()),
        bce=float(full.bce.detach()), grad_norm=float(grad_norm),
    )
    return stats


@torch.no_grad()
def evaluation_losses(model: FusionModel, batch: Batch) -> dict[str, float]:
    """Validation losses in eval mode: ``total`` (task loss: Cox + w*BCE), ``cox``,
    ``bce``, ``align`` (L_GA, 0 when alignment is off)."""
    was = model.training
    model.eval()
    try:
        out = model(batch)
        t = _task(model, out.risk, out.status_logit, batch)
        align = 0.0
        if model.cfg.use_alignment:
            align = float(global_alignment_loss(out.aligned, out.present, model.cfg.align_tau,
                                                model.cfg.lambda_pd).total)
        res = {"total": float(t.total), "cox": float(t.cox), "bce": float(t.bce), "align": align}
    finally:
        model.train(was)
    for k, v in res.items():
        if not math.isfinite(v):
            raise FloatingPointError(f"non-finite validation {k} on site rows {batch.index.tolist()[:16]}")
    return res


@torch.no_grad()
def predict(model: FusionModel, batch: Batch) -> tuple[Tensor, Tensor | None]:
    """Eval-mode prediction: (log-risk [B], status probability [B] or None)."""
    was = model.training
    model.eval()
    try:
        out = model(batch)
    finally:
        model.train(was)
    prob = torch.sigmoid(out.status_logit) if out.status_logit is not None else None
    return out.risk, prob
