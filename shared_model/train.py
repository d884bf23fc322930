"""The one local-training function: centralised baselines and federated clients call it.

``train_local`` trains a :class:`~shared_model.model.FusionModel` on the training
patients of one or several sites (``TrainPart``s). Batches are drawn *within* a
site (site-stratified batches, shuffled together): the Cox partial likelihood then
compares patients with the same baseline hazard, exactly as a federated client
does, so a centralised run on pooled data and a federated run see the same loss.

Model selection uses a validation split carved from the *training* patients
(:func:`carve_validation`), never the test fold (DESIGN §3, defect 5).
Device: CUDA when present (``train.device: auto``), else CPU.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from shared_model.batch import SiteTensors
from shared_model.config import Config, TrainConfig, range_problem
from shared_model.metrics import MetricUndefinedError, binary_auc, stratified_cindex
from shared_model.model import build_model
from shared_model.objective import evaluation_losses, predict, training_step
from shared_model.warm_start import warm_start_linear_terms

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine")
    return torch.device(name)


@dataclass
class TrainPart:
    """Training (and optional validation) patients of one site, as row indices."""

    tensors: SiteTensors
    train_idx: np.ndarray
    val_idx: np.ndarray | None = None

    @property
    def has_validation(self) -> bool:
        return self.val_idx is not None and len(self.val_idx) > 0


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int
    selection_metric: str
    best_score: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    patients: int = 0

    @property
    def final_train_loss(self) -> float:
        return float(self.history[-1]["train_loss"]) if self.history else float("nan")


def carve_validation(
    event: np.ndarray,
    train_idx: np.ndarray,
    fraction: float,
    seed: int,
    status: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split training rows into (fit, validation), stratified by event (and status label).

    Deterministic for a seed. Returns sorted int64 index arrays. At least one
    patient of each non-empty stratum stays in the fit part.
    """
    train_idx = np.asarray(train_idx, dtype=np.int64)
    if fraction <= 0 or len(train_idx) < 4:
        return np.sort(train_idx), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    strata = np.asarray(event)[train_idx].astype(np.int64)
    if status is not None:
        strata = strata * 3 + (np.asarray(status)[train_idx].astype(np.int64) + 1)
    val: list[np.ndarray] = []
    for s in np.unique(strata):
        rows = train_idx[strata == s]
        rows = rows[rng.permutation(len(rows))]
        k = int(round(fraction * len(rows)))
        k = min(k, len(rows) - 1)
        if k > 0:
            val.append(rows[:k])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    fit_idx = np.setdiff1d(train_idx, val_idx)
    return fit_idx, val_idx


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw | adam)")


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(cfg.cosine_t_max, 1), eta_min=cfg.cosine_eta_min
        )
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max", patience=cfg.plateau_patience, factor=cfg.plateau_factor
        )
    if cfg.scheduler == "none":
        return None
    raise ValueError(f"unknown scheduler {cfg.scheduler!r} (cosine | plateau | none)")


def proximal_term(anchor: dict[str, torch.Tensor], mu: float) -> Callable[[torch.nn.Module], torch.Tensor]:
    """FedProx: mu/2 * ||w - w_global||^2 over trainable parameters (Li et al., 2020)."""

    def term(model: torch.nn.Module) -> torch.Tensor:
        total = None
        for name, p in model.named_parameters():
            if p.requires_grad and name in anchor:
                d = (p - anchor[name]).pow(2).sum()
                total = d if total is None else total + d
        if total is None:
            return torch.zeros((), device=next(model.parameters()).device)
        return 0.5 * mu * total

    return term


class EpochAverage:
    """Exponential moving average of a model's weights over epochs (Polyak averaging).

    ``update(model)`` after each epoch: w_avg <- decay * w_avg + (1 - decay) * w for
    every floating parameter and buffer (w_avg = w at the first update). ``model``
    holds the averaged network (a copy; the trained one is left alone).
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.epoch_average must be 0 (off) or in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        src = model.state_dict()
        for name, avg in self.model.state_dict().items():
            if not avg.dtype.is_floating_point or self.updates == 0:
                avg.copy_(src[name])
            else:
                avg.mul_(self.decay).add_(src[name], alpha=1.0 - self.decay)
        self.updates += 1


@torch.no_grad()
def predict_rows(
    model: torch.nn.Module, tensors: SiteTensors, idx: np.ndarray, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray | None]:
    """Risk scores (log-risk, float64 [n]) and status probabilities ([n] or None) of rows ``idx``."""
    device = next(model.parameters()).device
    risks: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    idx = np.asarray(idx, dtype=np.int64)
    for start in range(0, len(idx), batch_size):
        batch = tensors.batch(idx[start : start + batch_size]).to(device)
        risk, prob = predict(model, batch)
        risks.append(risk.detach().cpu().double().numpy())
        if prob is not None:
            probs.append(prob.detach().cpu().double().numpy())
    risk_all = np.concatenate(risks) if risks else np.zeros(0)
    if not np.all(np.isfinite(risk_all)):
        raise FloatingPointError(
            f"site {tensors.site.name!r}: the model produced {int((~np.isfinite(risk_all)).sum())} "
            "non-finite risk scores (diverged training?)"
        )
    prob_all = np.concatenate(probs) if probs else None
    return risk_all, prob_all


def validation_score(
    model: torch.nn.Module, parts: Sequence[TrainPart], metric: str
) -> tuple[str, float | None]:
    """Score of the model on the parts' validation rows (higher is better).

    ``cindex``: Harrell's C over the validation rows with pairs compared within a
    site only (each site's C weighted by its comparable pairs — tiny sites' noisy
    C-indices do not dominate; risk sets within a site, like the training loss); ``auc``: status AUC
    on the pooled labelled validation rows; ``loss``: minus the validation loss.
    ``auto`` picks ``auc`` when the model has a status head and status labels exist in
    validation, else ``cindex``.
    Returns (metric used, score or None when undefined on this split).
    """
    vparts = [p for p in parts if p.has_validation]
    if not vparts:
        return metric, None
    if metric == "auto":
        has_status = model.cfg.status_head and any(bool(p.tensors.status_mask[p.val_idx].any()) for p in vparts)
        metric = "auc" if has_status else "cindex"
    was_training = model.training
    model.eval()
    try:
        if metric == "loss":
            device = next(model.parameters()).device
            total, n = 0.0, 0
            for p in vparts:
                batch = p.tensors.batch(p.val_idx).to(device)
                total += evaluation_losses(model, batch)["total"] * len(p.val_idx)
                n += len(p.val_idx)
            return metric, -total / max(n, 1)
        times, events, risks, strata, labels, probs = [], [], [], [], [], []
        for i, p in enumerate(vparts):
            risk, prob = predict_rows(model, p.tensors, p.val_idx)
            if metric == "cindex":
                times.append(p.tensors.site.time[p.val_idx])
                events.append(p.tensors.site.event[p.val_idx])
                risks.append(risk)
                strata.append(np.full(len(p.val_idx), i))
            elif metric == "auc":
                mask = p.tensors.site.status[p.val_idx] >= 0
                if prob is not None and mask.any():
                    labels.append(p.tensors.site.status[p.val_idx][mask])
                    probs.append(prob[mask])
            else:
                raise ValueError(f"unknown selection metric {metric!r} (auto | cindex | auc | loss)")
        try:
            if metric == "cindex":
                return metric, stratified_cindex(np.concatenate(times), np.concatenate(events),
                                                 np.concatenate(risks), np.concatenate(strata))
            if not labels:
                return metric, None
            return metric, binary_auc(np.concatenate(labels), np.concatenate(probs))
        except MetricUndefinedError:
            return metric, None
    finally:
        model.train(was_training)


def train_local(
    model: torch.nn.Module,
    parts: Sequence[TrainPart],
    cfg: TrainConfig,
    *,
    epochs: int | None = None,
    early_stopping: bool = True,
    proximal_anchor: dict[str, torch.Tensor] | None = None,
    seed: int | None = None,
    epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on the training rows of ``parts``.

    * ``epochs`` (default ``cfg.epochs``) full passes; each epoch visits every
      training patient once in batches of ``cfg.batch_size`` drawn within a site.
    * With ``early_stopping`` and validation rows present, the weights of the best
      validation epoch (``cfg.select_metric``) from epoch ``cfg.min_epochs`` on are
      restored at the end (small validation sets make epoch-1 scores mostly noise),
      and training stops after ``cfg.early_stopping_patience`` epochs without
      improvement.
    * ``cfg.epoch_average`` > 0: validation, selection and the returned weights use
      the average of the weights over epochs (:class:`EpochAverage`).
    * ``proximal_anchor`` (global weights) adds the FedProx term with
      ``cfg.proximal_mu``.
    * Seeded (``seed`` or ``cfg.seed``): same inputs, same seed -> same weights.
    """
    problem = range_problem("train", cfg)  # a TrainConfig built directly skips load_config's check
    if problem:
        raise ValueError(problem)
    seed = cfg.seed if seed is None else seed
    epochs = cfg.epochs if epochs is None else epochs
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    probe_gen = torch.Generator(device=device).manual_seed(seed + 1)
    torch.manual_seed(seed)  # dropout masks
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg)
    extra = None
    if proximal_anchor is not None and cfg.proximal_mu > 0:
        anchor = {k: v.detach().to(device) for k, v in proximal_anchor.items()}
        extra = proximal_term(anchor, cfg.proximal_mu)
    average = EpochAverage(model, cfg.epoch_average) if cfg.epoch_average != 0 else None
    n_train = int(sum(len(p.train_idx) for p in parts))
    if n_train < 2:
        raise ValueError(f"need at least 2 training patients, got {n_train}")

    result = TrainResult(0, 0, cfg.select_metric, None, patients=n_train)
    best_state = None
    since_best = 0
    t0 = time.perf_counter()
    model.train()
    for epoch in range(1, epochs + 1):
        batches = []
        for p in parts:
            if len(p.train_idx) < 2:
                continue
            batches.extend(
                p.tensors.iter_batches(p.train_idx, cfg.batch_size, shuffle=True, generator=gen)
            )
        order = torch.randperm(len(batches), generator=gen).tolist()
        sums: dict[str, float] = {}
        seen = 0
        for i in order:
            batch = batches[i].to(device)
            out = training_step(
                model, batch, opt, rng=probe_gen, extra_loss=extra, grad_clip=cfg.grad_clip
            )
            if not math.isfinite(out["total"]):
                raise FloatingPointError(
                    f"training diverged at epoch {epoch}: non-finite loss {out}; "
                    "lower train.lr or check the inputs"
                )
            n = len(batch)
            seen += n
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
        record = {f"train_{k}" if k != "total" else "train_loss": v / max(seen, 1) for k, v in sums.items()}
        record["epoch"] = epoch
        record["lr"] = opt.param_groups[0]["lr"]
        if average is not None:
            average.update(model)
        scored = model if average is None else average.model
        metric, score = validation_score(scored, parts, cfg.select_metric) if early_stopping else (
            cfg.select_metric, None)
        result.selection_metric = metric
        if score is not None:
            record[f"val_{metric}"] = score
        result.history.append(record)
        result.epochs_run = epoch
        if epoch_callback is not None:
            epoch_callback(epoch, record)
        if sched is not None:
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if score is not None:
                    sched.step(score)
            else:
                sched.step()
        if early_stopping and score is not None and epoch >= cfg.min_epochs:
            if result.best_score is None or score > result.best_score + 1e-6:
                result.best_score = score
                result.best_epoch = epoch
                best_state = copy.deepcopy(scored.state_dict())
                since_best = 0
            else:
                since_best += 1
                if epoch >= cfg.min_epochs and since_best >= cfg.early_stopping_patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        if average is not None:
            model.load_state_dict(average.model.state_dict())
        result.best_epoch = result.epochs_run
    result.seconds = time.perf_counter() - t0
    model.eval()
    return result


def build_on_device(specs, cfg: Config, seed: int) -> torch.nn.Module:
    """A fresh model from ``cfg.model`` seeded with ``seed``, on ``cfg.train.device`` (CUDA when
    present under ``auto``): what the federated client, ``oncofed cv`` and ``compare`` train."""
    return build_model(specs, cfg.model, seed=seed).to(resolve_device(cfg.train.device))


def model_builder(specs, cfg: Config, seed: int) -> Callable[[], torch.nn.Module]:
    """:func:`build_on_device` as a factory: a fresh model each call (``train_selected``'s ``build``)."""
    return lambda: build_on_device(specs, cfg, seed)


def warm_started(model: torch.nn.Module, parts: Sequence[TrainPart], cfg: TrainConfig) -> torch.nn.Module:
    """``model`` with its linear terms fitted on the parts' training rows when
    ``cfg.linear_warm_start`` (:func:`shared_model.warm_start.warm_start_linear_terms`)."""
    if cfg.linear_warm_start:
        fit = warm_start_linear_terms(model, parts, cfg.linear_warm_start_l2, cfg.linear_warm_start_pca)
        log.info("linear warm start on %d patients (%d with a status label): penalised Cox objective %.4f",
                 fit.patients, fit.labelled, fit.cox_objective)
    return model


def train_selected(
    build: Callable[[], torch.nn.Module], parts: Sequence[TrainPart], cfg: TrainConfig, *, seed: int | None = None,
) -> tuple[torch.nn.Module, TrainResult]:
    """Centralised training with model selection: :func:`train_local` with early stopping on
    the parts' validation rows (with ``cfg.linear_warm_start`` each fresh model's linear terms
    are first fitted on the rows it trains on); with ``cfg.refit`` a fresh model from ``build()`` is then
    trained on fit + validation rows for the selected number of epochs (no validation, the
    same seed and schedule) and returned instead. The result keeps the selection run's
    ``best_epoch``/``best_score``; its ``seconds`` and ``patients`` cover both runs / the refit.
    """
    model = warm_started(build(), parts, cfg)
    result = train_local(model, parts, cfg, seed=seed)
    if not cfg.refit or not any(p.has_validation for p in parts):
        return model, result
    full = [TrainPart(p.tensors, np.sort(np.concatenate([p.train_idx, p.val_idx]))
                      if p.has_validation else p.train_idx) for p in parts]
    refit = warm_started(build(), full, cfg)
    again = train_local(refit, full, cfg, epochs=result.best_epoch, early_stopping=False, seed=seed)
    result.seconds += again.seconds
    result.patients = again.patients
    return refit, result
