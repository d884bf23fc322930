"""Flower ClientApp: one hospital site (Flower 1.41 Message API).

Messages handled (the server drives them in this order):

* ``query``            — handshake: the site's modality declaration (site.yaml
                         content, patient counts); the server builds the union model.
* ``train``            — load the global arrays, run the shared local-training
                         function on the site's training split, reply with the
                         arrays and the aggregate counts that weight each group.
* ``evaluate``         — pass 1 of the pooled evaluation: predictions on the
                         held-out split (kept on the client), per-site metrics and
                         the moments (n, Σs, Σs²) the server needs to fix the grid.
* ``evaluate.counts``  — pass 2: additive counts on the server's grid.

What leaves the client: parameters, patient counts, moments and metrics of the held-out
predictions, and the pass-2 count table. At the default grid most non-empty cells of that table
hold one patient, so it is a coarsened, de-identified table of the test patients' (time bin,
event, risk bin), not an anonymous aggregate (``server/EVALUATION.md`` §4). No identifier,
feature, exact time or exact score is sent: a site with fewer held-out patients than its
``eval-min-patients`` sends no evaluation statistics, and a grid finer than its ``eval-*`` limits
is refused (``client.site_context.EvaluationLimits``); a site folder that fails validation is
reported to the server by name, problem count and top-level file only (details stay in the
node's log).
"""

from __future__ import annotations

import time
import zlib

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site_context import embedding_standardisation, evaluation_limits, load_site_cached, site_path
from shared_model import pooled_eval
from shared_model.batch import SiteTensors
from shared_model.groups import training_counts
from shared_model.metrics import (MetricUndefinedError, binary_auc, harrell_cindex, time_dependent_auc,
                                  uno_cindex)
from shared_model.runconfig import settings_from_run_config
from shared_model.specs import specs_from_json, specs_to_json
from shared_model.train import TrainPart, build_on_device, predict_rows, train_local

app = ClientApp()

_CACHE_KEY = "oncofed-eval-cache"


def _site_seed(seed: int, server_round: int, site: str) -> int:
    """Deterministic per-(round, site) seed: resumed runs reproduce uninterrupted ones."""
    return (seed * 1_000_003 + server_round * 7919 + zlib.crc32(site.encode())) % (2**31 - 1)


def _setup(msg: Message, context: Context):
    settings = settings_from_run_config(context.run_config)
    site = load_site_cached(site_path(context.node_config, settings))
    cfg_rec = msg.content["config"]
    specs = specs_from_json(str(cfg_rec["model-spec"]))
    unknown = [m for m in site.spec.modality_names if m not in {s.name for s in specs}]
    if unknown:
        raise ValueError(f"site {site.name!r}: modalities {unknown} are not in the federation's model")
    split = site.resolve_split(settings.split)
    return settings, site, cfg_rec, specs, split


def _tensors(site, specs, split, context: Context, settings) -> SiteTensors:
    """The site's tensors, inputs standardised with its training rows (this node's choice)."""
    return SiteTensors.for_training(site, specs, split.train, embedding_standardisation(context.node_config, settings))


def _model(specs, settings, arrays: ArrayRecord):
    if settings.config.train.num_threads:
        torch.set_num_threads(settings.config.train.num_threads)
    model = build_on_device(specs, settings.config, settings.seed)
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Handshake: what this site declares (no patient-level data)."""
    settings = settings_from_run_config(context.run_config)
    site = load_site_cached(site_path(context.node_config, settings))
    split = site.resolve_split(settings.split)
    info = ConfigRecord(
        {
            "site": site.name,
            "cohort": site.spec.cohort,
            "simulated": bool(site.spec.simulated),
            "tasks": ",".join(site.spec.tasks),
            "modalities": specs_to_json(site.spec.modalities),
            "n-patients": int(len(site)),
            "n-train": int(len(split.train)),
            "n-test": int(len(split.test)),
            "split": split.name,
            "standardize-embeddings": embedding_standardisation(context.node_config, settings),
        }
    )
    return Message(RecordDict({"site": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    settings, site, cfg_rec, specs, split = _setup(msg, context)
    server_round = int(cfg_rec["server-round"])
    model = _model(specs, settings, msg.content["arrays"])
    anchor = None
    if settings.config.train.proximal_mu > 0:
        anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    tensors = _tensors(site, specs, split, context, settings)
    result = train_local(
        model,
        [TrainPart(tensors, split.train)],
        settings.config.train,
        epochs=int(cfg_rec.get("local-epochs", settings.local_epochs)),
        early_stopping=False,
        proximal_anchor=anchor,
        seed=_site_seed(settings.seed, server_round, site.name),
    )
    counts = training_counts(site, split.train, specs, random_drop=settings.config.model.random_drop)
    metrics = MetricRecord(
        {
            **counts,
            "train-loss": float(result.final_train_loss),
            "train-seconds": float(time.perf_counter() - t0),
            "torch-threads": int(torch.get_num_threads()),
        }
    )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": metrics,
                          "site": ConfigRecord({"site": site.name})})
    return Message(content, reply_to=msg)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Pass 1: predict on the held-out split, keep predictions locally, send moments."""
    settings, site, cfg_rec, specs, split = _setup(msg, context)
    server_round = int(cfg_rec["server-round"])
    limits = evaluation_limits(context.node_config)
    if len(split.test) < limits.min_patients:
        raise ValueError(
            f"site {site.name!r} has {len(split.test)} held-out patient(s), fewer than its "
            f"eval-min-patients={limits.min_patients}: it sends no evaluation statistics (the moments "
            "of so few scores would be the scores themselves); lower eval-min-patients in this node's "
            "config to accept that"
        )
    model = _model(specs, settings, msg.content["arrays"])
    tensors = _tensors(site, specs, split, context, settings)
    risk, prob = predict_rows(model, tensors, split.test)
    time_, event = site.time[split.test], site.event[split.test]
    status = site.status[split.test]
    labelled = status >= 0
    if labelled.sum() < limits.min_patients:
        # the status moments (and the AUC) of 1 or 2 labelled patients would be their scores: this site
        # sends no status statistics; its survival statistics (all held-out patients) are unaffected
        labelled = np.zeros_like(labelled)
    status_score = _logit(prob[labelled]) if prob is not None and labelled.any() else np.zeros(0)

    # Predictions stay on this node (context.state is held by the node's runtime).
    context.state[_CACHE_KEY] = ArrayRecord(
        {"risk": torch.as_tensor(risk), "status-score": torch.as_tensor(status_score)}
    )
    context.state[_CACHE_KEY + "-meta"] = ConfigRecord({"round": server_round, "split": split.name})

    metrics: dict[str, float | int | list[float]] = {
        "num-examples": int(len(split.test)),
        "n-events": int(event.sum()),
        "n-status": int(labelled.sum()),  # 0 below eval-min-patients status-labelled patients
        "moments-risk": [float(x) for x in pooled_eval.site_moments(risk)],
        "moments-status": [float(x) for x in pooled_eval.site_moments(status_score)],
    }
    # This site's own discrimination (aggregate numbers; undefined ones are left out, never NaN).
    horizons = settings.eval_horizons_days
    for key, fn in (("cindex", lambda: harrell_cindex(time_, event, risk)),
                    ("cindex-uno", lambda: uno_cindex(time_, event, risk, tau=max(horizons) if horizons else None))):
        try:
            metrics[key] = float(fn())
        except MetricUndefinedError:
            pass
    for h in horizons:
        try:
            metrics[f"td-auc-{round(h)}d"] = float(time_dependent_auc(time_, event, risk, [h])[0])
        except MetricUndefinedError:
            pass
    if labelled.any() and prob is not None:
        try:
            metrics["auc"] = float(binary_auc(status[labelled], prob[labelled]))
        except MetricUndefinedError:
            pass
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site": site.name})})
    return Message(content, reply_to=msg)


@app.evaluate("counts")
def evaluate_counts(msg: Message, context: Context) -> Message:
    """Pass 2: counts of the cached predictions on the server's grid (additive statistics)."""
    settings, site, cfg_rec, specs, split = _setup(msg, context)
    server_round = int(cfg_rec["server-round"])
    meta = context.state.get(_CACHE_KEY + "-meta")
    if meta is None or int(meta["round"]) != server_round or str(meta["split"]) != split.name:
        raise RuntimeError(
            f"site {site.name!r}: no predictions cached for round {server_round}; "
            "the counts pass must follow the evaluate pass on the same node"
        )
    cache = context.state[_CACHE_KEY]
    risk = cache["risk"].numpy().astype(np.float64)
    status_score = cache["status-score"].numpy().astype(np.float64)
    grid = pooled_eval.EvalGrid.from_record(dict(msg.content["grid"]))
    limits = evaluation_limits(context.node_config)
    problem = pooled_eval.grid_problem(grid, min_time_bin_days=limits.min_time_bin_days,
                                       max_time_bins=limits.max_time_bins, max_score_bins=limits.max_score_bins)
    if problem:
        raise ValueError(f"site {site.name!r} does not count its patients on this round's grid: {problem} "
                         "(node config eval-min-time-bin-days / eval-max-time-bins / eval-max-score-bins)")
    status = site.status[split.test]
    labelled = status >= 0
    # no status scores: the model has no status head, or pass 1 withheld them (eval-min-patients)
    scored = labelled.any() and status_score.size > 0
    stats = pooled_eval.site_statistics(
        grid,
        site.time[split.test],
        site.event[split.test],
        risk,
        status_label=status[labelled] if scored else None,
        status_score=status_score if scored else None,
    )
    arrays = stats.to_arrays()
    metrics = MetricRecord({k: [int(x) for x in np.asarray(v).ravel()] for k, v in arrays.items()})
    metrics["num-examples"] = int(len(split.test))
    content = RecordDict({"metrics": metrics, "site": ConfigRecord({"site": site.name})})
    return Message(content, reply_to=msg)
