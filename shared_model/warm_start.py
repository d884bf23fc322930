"""Warm start of the wide part: fit the per-modality linear terms alone, then train the network.

With ``model.unimodal_risk`` and ``unimodal_input='input'`` (the defaults) the log-risk is

    eta(b) = g(f_b) + sum_m (w_m . s_m(b) + c_m)

where s_m(b) is modality m's raw summary (:func:`shared_model.model.input_summary`) or m's
learned input-level missing token where b lacks m (the status logit likewise, with its own
w'_m, c'_m). Trained jointly from w = 0, the network g and the linear terms compete for the
same signal from the first step. :func:`warm_start_linear_terms` (``train.linear_warm_start``,
neither paper; centralised runs only, see :func:`shared_model.train.train_selected`) instead

1. sets every missing token to the mean summary of the training patients that have the
   modality (mean imputation, as the CoxPH baseline does);
2. fits all w_m jointly by minimising the penalised Cox partial likelihood
   ``(1/N) sum_sites nll_site(eta) + 0.5 * l2 * sum_m ||w_m||^2`` (each site its own risk sets,
   the model's ``cox_ties``; PARACHUTE eq. 8 with lifelines' ridge penalty) over the training
   rows, and, where status labels exist, the status weights by penalised logistic regression
   (intercept free) — full batch, L-BFGS in float64. As in lifelines' ``CoxPHFitter`` (and the
   CoxPH baseline), the columns are z-scored over the training rows first, so the penalty
   weighs every column on one scale (the fitted weights are mapped back to raw units).
   With ``train.linear_warm_start_pca`` = k > 0 an embedding modality's summary enters as
   its first k principal components (over the training patients that have it), as in the
   CoxPH baseline, and the fitted weights are mapped back through the components;
3. zeroes the last layer of the hazard and status heads, so the untrained network adds
   nothing: the warm-started model *is* that penalised linear model, and gradient training
   then adds what the network finds beyond it.

With ``model.agreement_components`` = k > 0 the model also has one agreement term per pair
of embedding modalities (:class:`shared_model.model.AgreementTerm`). Before step 2 its map
is fitted without labels on the training rows (:func:`shared_model.agreement.fit_agreement`:
the modalities' tokens, k axes each, each site centred on its training patients' mean
summary whatever ``train.standardize_embeddings`` — the centring the CoxPH agreement column
uses), and its score — the training mean where a patient lacks a modality, which
becomes the term's missing value — enters the penalised fits as one more column.

Only the training rows' labels and summaries are read (the caller's ``TrainPart.train_idx``):
never a validation or test patient's. The inputs are standardised, and sites centred, with
the statistics the caller's tensors carry; ``oncofed cv`` fits those on the fold's training
patients, validation rows included (no labels; never test patients), so the selection
run's warm start depends on the validation patients' inputs through them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from shared_model.agreement import fit_agreement
from shared_model.baselines import principal_axes
from shared_model.config import linear_warm_start_problem
from shared_model.losses import cox_partial_nll
from shared_model.model import FusionModel, agreement_pair, input_summary, modality_present, site_centred_summary

Tensor = torch.Tensor


@dataclass
class LinearDesign:
    """The training rows of every part as the linear terms see them (N patients in all).

    ``summaries``: modality -> float64 [N, D_m] raw summaries (0 where absent);
    ``present``: modality -> bool [N]; ``site``: int64 [N] part index;
    ``time`` [N] days, ``event`` [N], ``status`` [N] (0/1), ``status_mask`` bool [N].
    """

    summaries: dict[str, Tensor]
    present: dict[str, Tensor]
    site: Tensor
    time: Tensor
    event: Tensor
    status: Tensor
    status_mask: Tensor
    tokens: dict[str, list[np.ndarray]] = field(default_factory=dict)  # m -> site-centred [T_i, D_m] per patient with m
    centred: dict[str, Tensor] = field(default_factory=dict)  # m -> site-centred summaries [N, D_m] (0 where absent)

    def design(self, tokens: dict[str, Tensor]) -> dict[str, Tensor]:
        """modality -> [N, D_m]: the summary where present, ``tokens[m]`` [D_m] elsewhere."""
        return {m: torch.where(self.present[m][:, None], s, tokens[m][None, :])
                for m, s in self.summaries.items()}


@dataclass
class WarmStartFit:
    """What :func:`warm_start_linear_terms` fitted: penalised objectives at the optimum and
    the number of training patients (and labelled ones) it read."""

    cox_objective: float
    status_objective: float | None
    patients: int
    labelled: int


@torch.no_grad()
def linear_design(model: FusionModel, parts: Sequence, chunk: int = 64,
                  keep_tokens: Sequence[str] = ()) -> LinearDesign:
    """Summaries of the parts' training rows (``TrainPart.train_idx``), in chunks of ``chunk``;
    for the modalities ``keep_tokens`` also each present patient's valid tokens and summary,
    both minus the site's centre (:func:`shared_model.model.site_centred_summary`; float64)."""
    toks: dict[str, list[np.ndarray]] = {m: [] for m in keep_tokens}
    centred: dict[str, list[Tensor]] = {m: [] for m in keep_tokens}
    cols: dict[str, list[Tensor]] = {m: [] for m in model.modality_names}
    pres: dict[str, list[Tensor]] = {m: [] for m in model.modality_names}
    site, time, event, status, smask = [], [], [], [], []
    kinds = {s.name: s.kind for s in model.specs}
    for i, part in enumerate(parts):
        rows = np.asarray(part.train_idx, dtype=np.int64)
        for start in range(0, len(rows), chunk):
            batch = part.tensors.batch(rows[start:start + chunk])
            for m in model.modality_names:
                mb = batch.modalities[m]
                present = modality_present(mb, kinds[m])
                summary = input_summary(mb.values.double(), mb.mask.bool(), kinds[m])
                cols[m].append(torch.where(present[:, None], summary, torch.zeros_like(summary)))
                pres[m].append(present)
                if m in toks:
                    rows_m = torch.nonzero(present).squeeze(1)
                    cs = torch.zeros_like(summary)
                    if rows_m.numel():
                        cs[rows_m] = site_centred_summary(mb, rows_m, m).double()
                    centred[m].append(cs)
                    for i_row in rows_m.tolist():
                        centre = mb.centre[i_row].double()
                        toks[m].append((mb.values[i_row][mb.mask[i_row].bool()].double() - centre).cpu().numpy())
            site.append(torch.full((len(batch),), i, dtype=torch.int64))
            time.append(batch.time.double()), event.append(batch.event.double())
            status.append(batch.status.double()), smask.append(batch.status_mask.bool())
    if not site:
        raise ValueError("linear warm start: the parts have no training rows")
    return LinearDesign({m: torch.cat(v) for m, v in cols.items()}, {m: torch.cat(v) for m, v in pres.items()},
                        torch.cat(site), torch.cat(time), torch.cat(event), torch.cat(status), torch.cat(smask),
                        toks, {m: torch.cat(v) for m, v in centred.items()})


def agreement_columns(model: FusionModel, design: LinearDesign) -> dict[str, tuple[Tensor, float]]:
    """Fit every agreement term's map on the design's training rows and install it (in place).

    Returns term key -> (its column [N, 1] float64: the score where the patient has both
    modalities, the mean score elsewhere; that mean, the term's missing value)."""
    out = {}
    k = model.cfg.agreement_components
    for key, term in model.agreement.items():
        a, b = agreement_pair(key)
        both = design.present[a] & design.present[b]
        sa, sb = design.centred[a][both].numpy(), design.centred[b][both].numpy()
        amap = fit_agreement(design.tokens[a], design.tokens[b], sa, sb, k, (a, b))
        term.load_map(torch.from_numpy(amap.axes_a), torch.from_numpy(amap.axes_b),
                      torch.from_numpy(amap.rotation))
        score = torch.from_numpy(amap.score(sa, sb))
        fill = float(score.mean())
        col = torch.full((len(design.time),), fill, dtype=torch.float64)
        col[both] = score
        out[key] = (col[:, None], fill)
    return out


def standardised(x: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """Columns z-scored over the rows (sample std, as lifelines does before penalising); a
    constant column becomes 0 (its weight stays 0). Returns (z_m [N, D_m], (mean_m, std_m))."""
    z, scale = {}, {}
    for m, v in x.items():
        mean = v.mean(dim=0)
        std = v.std(dim=0) if len(v) > 1 else torch.zeros_like(mean)
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
        z[m], scale[m] = (v - mean) / std, (mean, std)
    return z, scale


def _lbfgs(params: list[Tensor], objective, max_iter: int) -> float:
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        value = float(objective())
    if not np.isfinite(value):
        raise FloatingPointError(f"linear warm start diverged (objective {value}); check the inputs")
    return value


def fit_cox_ridge(x: dict[str, Tensor], design: LinearDesign, l2: float, ties: str = "breslow",
                  max_iter: int = 200) -> tuple[dict[str, Tensor], float]:
    """Penalised Cox fit of eta = sum_m x_m @ w_m (``x``: modality -> [N, D_m]): risk sets within each site, loss
    ``sum_site nll / N + 0.5 * l2 * sum ||w_m||^2``. Returns (w_m [D_m], objective)."""
    n = len(design.time)
    w = {m: torch.zeros(v.shape[1], dtype=torch.float64, requires_grad=True) for m, v in x.items()}
    sites = [design.site == s for s in torch.unique(design.site)]

    def objective() -> Tensor:
        eta = sum(x[m] @ w[m] for m in x)
        nll = sum(cox_partial_nll(eta[s], design.time[s], design.event[s], ties=ties, reduction="sum")
                  for s in sites if int(s.sum()) >= 2)
        return nll / n + 0.5 * l2 * sum(v.pow(2).sum() for v in w.values())

    value = _lbfgs(list(w.values()), objective, max_iter)
    return {m: v.detach() for m, v in w.items()}, value


def fit_logistic_ridge(x: dict[str, Tensor], design: LinearDesign, l2: float,
                       max_iter: int = 200) -> tuple[dict[str, Tensor], Tensor, float]:
    """Penalised logistic fit of the status label on the labelled rows: mean BCE +
    ``0.5 * l2 * sum ||w_m||^2`` (intercept free). Returns (w_m [D_m], intercept [], objective)."""
    lab = design.status_mask
    w = {m: torch.zeros(v.shape[1], dtype=torch.float64, requires_grad=True) for m, v in x.items()}
    p = float(design.status[lab].mean().clamp(1e-3, 1 - 1e-3))
    c = torch.tensor(np.log(p / (1 - p)), dtype=torch.float64, requires_grad=True)

    def objective() -> Tensor:
        logit = sum(x[m][lab] @ w[m] for m in x) + c
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, design.status[lab])
        return bce + 0.5 * l2 * sum(v.pow(2).sum() for v in w.values())

    value = _lbfgs([*w.values(), c], objective, max_iter)
    return {m: v.detach() for m, v in w.items()}, c.detach(), value


@torch.no_grad()
def _zero_last_layer(head: torch.nn.Module | None) -> None:
    if head is None:
        return
    last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
    last.weight.zero_()
    last.bias.zero_()


@dataclass
class Reduction:
    """A modality's columns as the fit sees them: ``(x - offset) @ basis`` (x [N, D_m]).

    ``basis`` [D_m, k] (None = the columns themselves), ``offset`` [D_m] (None = 0)."""

    basis: Tensor | None = None
    offset: Tensor | None = None

    def apply(self, x: Tensor) -> Tensor:
        if self.basis is None:
            return x
        return (x - self.offset) @ self.basis

    def raw_weight(self, w: Tensor) -> Tensor:
        """[D_m] weights on x of the weights ``w`` [k] on the reduced columns (without the constant)."""
        return w if self.basis is None else self.basis @ w

    def raw_constant(self, w: Tensor) -> float:
        """The constant that ``apply(x) @ w = x @ raw_weight(w) - raw_constant(w)`` leaves out."""
        return 0.0 if self.basis is None else float(self.offset @ (self.basis @ w))


def principal_components(x: Tensor, k: int) -> Reduction:
    """The first ``min(k, n - 1, D)`` principal components of the rows ``x`` [n, D] (centred on
    their mean), with the CoxPH baseline's :func:`shared_model.baselines.principal_axes`.
    Fewer than 2 rows: no reduction."""
    if len(x) < 2:
        return Reduction()
    mean, axes = principal_axes(x.numpy(), k)
    return Reduction(torch.from_numpy(axes.T.copy()), torch.from_numpy(mean))


def warm_start_linear_terms(model: FusionModel, parts: Sequence, l2: float, pca: int = 0) -> WarmStartFit:
    """Fit ``model``'s per-modality linear terms on the parts' training rows (in place; see the
    module docstring). ``l2`` > 0: the ridge penalty (lifelines' ``penalizer``; the loss is a
    mean over patients). ``pca`` > 0: each embedding modality's summary enters the fit as its
    first ``pca`` principal components over the training patients that have it (tabular
    modalities as they are), as in the CoxPH baseline; the fitted weights are mapped back to
    the raw summary, so the model is unchanged in form. 0: the full summaries.
    Needs ``model.unimodal_risk`` with ``unimodal_input='input'``."""
    cfg = model.cfg
    problem = linear_warm_start_problem(cfg, l2, pca)
    if problem:
        raise ValueError(problem)
    pairs = [agreement_pair(key) for key in model.agreement]
    design = linear_design(model, parts, keep_tokens=sorted({m for pair in pairs for m in pair}))
    kinds = {s.name: s.kind for s in model.specs}
    tokens, reductions = {}, {}
    for m, s in design.summaries.items():
        have = design.present[m]
        token = model.missing[m].input.detach().double().cpu()  # the design lives on the CPU
        tokens[m] = s[have].mean(dim=0) if bool(have.any()) else token
        reductions[m] = principal_components(s[have], pca) if pca and kinds[m] != "tabular" else Reduction()
    x = {m: reductions[m].apply(v) for m, v in design.design(tokens).items()}
    agree = agreement_columns(model, design)
    for key, (col, _) in agree.items():
        x[f"agreement:{key}"], reductions[f"agreement:{key}"] = col, Reduction()
    z, scale = standardised(x)
    w, cox_value = fit_cox_ridge(z, design, l2, ties=cfg.cox_ties)
    labelled = int(design.status_mask.sum())
    status_fit = None
    if cfg.status_head and labelled >= 2 and 0 < float(design.status[design.status_mask].mean()) < 1:
        status_fit = fit_logistic_ridge(z, design, l2)
    if status_fit is not None:
        ws, c, _ = status_fit
        # logit = z @ ws + c = x @ raw_weight(ws / std) + intercept; the intercept sits on the first modality
        intercept = float(c) - sum(float((ws[k] * scale[k][0] / scale[k][1]).sum())
                                   + reductions[k].raw_constant(ws[k] / scale[k][1]) for k in ws)
    with torch.no_grad():
        for j, m in enumerate(model.modality_names):
            head = model.encoders[m].aux_head.net
            dtype = head.weight.dtype
            model.missing[m].input.copy_(tokens[m].to(dtype))
            # eta = z @ w = x @ raw_weight(w / std) + const
            head.weight[0].copy_(reductions[m].raw_weight(w[m] / scale[m][1]).to(dtype))
            head.bias[0] = 0.0
            if status_fit is not None:
                head.weight[1].copy_(reductions[m].raw_weight(ws[m] / scale[m][1]).to(dtype))
                head.bias[1] = intercept if j == 0 else 0.0
        for key, (_, fill) in agree.items():
            term, col = model.agreement[key], f"agreement:{key}"
            term.missing.fill_(fill)
            term.weight[0] = float(w[col][0] / scale[col][1][0])
            if status_fit is not None and len(term.weight) > 1:
                term.weight[1] = float(ws[col][0] / scale[col][1][0])
        _zero_last_layer(model.hazard_head)
        _zero_last_layer(model.status_head)
    return WarmStartFit(cox_value, None if status_fit is None else status_fit[2], len(design.time), labelled)
