"""The federation's one network: PARACHUTE fusion + HAF alignment, modality-aware.

``FusionModel(specs, cfg)`` is built from the union of the sites' modality specs
(``sites.union_specs``), in that order, so every client instantiates the same
parameter set whatever it holds. Pipeline for a :class:`~shared_model.batch.Batch`
of B patients (each its own sequence):

1. **encode** (per modality m, only patients that have m): adapter tokens
   h_m [P, T_m, D_inter] (:mod:`shared_model.encoders`), HAF projection
   u_m = phi_m(h_m) [P, T_m, d] per token (HAF eq. 4), optional per-modality
   linear head on the pooled adapter output (stage-1 / aux head) or, with
   ``unimodal_input='input'`` (the default), on the raw input summary.
2. **fuse**: absent patients get the learned missing tokens — adapter level
   ``missing/<m>.adapter`` [D_inter] (used by LocXEmb) and fusion level
   ``missing/<m>.fusion`` [d] (replaces u_m) — then LocXEmb + DCE + 4 MHCA
   blocks (:mod:`shared_model.fusion`) give f [B, d]. Absent patients' stored
   values never reach an encoder: their rows are not passed in at all.
   Random-modality drop (HAF §3.5) re-runs only this stage on the same
   encodings with some modalities turned into missing ones.
3. **heads**: hazard log-risk [B] and status logit [B] (:mod:`shared_model.heads`).

m(b) of DCE (eq. 5) is 1 when the patient lacks a modality *its site
collects* (``batch.expected & ~present``). Modalities the site never collects
(site-level missingness) are represented by their missing tokens alone and do
not set m(b): otherwise every CPTAC patient (no tabular data) and every HANCOCK
patient (no CT) would be flagged and the flag would only encode the site.

With ``cfg.detach_stages`` (HAF §3.6), h is detached before phi_m and LocXEmb,
and u before the fusion, so the adapters learn from their auxiliary heads
(stage 1, every modality kind — HAF only has them for the pathology bags, but a
detached tabular adapter would otherwise never learn), phi_m from L_GA
(stage 2) and the fusion from the task loss (stage 3).

With ``cfg.unimodal_aux`` > 0 (a deviation from both papers, see defaults.yaml)
the same aux heads are built without detaching anything: each encoder gets its
own unimodal task loss (weight ``unimodal_aux``) beside the fused loss, so a
modality whose signal the fusion learns slowly still has to be read by its own
encoder (against modality competition: in a jointly trained network the
modality that lowers the loss first suppresses the other's gradient).

With ``cfg.unimodal_risk`` (a deviation from both papers, see defaults.yaml)
the prediction is a late-fusion residual: log-risk = hazard_head(f) +
sum_m a_m(b), where a_m(b) is modality m's aux head on the patient's pooled
adapter output, or on m's adapter-level missing token where the patient lacks m
(or m was dropped). Each modality then reaches the output by a path the other
modalities cannot crowd out; the fusion learns what the sum of the unimodal
terms misses. The status logit is built the same way. With
``cfg.unimodal_input == "input"`` the heads read each modality's raw summary
instead (masked mean of its input tokens; tabular [values * observed,
observed]) and a patient lacking m gets m's input-level missing token
``missing/<m>.input``: a linear Cox term per modality beside the network
(wide & deep), started at beta = 0.

With ``cfg.agreement_components`` = k > 0 the wide part also gets, for every pair (a, b) of
embedding (non-tabular) modalities, a term w_ab * s_ab(b) on their cross-modal agreement
(:class:`AgreementTerm`, :mod:`shared_model.agreement`; the missing value
``agreement.<a>~<b>.missing`` where the patient lacks a or b, or one was dropped). Its
projections are buffers fitted by the linear warm start; unfitted, the term is 0.

Parameter groups (for group-wise federated aggregation, DESIGN §7):
``encoder/<m>`` (adapter, phi_m, aux head), ``missing/<m>`` (m's adapter- and
fusion-level missing tokens), ``missing-input/<m>`` (m's input-level token, with
``unimodal_input='input'``; weighted apart, see :mod:`shared_model.groups`),
``fusion`` (modality-type embeddings, DCE MLP, MHCA blocks),
``dce_missing`` (t_miss), ``hazard_head``, ``status_head`` (only when
``cfg.status_head``), ``gcs_gate`` (always built, so toggling ``use_gcs`` keeps
the state_dict keys), ``agreement`` (only when ``cfg.agreement_components`` > 0).
"""

from __future__ import annotations


from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from shared_model.agreement import embedding_pairs
from shared_model.alignment import Projection
from shared_model.batch import Batch, ModalityBatch
from shared_model.config import ModelConfig, choice_problem, range_problem
from shared_model.encoders import make_adapter
from shared_model.fusion import ConcatFusion, ParachuteFusion, masked_mean
from shared_model.gcs import GCSGate
from shared_model.heads import AuxHead, HazardHead, StatusHead
from sites.types import ALL_KINDS, ModalitySpec

Tensor = torch.Tensor


def has_unimodal_heads(cfg: ModelConfig) -> bool:
    """Whether each modality gets its aux head: HAF's stage-1 heads (``detach_stages``), the
    auxiliary losses (``unimodal_aux`` > 0) or the late-fusion residual (``unimodal_risk``)."""
    return bool(cfg.detach_stages or cfg.unimodal_aux > 0 or cfg.unimodal_risk)


def input_summary_dim(spec: ModalitySpec) -> int:
    """Width of :func:`input_summary` for ``spec``: 2C for tabular (values, observed), else D."""
    return 2 * spec.dim if spec.kind == "tabular" else spec.dim


def input_summary(values: Tensor, mask: Tensor, kind: str) -> Tensor:
    """A modality's raw per-patient summary for the ``unimodal_input='input'`` heads.

    Token kinds: masked mean of values [P, T, D] over mask [P, T] -> [P, D] (the
    input embeddings' units, after the site's standardisation). Tabular: values
    [P, C], observed [P, C] -> [values * observed, observed] [P, 2C] (what the
    tabular adapter sees), so a linear head learns one offset per missing column.
    """
    if kind == "tabular":
        obs = mask.to(values.dtype)
        return torch.cat([values * obs, obs], dim=-1)
    return masked_mean(values, mask)


def site_centred_summary(mb: ModalityBatch, rows: Tensor, name: str = "modality") -> Tensor:
    """[R, D]: the token modality's summary (:func:`input_summary`) of patients ``rows`` minus
    their site's training-mean summary ``mb.centre`` (a site's batch offset removed, whatever
    the input standardisation). Raises ``ValueError`` naming the modality without centres."""
    if mb.centre is None:
        raise ValueError(f"{name}: the batch carries no site centre; build the site's tensors with "
                         "SiteTensors.for_training(site, specs, train_idx, ...)")
    summary = input_summary(mb.values[rows], mb.mask[rows].bool(), "sequence")
    return summary - mb.centre[rows].to(summary.dtype)


def modality_present(mb: ModalityBatch, kind: str) -> Tensor:
    """bool [B]: the patients who have the modality — tabular: ``present``; token kinds:
    ``present`` and at least one real token."""
    return mb.present.bool() if kind == "tabular" else mb.present.bool() & mb.mask.any(dim=1)


@dataclass
class ModalityEncoding:
    """Stage-1/2 output of one modality for the P patients that have it.

    ``present`` bool [B]; ``rows`` int64 [P] (batch rows with the modality);
    ``adapter`` [P, T, D_inter]; ``projected`` [P, T, d] (u, HAF eq. 4);
    ``mask`` bool [P, T]; ``aux_risk`` / ``aux_status`` [P] or None.
    """

    present: Tensor
    rows: Tensor
    adapter: Tensor
    projected: Tensor
    mask: Tensor
    aux_risk: Tensor | None = None
    aux_status: Tensor | None = None


@dataclass
class ModelOutput:
    """Forward result for B patients, M modalities (model order), d = d_token.

    ``fused`` [B, d]; ``risk`` [B] log-risk; ``status_logit`` [B] or None;
    ``aligned`` [B, M, d] pooled projected vectors u_m (0 where absent);
    ``present`` bool [B, M] (after any drop); ``missing_flag`` float [B] (m(b));
    ``locx`` [B, 2 * n_pairs] LocXEmb statistics; ``encodings`` the per-modality
    encodings (reused by random drop).
    """

    fused: Tensor
    risk: Tensor | None
    status_logit: Tensor | None
    aligned: Tensor
    present: Tensor
    missing_flag: Tensor
    locx: Tensor
    encodings: dict[str, ModalityEncoding] = field(default_factory=dict)


class ModalityEncoder(nn.Module):
    """Adapter + HAF projection phi_m (+ stage-1 aux head) of one modality."""

    def __init__(self, spec: ModalitySpec, cfg: ModelConfig) -> None:
        super().__init__()
        self.spec = spec
        self.adapter = make_adapter(spec, cfg.d_inter, cfg.dropout, cfg.bag_hidden, cfg.bag_dropout,
                                    cfg.tabular_hidden)
        self.projection = Projection(cfg.d_inter, cfg.d_token)
        has_aux = has_unimodal_heads(cfg)
        self.aux_on_input = cfg.unimodal_input == "input"
        aux_dim = input_summary_dim(spec) if self.aux_on_input else cfg.d_inter
        self.aux_head = AuxHead(aux_dim, cfg.status_head, zero_init=self.aux_on_input) if has_aux else None

    def forward(self, mb: ModalityBatch, detach_stages: bool) -> ModalityEncoding:
        kind = self.spec.kind
        if kind == "tabular":
            if mb.values.dim() != 2 or mb.values.shape[1] != self.spec.dim:
                raise ValueError(
                    f"modality {self.spec.name!r}: expected tabular values [B, {self.spec.dim}], "
                    f"got {tuple(mb.values.shape)}"
                )
        else:
            if mb.values.dim() != 3 or mb.values.shape[2] != self.spec.dim:
                raise ValueError(
                    f"modality {self.spec.name!r}: expected token values [B, T, {self.spec.dim}], "
                    f"got {tuple(mb.values.shape)}"
                )
        present = modality_present(mb, kind)
        rows = torch.nonzero(present).squeeze(1)
        dev = mb.values.device
        if rows.numel() == 0:
            d_inter = self.projection.net[0].in_features
            d = self.projection.net[2].out_features
            empty = mb.values.new_zeros
            return ModalityEncoding(present, rows, empty(0, 1, d_inter), empty(0, 1, d),
                                    torch.zeros(0, 1, dtype=torch.bool, device=dev))
        if kind == "tabular":
            values, in_mask = mb.values[rows], mb.mask[rows].bool()
        else:
            in_mask = mb.mask[rows].bool()
            t_used = int(torch.nonzero(in_mask.any(dim=0)).max()) + 1
            values, in_mask = mb.values[rows, :t_used], in_mask[:, :t_used]
        h, mask = self.adapter(values, in_mask)
        u = self.projection(h.detach() if detach_stages else h)
        aux_risk = aux_status = None
        if self.aux_head is not None:
            pooled = input_summary(values, in_mask, kind) if self.aux_on_input else masked_mean(h, mask)
            aux_risk, aux_status = self.aux_head(pooled)
        return ModalityEncoding(present, rows, h, u, mask, aux_risk, aux_status)


class MissingTokens(nn.Module):
    """Learned missing tokens of one modality: adapter level [D_inter], fusion level [d],
    and, with ``unimodal_input='input'``, input level [input_summary_dim] (what the
    modality's residual head reads for a patient who lacks it)."""

    def __init__(self, d_inter: int, d_token: int, d_input: int | None = None) -> None:
        super().__init__()
        self.adapter = nn.Parameter(torch.randn(d_inter) * 0.02)
        self.fusion = nn.Parameter(torch.randn(d_token) * 0.02)
        self.input = nn.Parameter(torch.randn(d_input) * 0.02) if d_input else None


class AgreementTerm(nn.Module):
    """Wide-part term on the cross-modal agreement of two embedding modalities a and b.

    term(b) = fitted * w . s(b), where s(b) = â^T M b̂ in [-1, 1] (:class:`AgreementMap`:
    whitened projections ``axes_a`` [k, D_a], ``axes_b`` [k, D_b] and ``rotation`` [k, k],
    buffers) of the patient's site-centred input summaries (:func:`site_centred_summary`:
    masked mean of its tokens minus its site's training mean) where it has both, else the
    learned ``missing`` value. ``weight`` [2] (log-risk, status logit) or [1] without a
    status head. ``fitted`` (buffer, 0/1) is set by
    :func:`shared_model.warm_start.warm_start_linear_terms`; until then the term is 0.
    """

    def __init__(self, dim_a: int, dim_b: int, k: int, status: bool) -> None:
        super().__init__()
        self.register_buffer("axes_a", torch.zeros(k, dim_a))
        self.register_buffer("axes_b", torch.zeros(k, dim_b))
        self.register_buffer("rotation", torch.zeros(k, k))
        self.register_buffer("fitted", torch.zeros(()))
        self.weight = nn.Parameter(torch.zeros(2 if status else 1))
        self.missing = nn.Parameter(torch.zeros(()))

    def score(self, a: Tensor, b: Tensor) -> Tensor:
        """s [P] of summaries a [P, D_a], b [P, D_b] (0 where a projection is 0)."""
        pa, pb = a @ self.axes_a.T, b @ self.axes_b.T
        ua = pa / pa.norm(dim=1, keepdim=True).clamp_min(1e-12)
        ub = pb / pb.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return ((ua @ self.rotation) * ub).sum(dim=1)

    @torch.no_grad()
    def load_map(self, axes_a: Tensor, axes_b: Tensor, rotation: Tensor) -> None:
        """Install a fitted map (shapes as the buffers) and mark the term fitted."""
        for buf, value in ((self.axes_a, axes_a), (self.axes_b, axes_b), (self.rotation, rotation)):
            if tuple(value.shape) != tuple(buf.shape):
                raise ValueError(f"agreement map: expected shape {tuple(buf.shape)}, got {tuple(value.shape)}")
            buf.copy_(value.to(buf.dtype))
        self.fitted.fill_(1.0)


def agreement_key(a: str, b: str) -> str:
    """The key of the agreement term of modalities a and b (``FusionModel.agreement``)."""
    return f"{a}~{b}"


def agreement_pair(key: str) -> tuple[str, str]:
    """The modalities (a, b) of the agreement term ``key`` (the inverse of :func:`agreement_key`)."""
    a, b = key.split("~")
    return a, b


class DCEMissingToken(nn.Module):
    """t_miss of DCE (PARACHUTE eq. 5), its own parameter group."""

    def __init__(self, d_token: int) -> None:
        super().__init__()
        self.t_miss = nn.Parameter(torch.randn(d_token) * 0.02)


def _validate(specs: Sequence[ModalitySpec], cfg: ModelConfig) -> None:
    if not specs:
        raise ValueError("FusionModel needs at least one modality spec")
    seen: set[str] = set()
    for s in specs:
        if not s.name or "." in s.name:
            raise ValueError(f"modality name {s.name!r} must be non-empty and contain no '.'")
        if s.name in seen:
            raise ValueError(f"modality {s.name!r} appears twice in the model specs")
        if s.kind not in ALL_KINDS:
            raise ValueError(f"modality {s.name!r}: unknown kind {s.kind!r}; expected one of {ALL_KINDS}")
        seen.add(s.name)
    # a ModelConfig built directly skips load_config's checks
    problem = choice_problem("model", cfg) or range_problem("model", cfg)
    if problem:
        raise ValueError(problem)
    bad = [k for k in cfg.x_stream_kinds if k not in ALL_KINDS]
    if bad:
        raise ValueError(f"model.x_stream_kinds has unknown kinds {bad}; expected a subset of {ALL_KINDS}")
    if cfg.unimodal_l2 > 0 and not has_unimodal_heads(cfg):
        raise ValueError(
            "model.unimodal_l2 > 0 penalises the per-modality heads, which exist only with "
            "model.unimodal_risk=true, model.unimodal_aux > 0 or model.detach_stages=true"
        )
    if cfg.unimodal_input == "input" and (cfg.detach_stages or not cfg.unimodal_risk):
        raise ValueError(
            "model.unimodal_input='input' needs model.unimodal_risk=true and model.detach_stages=false "
            "(heads on the raw inputs neither reach the prediction without the residual nor train the "
            "adapters as HAF's stage-1 heads); to run without the linear terms (the papers' model) set "
            "model.unimodal_risk=false together with model.unimodal_input=adapter, as --config parachute does"
        )
    if cfg.detach_stages and cfg.unimodal_risk:
        raise ValueError(
            "model.detach_stages=true with model.unimodal_risk=true: the residual adds the aux heads' "
            "outputs on the (undetached) adapters to the fused log-risk, so the task loss would train the "
            "adapters, which HAF's stage separation forbids; use one or the other"
        )


class FusionModel(nn.Module):
    """PARACHUTE + HAF fusion network over the modalities ``specs`` (model order)."""

    def __init__(self, specs: Sequence[ModalitySpec], cfg: ModelConfig) -> None:
        super().__init__()
        specs = tuple(specs)
        _validate(specs, cfg)
        self.specs = specs
        self.cfg = cfg
        self.modality_names = tuple(s.name for s in specs)
        self.encoders = nn.ModuleDict({s.name: ModalityEncoder(s, cfg) for s in specs})
        on_input = cfg.unimodal_input == "input"
        self.missing = nn.ModuleDict({
            s.name: MissingTokens(cfg.d_inter, cfg.d_token, input_summary_dim(s) if on_input else None)
            for s in specs
        })
        if cfg.fusion_mode == "attention":
            self.fusion = ParachuteFusion(
                [s.kind for s in specs], cfg.x_stream_kinds, cfg.d_token, cfg.n_heads, cfg.attn_dropout,
                cfg.dropout, cfg.ffn_mult, cfg.topk, cfg.dce_dim, cfg.use_dce,
            )
        else:  # "concat": validated in _validate
            self.fusion = ConcatFusion(len(specs), cfg.d_token, cfg.dropout)
        self.dce_missing = DCEMissingToken(cfg.d_token)
        self.hazard_head = HazardHead(cfg.d_token, cfg.hazard_hidden, cfg.dropout)
        self.status_head = (
            StatusHead(cfg.d_token, cfg.hazard_hidden, cfg.dropout) if cfg.status_head else None
        )
        self.gcs_gate = GCSGate(cfg.gcs_gamma_init)
        dims = {s.name: s.dim for s in specs}
        self.agreement = nn.ModuleDict({
            agreement_key(a, b): AgreementTerm(dims[a], dims[b], cfg.agreement_components, cfg.status_head)
            for a, b in embedding_pairs(specs)
        }) if cfg.agreement_components > 0 and cfg.unimodal_risk else nn.ModuleDict()

    # ------------------------------------------------------------------ groups
    def parameter_groups(self) -> dict[str, list[str]]:
        """Group name -> state_dict keys (parameters and buffers); every key exactly once."""
        prefixes: list[tuple[str, str]] = []
        for name in self.modality_names:
            prefixes.append((f"encoders.{name}.", f"encoder/{name}"))
            if self.missing[name].input is not None:  # its own weight (shared_model.groups)
                prefixes.append((f"missing.{name}.input", f"missing-input/{name}"))
            prefixes.append((f"missing.{name}.", f"missing/{name}"))
        prefixes += [("fusion.", "fusion"), ("dce_missing.", "dce_missing"),
                     ("hazard_head.", "hazard_head"), ("gcs_gate.", "gcs_gate")]
        if self.status_head is not None:
            prefixes.append(("status_head.", "status_head"))
        if len(self.agreement):
            prefixes.append(("agreement.", "agreement"))
        groups: dict[str, list[str]] = {g: [] for _, g in prefixes}
        for key in self.state_dict().keys():
            for prefix, g in prefixes:
                if key.startswith(prefix):
                    groups[g].append(key)
                    break
            else:
                raise RuntimeError(f"state_dict key {key!r} belongs to no parameter group")
        return groups

    def head_modules(self) -> list[nn.Module]:
        return [m for m in (self.hazard_head, self.status_head) if m is not None]

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.head_modules() for p in m.parameters()]

    def unimodal_penalty(self) -> Tensor | None:
        """Ridge term 0.5 * ``cfg.unimodal_l2`` * sum_m ||W_m||^2 over the per-modality heads'
        weights (biases unpenalised, as lifelines leaves the baseline hazard free); a scalar,
        or None when the penalty is 0 or there are no such heads."""
        lam = float(self.cfg.unimodal_l2)
        weights = [enc.aux_head.net.weight for enc in self.encoders.values() if enc.aux_head is not None]
        if lam == 0 or not weights:
            return None
        return 0.5 * lam * torch.stack([w.pow(2).sum() for w in weights]).sum()

    # ------------------------------------------------------------------ stages
    def _check_batch(self, batch: Batch) -> None:
        missing = [n for n in self.modality_names if n not in batch.modalities]
        if missing:
            raise ValueError(
                f"batch lacks model modalities {missing} (patients {batch.index.tolist()[:8]}...); "
                "build it with SiteTensors(site, model.specs)"
            )
        if batch.expected.shape[1] != len(self.modality_names):
            raise ValueError(
                f"batch.expected has {batch.expected.shape[1]} columns, model has "
                f"{len(self.modality_names)} modalities"
            )

    def encode(self, batch: Batch) -> dict[str, ModalityEncoding]:
        """Stages 1-2: per-modality encodings of the patients that have each modality."""
        self._check_batch(batch)
        return {n: self.encoders[n](batch.modalities[n], self.cfg.detach_stages) for n in self.modality_names}

    def fuse(
        self,
        batch: Batch,
        encodings: dict[str, ModalityEncoding],
        keep: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Stage 3: missing-token substitution + PARACHUTE fusion.

        ``keep`` bool [B, M] (random drop): modality j counts as absent for
        patient b where ``keep[b, j]`` is False. Returns (f [B, d], gamma
        [B, 2 n_pairs], present [B, M], missing_flag float [B]).
        """
        b = len(batch)
        detach = self.cfg.detach_stages
        adapters, tokens, masks, present_cols = [], [], [], []
        for j, name in enumerate(self.modality_names):
            enc = encodings[name]
            miss = self.missing[name]
            rows, h, u, mask = enc.rows, enc.adapter, enc.projected, enc.mask
            if keep is not None and rows.numel():
                sel = keep[rows, j]
                rows, h, u, mask = rows[sel], h[sel], u[sel], mask[sel]
            if detach:
                h, u = h.detach(), u.detach()
            t = h.shape[1]
            first = torch.zeros(t, dtype=torch.bool, device=h.device)
            first[0] = True
            base_h = (first[:, None].to(h.dtype) * miss.adapter[None, :]).expand(b, t, -1)
            base_u = (first[:, None].to(u.dtype) * miss.fusion[None, :]).expand(b, t, -1)
            base_m = first[None, :].expand(b, t)
            adapters.append(base_h.index_copy(0, rows, h))
            tokens.append(base_u.index_copy(0, rows, u))
            masks.append(base_m.index_copy(0, rows, mask))
            present_cols.append(torch.zeros(b, dtype=torch.bool, device=h.device).index_fill(0, rows, True))
        present = torch.stack(present_cols, dim=1)
        missing_flag = (batch.expected.bool() & ~present).any(dim=1).to(tokens[0].dtype)
        fused, gamma = self.fusion(adapters, tokens, masks, missing_flag, self.dce_missing.t_miss)
        return fused, gamma, present, missing_flag

    def aligned(self, batch: Batch, encodings: dict[str, ModalityEncoding]) -> tuple[Tensor, Tensor]:
        """Pooled projected vectors u_m: aligned [B, M, d] (0 where absent), present [B, M]."""
        b = len(batch)
        cols, pres = [], []
        for name in self.modality_names:
            enc = encodings[name]
            pooled = masked_mean(enc.projected, enc.mask)
            cols.append(pooled.new_zeros(b, pooled.shape[1]).index_copy(0, enc.rows, pooled))
            pres.append(enc.present)
        return torch.stack(cols, dim=1), torch.stack(pres, dim=1)

    def unimodal_terms(
        self, batch: Batch, encodings: dict[str, ModalityEncoding], keep: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None] | None:
        """Late-fusion residual sum_m a_m(b) (``cfg.unimodal_risk``; None when off).

        a_m(b) is m's aux head on the pooled adapter output of patient b, or on
        m's adapter-level missing token where b lacks m or ``keep[b, m]`` is
        False (random drop); with ``unimodal_input='input'`` on b's input summary
        (:func:`input_summary`) or m's input-level missing token. Returns
        (log-risk term [B], status term [B] or None).
        """
        if not self.cfg.unimodal_risk:
            return None
        b = len(batch)
        risk_sum: Tensor | None = None
        status_sum: Tensor | None = None
        for j, name in enumerate(self.modality_names):
            enc = encodings[name]
            head = self.encoders[name].aux_head
            miss = self.missing[name]
            token = miss.input if self.cfg.unimodal_input == "input" else miss.adapter
            miss_risk, miss_status = head(token[None, :])
            rows, a_risk, a_status = enc.rows, enc.aux_risk, enc.aux_status
            if keep is not None and rows.numel():
                sel = keep[rows, j]
                rows, a_risk = rows[sel], a_risk[sel]
                a_status = a_status[sel] if a_status is not None else None

            def per_patient(missing_value: Tensor, values: Tensor | None, rows: Tensor = rows) -> Tensor:
                """[B]: ``values`` on ``rows``, the missing token's value elsewhere."""
                out = missing_value.expand(b)
                return out.index_copy(0, rows, values) if rows.numel() else out

            r = per_patient(miss_risk, a_risk)
            risk_sum = r if risk_sum is None else risk_sum + r
            if miss_status is not None:
                st = per_patient(miss_status, a_status)
                status_sum = st if status_sum is None else status_sum + st
        assert risk_sum is not None
        for key, term in self.agreement.items():
            value = self.agreement_value(batch, key, keep)
            risk_sum = risk_sum + term.fitted * term.weight[0] * value
            if status_sum is not None and len(term.weight) > 1:
                status_sum = status_sum + term.fitted * term.weight[1] * value
        return risk_sum, status_sum

    def agreement_value(self, batch: Batch, key: str, keep: Tensor | None = None) -> Tensor:
        """[B]: the agreement score of term ``key`` where the patient has both modalities (and
        ``keep`` keeps both), the term's missing value elsewhere."""
        term = self.agreement[key]
        a, b = agreement_pair(key)
        both = None
        for name in (a, b):
            j = self.modality_names.index(name)
            has = modality_present(batch.modalities[name], self.specs[j].kind)
            if keep is not None:
                has = has & keep[:, j]
            both = has if both is None else both & has
        out = term.missing.expand(len(batch))
        rows = torch.nonzero(both).squeeze(1)
        if rows.numel() == 0:
            return out
        sa, sb = (site_centred_summary(batch.modalities[m], rows, m) for m in (a, b))
        return out.index_copy(0, rows, term.score(sa, sb).to(out.dtype))

    def heads_forward(self, fused: Tensor) -> tuple[Tensor, Tensor | None]:
        """Heads on fused f [B, d] -> (log-risk [B], status logit [B] or None)."""
        risk = self.hazard_head(fused)
        status = self.status_head(fused) if self.status_head is not None else None
        return risk, status

    def forward(self, batch: Batch, *, heads: bool = True) -> ModelOutput:
        """Full pass: encode, fuse, heads (``heads=False`` leaves risk/status None)."""
        encodings = self.encode(batch)
        fused, gamma, present, missing_flag = self.fuse(batch, encodings)
        aligned, _ = self.aligned(batch, encodings)
        risk = status = None
        if heads:
            risk, status = add_unimodal(self.heads_forward(fused), self.unimodal_terms(batch, encodings))
        return ModelOutput(fused, risk, status, aligned, present, missing_flag, gamma, encodings)

    # ------------------------------------------------------------------ info
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_bytes(self) -> int:
        """Size in bytes of the state_dict tensors (parameters + buffers)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


def add_unimodal(
    heads: tuple[Tensor, Tensor | None], terms: tuple[Tensor, Tensor | None] | None
) -> tuple[Tensor, Tensor | None]:
    """(log-risk, status logit) of the heads plus the late-fusion residual ``terms`` (if any)."""
    if terms is None:
        return heads
    risk, status = heads
    if status is not None and terms[1] is not None:
        status = status + terms[1]
    return risk + terms[0], status


def build_model(specs: Sequence[ModalitySpec], cfg: ModelConfig, seed: int = 0) -> FusionModel:
    """A :class:`FusionModel` with a seeded initialisation (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FusionModel(specs, cfg)
