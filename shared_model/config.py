"""Model and training configuration: typed dataclasses filled from YAML.

Defaults live in ``shared_model/defaults.yaml`` (values from the papers and the
authors' code, see ../shared/DESIGN.md §3-4); a user YAML or a Flower run config
overrides any field with dotted keys (``model.d_token=64``, ``train.lr=1e-3``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

DEFAULTS_PATH = Path(__file__).with_name("defaults.yaml")
PRESETS_DIR = Path(__file__).with_name("presets")


def resolve_config_path(path: str | Path) -> Path:
    """A YAML path, or the name of a preset in ``shared_model/presets`` (``haf``, ``parachute``)."""
    p = Path(path)
    if not p.exists() and p.suffix == "" and (PRESETS_DIR / f"{p.name}.yaml").exists():
        return PRESETS_DIR / f"{p.name}.yaml"
    return p


@dataclass
class ModelConfig:
    # --- adapters / encoders (PARACHUTE §3.4.1, DESIGN §3; HAF §3.3) ---
    d_inter: int = 256  # adapter width D_inter
    d_token: int = 128  # fusion token dim d (= HAF shared latent d_out)
    dropout: float = 0.1
    attn_dropout: float = 0.25
    bag_hidden: tuple[int, int] = (64, 32)  # CLAM-SB d1, d2 (HAF eq. 1)
    bag_dropout: float = 0.25
    tabular_hidden: int = 128
    # --- fusion (PARACHUTE eq. 4-7) ---
    n_heads: int = 4
    ffn_mult: int = 2
    topk: int = 16  # k+ = k- of LocXEmb
    dce_dim: int = 64  # f_dim of e_dyn before projection to d_token
    use_dce: bool = True
    # "attention": PARACHUTE fusion (LocXEmb + DCE + 4 MHCA); "concat": the
    # concatenation-MLP baseline (HAF's All-Modality Fusion MLP)
    fusion_mode: str = "attention"
    # stream of each modality kind for the X/Y cross-attention streams
    x_stream_kinds: tuple[str, ...] = ("sequence", "tabular")
    # --- heads ---
    hazard_hidden: int = 256  # 3-layer hazard MLP hidden width
    status_head: bool = True
    # --- HAF (eq. 5-7, 10-11) ---
    use_alignment: bool = True
    lambda_align: float = 1.0  # weight of L_GA in the total loss
    lambda_pd: float = 0.01
    align_tau: float = 1.0
    random_drop: bool = True
    lambda_mono: float = 0.1
    detach_stages: bool = False
    # Weight of the per-modality auxiliary task losses (Cox + status of a linear head
    # on each modality's pooled adapter output, patients with that modality), added
    # to the fused loss without detaching the encoders. 0 = off. With detach_stages
    # the aux heads are HAF's stage-1 supervision, weight 1 unless this is > 0.
    unimodal_aux: float = 0.0
    # Late-fusion residual: the predicted log-risk (and status logit) is the fused
    # head's output plus, for every modality, its aux head's output on the pooled
    # adapter (or on the adapter-level missing token where the patient lacks it).
    # Neither paper; builds the aux heads.
    unimodal_risk: bool = False
    # What those per-modality heads read: "adapter" (the pooled adapter output) or
    # "input" (the masked mean of the modality's input tokens; tabular: [values * observed,
    # observed]) — with unimodal_risk a linear Cox term on each modality's raw summary
    # (wide & deep), a patient lacking m gets m's learned input-space missing token.
    unimodal_input: str = "adapter"
    # Ridge penalty on those per-modality heads' weights (not their biases), added to the
    # training loss as 0.5 * unimodal_l2 * sum_m ||W_m||^2 — lifelines' penalizer for a
    # linear Cox term. 0 = off (AdamW's weight decay still applies).
    unimodal_l2: float = 0.0
    # k > 0: with the linear terms above, one more wide term per pair of embedding
    # modalities, w * s(b) on their cross-modal agreement s (shared_model/agreement.py: k
    # whitened principal axes per modality, rotation fitted without labels), read from each
    # site's centred summaries (shared_model.batch.fit_site_centres) whatever the input
    # standardisation. Fitted by the linear warm start (train.linear_warm_start, centralised
    # runs); elsewhere it stays inert (0). 0 = off.
    agreement_components: int = 0
    # --- GCS (PARACHUTE eq. 9-10, Algorithm 1) ---
    use_gcs: bool = True
    gcs_gamma_init: float = 0.1
    gcs_min_denominator: float = 1.0  # 1 + gamma * c is kept >= this (> 0)
    gcs_lookahead: float = 1.0  # feature-space step of the gate's look-ahead objective
    gcs_force_gate: float | None = None  # testing/ablation: fix the gate to this value
    # --- loss weights ---
    status_weight: float = 1.0
    cox_ties: str = "breslow"  # or "efron"


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 16
    optimizer: str = "adamw"  # adamw | adam
    lr: float = 1e-3
    weight_decay: float = 0.01
    scheduler: str = "cosine"  # cosine | plateau | none
    cosine_t_max: int = 80
    cosine_eta_min: float = 9e-4
    plateau_patience: int = 15
    plateau_factor: float = 0.5
    grad_clip: float = 5.0
    val_fraction: float = 0.2  # carved from the training fold, stratified by event
    early_stopping_patience: int = 20
    select_metric: str = "auto"  # auto | cindex | auc | loss
    min_epochs: int = 10  # no epoch before this is selected (noisy early validation)
    # After choosing the epoch on the validation rows, train a fresh model (same seed) on
    # the fit + validation rows for that many epochs and return it (centralised runs only;
    # shared_model.train.train_selected). False = return the selected model itself.
    refit: bool = False
    # Before gradient training, fit the per-modality linear terms alone (penalised Cox, and
    # logistic for status, full batch, ridge linear_warm_start_l2) on the training rows and
    # zero the heads' last layers, so training starts from that linear model
    # (shared_model.warm_start; centralised runs only, like refit). False = start from w = 0.
    linear_warm_start: bool = False
    linear_warm_start_l2: float = 0.5
    # 0 = fit on the full summaries; k > 0 = an embedding modality's summary enters the fit as
    # its first k principal components over the training patients (as the CoxPH baseline)
    linear_warm_start_pca: int = 16
    # Polyak averaging over epochs: after every epoch w_avg <- b w_avg + (1 - b) w
    # (w_avg = w after the first); validation, selection and the returned weights use
    # w_avg. 0 = off. One local epoch (a federated round) returns w itself.
    epoch_average: float = 0.0
    proximal_mu: float = 0.0  # FedProx term mu/2 ||w - w_global||^2
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # torch threads; 0 = leave torch's default
    # per-site standardisation of embedding inputs with the site's training statistics:
    # per_dimension | per_modality | none (tabular columns are always z-scored)
    standardize_embeddings: str = "per_dimension"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields whose value is one of a fixed set of words (checked when a config is loaded, so a typo
# fails before any site is read, not after the first epoch).
TIES = ("breslow", "efron")
UNIMODAL_INPUTS = ("adapter", "input")
EMBEDDING_STANDARDISATION = ("per_dimension", "per_modality", "none")
CHOICES: dict[str, tuple[str, ...]] = {
    "model.fusion_mode": ("attention", "concat"),
    "model.unimodal_input": UNIMODAL_INPUTS,
    "model.cox_ties": TIES,
    "train.optimizer": ("adamw", "adam"),
    "train.scheduler": ("cosine", "plateau", "none"),
    "train.select_metric": ("auto", "cindex", "auc", "loss"),
    "train.standardize_embeddings": EMBEDDING_STANDARDISATION,
}
_NONE_WORDS = ("", "none", "null")
# YAML 1.1 reads these as booleans; a run-config or --set string gets the same reading.
_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")


def _at_least(lo: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= lo), f">= {lo}"


def _above(lo: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > lo), f"> {lo}"


def _fraction(text: str = "in [0, 1)") -> tuple[Callable[[Any], bool], str]:
    return (lambda v: 0 <= v < 1), text


# Numeric fields and the values they accept (checked with CHOICES, so ``train.lr=0`` or
# ``train.batch_size=0`` fails when the config is loaded, naming the key, instead of training
# nothing or failing inside a loop). Every float must also be finite.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.d_inter": _at_least(1),
    "model.d_token": _at_least(1),
    "model.dropout": _fraction(),
    "model.attn_dropout": _fraction(),
    "model.bag_hidden": ((lambda v: len(v) == 2 and all(x >= 1 for x in v)), "two widths >= 1"),
    "model.bag_dropout": _fraction(),
    "model.tabular_hidden": _at_least(1),
    "model.n_heads": _at_least(1),
    "model.ffn_mult": _at_least(1),
    "model.topk": _at_least(1),
    "model.dce_dim": _at_least(1),
    "model.hazard_hidden": _at_least(1),
    "model.lambda_align": _at_least(0),
    "model.lambda_pd": _at_least(0),
    "model.align_tau": _above(0),
    "model.lambda_mono": _at_least(0),
    "model.unimodal_aux": ((lambda v: v >= 0), "a finite weight >= 0"),
    "model.unimodal_l2": ((lambda v: v >= 0), "a finite penalty >= 0"),
    "model.agreement_components": ((lambda v: v >= 0), "0 (off) or a number of axes >= 1"),
    "model.gcs_gamma_init": _above(0),
    "model.gcs_min_denominator": _above(0),
    "model.gcs_lookahead": _above(0),
    "model.gcs_force_gate": ((lambda v: v is None or 0 <= v <= 1), "none or in [0, 1]"),
    "model.status_weight": _at_least(0),
    "train.epochs": _at_least(0),
    "train.batch_size": ((lambda v: v >= 2), ">= 2 (a Cox risk set needs two patients)"),
    "train.lr": _above(0),
    "train.weight_decay": _at_least(0),
    "train.cosine_t_max": _at_least(1),
    "train.cosine_eta_min": _at_least(0),
    "train.plateau_patience": _at_least(0),
    "train.plateau_factor": ((lambda v: 0 < v < 1), "in (0, 1)"),
    "train.grad_clip": ((lambda v: v >= 0), ">= 0 (0 = no clipping)"),
    "train.val_fraction": _fraction("in [0, 1) (0 = no validation split)"),
    "train.early_stopping_patience": _at_least(0),
    "train.min_epochs": _at_least(0),
    "train.linear_warm_start_l2": ((lambda v: v > 0), "a finite penalty > 0"),
    "train.linear_warm_start_pca": ((lambda v: v >= 0), "0 (no reduction) or a number of components"),
    "train.epoch_average": _fraction("0 (off) or in (0, 1)"),
    "train.proximal_mu": _at_least(0),
    "train.num_threads": ((lambda v: v >= 0), ">= 0 (0 = torch's default)"),
    "train.device": ((lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None),
                     "auto, cpu, cuda or cuda:<n>"),
}


def range_problem(section: str, values: Any) -> str | None:
    """The first field of ``values`` (a ``section`` = "model" / "train" config, however built)
    outside its :data:`RANGES` (or a float that is not finite); None when all are inside."""
    for key, (ok, words) in RANGES.items():
        sec, name = key.split(".")
        if sec != section:
            continue
        v = getattr(values, name)
        finite = all(math.isfinite(x) for x in (v if isinstance(v, tuple) else (v,))
                     if isinstance(x, float))
        if not finite or not ok(v):
            return f"{key} must be {words}, got {v!r}"
    return None


def choice_problem(section: str, values: Any) -> str | None:
    """The first field of ``values`` (a ``section`` = "model" / "train" config, however built)
    whose word is not one of its :data:`CHOICES`; None when all are."""
    for key, words in CHOICES.items():
        sec, name = key.split(".")
        if sec == section and getattr(values, name) not in words:
            return f"{key} must be one of {words}, got {getattr(values, name)!r}"
    return None


def parse_bool(value: Any, key: str) -> bool:
    """A boolean from YAML or a run-config string (``true``/``false``/``yes``/``no``/``on``/``off``/1/0);
    ValueError naming ``key`` otherwise (``bool("false")`` would be True)."""
    try:
        return _coerce(value, False)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from exc


def parse_int(value: Any, key: str) -> int:
    """An integer from YAML or a run-config string, as a config's int fields read it ("3.0" is 3);
    ValueError "<key> must be an integer, got ..." otherwise (2.7, a boolean, a word)."""
    try:
        return _coerce(value, 0)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{key} must be an integer, got {value!r}") from exc


def parse_float(value: Any, key: str) -> float:
    """A number from YAML or a run-config string; ValueError "<key> must be a number, got ..."
    otherwise (a word, a boolean). Ranges are the caller's to check."""
    try:
        return _coerce(value, 0.0)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{key} must be a number, got {value!r}") from exc


def _coerce(value: Any, current: Any, optional: bool = False) -> Any:
    """Convert ``value`` (from YAML or a run-config string) to the type of ``current``;
    ``optional``: the field is ``float | None`` (``none`` / ``null`` / ``""`` give None)."""
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
        return None
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.strip().lower() in _TRUE_WORDS:
                return True
            if value.strip().lower() in _FALSE_WORDS:
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
            return bool(value)
        raise ValueError(f"not a boolean: {value!r}")
    if isinstance(value, bool) and (optional or isinstance(current, (int, float))):
        raise ValueError(f"not a number: {value!r}")
    if isinstance(current, int):
        number = float(value) if isinstance(value, str) else value  # "3.0" as YAML's 3.0
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(f"not an integer: {value!r}")
        return int(number)
    if isinstance(current, float) or optional:
        return float(value)
    if isinstance(current, tuple):
        if isinstance(value, str):  # "a,b" or "[a, b]" (YAML-style list on the command line)
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            value = [v.strip().strip("'\"") for v in text.split(",") if v.strip()]
        inner = current[0] if current else None
        return tuple(_coerce(v, inner) if inner is not None else v for v in value)
    if current is None and isinstance(value, str) and value.lower() in _NONE_WORDS:
        return None
    if isinstance(current, str) and not isinstance(value, str):
        raise ValueError(f"not a word: {value!r}")
    return value


def flatten_keys(nested: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys: ``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    flat: dict[str, Any] = {}
    for k, v in (nested or {}).items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            flat.update(flatten_keys(v, key))
        else:
            flat[key] = v
    return flat


def apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """Set dotted keys (``model.use_gcs``) or nested dicts on a copy of ``cfg``."""
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model), train=dataclasses.replace(cfg.train)
    )
    for key, value in flatten_keys(overrides).items():
        parts = key.split(".")
        if len(parts) != 2 or parts[0] not in ("model", "train"):
            raise KeyError(f"unknown config key {key!r} (expected model.<field> or train.<field>)")
        section = getattr(cfg, parts[0])
        if not hasattr(section, parts[1]):
            valid = ", ".join(f.name for f in dataclasses.fields(section))
            raise KeyError(f"unknown config key {key!r}; {parts[0]} fields: {valid}")
        current = getattr(section, parts[1])
        optional = "None" in str(_FIELD_TYPES[parts[0]][parts[1]])
        try:
            value = _coerce(value, current, optional)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config key {key!r}: {exc}") from exc
        if key in CHOICES and value not in CHOICES[key]:
            raise ValueError(f"config key {key!r}: {value!r} is not one of {', '.join(CHOICES[key])}")
        setattr(section, parts[1], value)
    return cfg


_FIELD_TYPES = {name: {f.name: f.type for f in dataclasses.fields(cls)}
                for name, cls in (("model", ModelConfig), ("train", TrainConfig))}


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults from ``defaults.yaml``, then the YAML at ``path`` (or preset name), then ``overrides``."""
    cfg = apply_overrides(Config(), yaml.safe_load(DEFAULTS_PATH.read_text()) or {})
    if path:
        p = resolve_config_path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read config {p}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"config {p}: the top level must be a mapping of sections (model:, train:), "
                             f"got a {type(data).__name__}")
        cfg = apply_overrides(cfg, data)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    for section in ("model", "train"):
        problem = range_problem(section, getattr(cfg, section))
        if problem:
            raise ValueError(problem)
    if cfg.train.select_metric == "auc" and not cfg.model.status_head:
        raise ValueError("train.select_metric=auc needs the status head (model.status_head=true); "
                         "with model.status_head=false select on cindex or loss (auto picks cindex)")
    if cfg.train.linear_warm_start:
        problem = linear_warm_start_problem(cfg.model, cfg.train.linear_warm_start_l2, cfg.train.linear_warm_start_pca)
        if problem:
            raise ValueError(problem)
    problem = agreement_problem(cfg)
    if problem:
        raise ValueError(problem)
    if cfg.train.refit and cfg.train.scheduler == "plateau":
        raise ValueError("train.scheduler=plateau cannot be used with train.refit=true: the refit trains on "
                         "all training patients, so no validation score is left to lower the learning rate "
                         "as in the selection run; use scheduler cosine or none, or refit=false")
    return cfg


def agreement_problem(cfg: Config) -> str | None:
    """Why ``model.agreement_components`` cannot be used with these settings (None: it can)."""
    k = cfg.model.agreement_components
    if k == 0:
        return None
    if k < 0:
        return f"model.agreement_components must be 0 (off) or a number of axes >= 1, got {k}"
    if not cfg.train.linear_warm_start:
        return ("model.agreement_components > 0 adds a wide term that only the linear warm start fits; "
                "set train.linear_warm_start=true (centralised runs) or model.agreement_components=0")
    return None


def linear_warm_start_problem(model: ModelConfig, l2: float, pca: int) -> str | None:
    """Why ``train.linear_warm_start`` cannot run with these settings (None: it can).

    Checked when a config is loaded and again by :func:`shared_model.warm_start.warm_start_linear_terms`."""
    if not (model.unimodal_risk and model.unimodal_input == "input"):
        return ("train.linear_warm_start=true fits the per-modality linear terms, which exist only with "
                "model.unimodal_risk=true and model.unimodal_input=input; for the papers' model (no linear "
                "terms) also set train.linear_warm_start=false, as --config parachute does")
    if not (l2 > 0 and math.isfinite(l2)):
        return f"train.linear_warm_start_l2 must be a finite penalty > 0, got {l2}"
    if pca < 0:
        return f"train.linear_warm_start_pca must be 0 (no reduction) or a number of components, got {pca}"
    return None
