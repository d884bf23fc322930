"""``oncofed cv``: K-fold cross-validation of the fused model and its baselines.

Methods (all on identical folds, same training patients, same test patients):

* ``fused``              — the PARACHUTE+HAF network, every modality
* ``single:<m>``         — the same network given modality m alone
* ``mlp``                — concatenation MLP (pooled modality tokens concatenated)
* ``-dce`` ``-gcs`` ``-alignment`` — ablations of the fused model
* ``ensemble:<N>``       — N fused models trained with seeds s, s+1, ..., s+N-1 (each
  selecting its own epoch on its own validation carve-out), predictions averaged
  (log-risk and status probability); only on request (N times the cost)
* ``coxph``              — lifelines penalised CoxPH on concatenated features
* ``rf``                 — scikit-learn random forest on the status label

Neural methods train with ``shared_model.train.train_local`` — the function the
federated clients call — selecting the epoch on a validation split carved from the
training folds (never the test fold); with ``train.refit`` the model is then retrained
on all the training patients for the chosen number of epochs, and with
``train.linear_warm_start`` each model starts from its linear terms fitted alone
(``shared_model.train.train_selected``). Pooled data (several ``--sites``): each
site keeps its own fold column; fold k is the union of the sites' fold-k test
sets; batches and CoxPH baselines are stratified by site.

Metrics per fold on the test patients: Harrell's C-index (pooled over the fold's
test patients and the mean over sites), status AUC (label ``status`` or, with
``--label event``, the all-deaths label), and for simulated sites the generator's
oracle C-index on the same patients, and the *observable*-oracle C-index (the oracle
risk's expected value given what the patients' observed modalities reveal, unrevealed
parts at their site means: the ceiling of any model given what they have). The table reports mean ± std over folds, followed by the
paired differences fused − method on the same test patients with bootstrap intervals
(:mod:`simulations.cv_paired`, ``--bootstrap``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import yaml

from shared_model.atomic import atomic_write_bytes
from shared_model.baselines import ConcatFeatures, fit_coxph, fit_random_forest
from shared_model.batch import SiteTensors
from shared_model.config import Config, load_config
from shared_model.metrics import MetricUndefinedError, binary_auc, site_cindices
from shared_model.runconfig import oncofed_home, parse_overrides
from shared_model.train import TrainPart, carve_validation, model_builder, predict_rows, train_selected
from simulations.cv_paired import fold_comparisons, summarise_paired
from sites import load_site, union_specs
from sites.loader import require_distinct_names
from sites.types import ModalitySpec, SiteData, simulated_data_note

REFERENCES = Path(__file__).with_name("references.yaml")
ABLATIONS = {
    "-dce": {"model.use_dce": False},
    "-gcs": {"model.use_gcs": False},
    "-alignment": {"model.use_alignment": False},
    "mlp": {"model.fusion_mode": "concat"},
}


@dataclasses.dataclass
class FoldSpec:
    index: int
    train: dict[str, np.ndarray]  # site -> rows
    test: dict[str, np.ndarray]


def make_folds(sites: Sequence[SiteData], column: str) -> list[FoldSpec]:
    require_distinct_names(sites)  # sites are keyed by their site.yaml name below
    per_site = {s.name: s.splits(column) for s in sites}
    k = max(len(v) for v in per_site.values())
    folds = []
    for i in range(k):
        train, test = {}, {}
        for s in sites:
            splits = per_site[s.name]
            if i < len(splits):
                train[s.name], test[s.name] = splits[i].train, splits[i].test
            else:  # a site with fewer folds: all its patients train, none test in this fold
                train[s.name], test[s.name] = np.arange(len(s)), np.zeros(0, dtype=np.int64)
        folds.append(FoldSpec(i, train, test))
        for name in train:  # every method must be able to score every test patient (same patients)
            if len(test[name]) and len(train[name]) < 2:
                raise ValueError(
                    f"{column}, fold {i}: site {name!r} has {len(test[name])} test patients but "
                    f"{len(train[name])} training patients; the fused model standardises a site's inputs "
                    "with its own training patients, so it could not score them and the methods would be "
                    "compared on different patients. Give the site training patients in this fold or "
                    "leave it out of --sites")
    return folds


def first_folds(n_folds: int, max_folds: int | None) -> int:
    """How many of ``n_folds`` folds ``--max-folds`` keeps (all with None); below 1 is an error
    (0 would run every fold and -1 drop the last one, in a table that looks complete)."""
    if max_folds is None:
        return n_folds
    if max_folds < 1:
        raise ValueError(f"--max-folds must be >= 1, got {max_folds}")
    return min(n_folds, max_folds)


def select_folds(folds: Sequence[FoldSpec], fold_ids: Sequence[int], column: str) -> list[FoldSpec]:
    """The folds with index in ``fold_ids`` (in fold order); an unknown id is an error."""
    wanted = set(fold_ids)
    unknown = sorted(wanted - {f.index for f in folds})
    if unknown:
        raise ValueError(f"fold ids {unknown} not in {column} (has {[f.index for f in folds]})")
    return [f for f in folds if f.index in wanted]


def relabel(site: SiteData, label: str) -> SiteData:
    """``label='event'``: the status label becomes the all-deaths label (HAF's protocol)."""
    if label == "status":
        return site
    if label == "event":
        return dataclasses.replace(site, status=site.event.astype(np.int8).copy())
    raise ValueError(f"--label must be status or event, not {label!r}")


def restrict(site: SiteData, modality: str) -> SiteData | None:
    """The site with only ``modality`` (None when the site does not have it)."""
    if modality not in site.modalities:
        return None
    spec = dataclasses.replace(site.spec, modalities=(site.spec.modality(modality),))
    keep = np.flatnonzero(has_modality(site, modality, np.arange(len(site))))
    sub = dataclasses.replace(site, spec=spec, modalities={modality: site.modalities[modality]})
    return sub.subset(keep) if len(keep) < len(site) else sub


def has_modality(site: SiteData, modality: str, rows: np.ndarray) -> np.ndarray | None:
    """bool [len(rows)]: which of ``rows`` have ``modality`` — the patients :func:`restrict`
    keeps, so the ones a ``single:<modality>`` model scores; None when the site lacks it."""
    md = site.modalities.get(modality)
    return None if md is None else md.present[rows]


def fold_metrics(sites: dict[str, SiteData], test: dict[str, np.ndarray], risk: dict[str, np.ndarray],
                 prob: dict[str, np.ndarray | None]) -> dict[str, float | None]:
    """Test metrics of one fold (``risk`` / ``prob``: site -> predictions over ``test[site]``).

    ``cindex``: Harrell's C with pairs compared within a site (stratified; equals
    Harrell's C for one site) — training uses within-site risk sets, so a model is
    not asked to rank patients of different hospitals; ``cindex_pooled``: Harrell's
    C over all test patients (cross-site pairs too); ``cindex_sites``: mean of the
    sites' C-indices; ``auc``: status AUC on the labelled test patients.
    """
    names = [s for s in risk if len(test[s])]
    c = site_cindices({s: (sites[s].time[test[s]], sites[s].event[test[s]], risk[s]) for s in names})
    per = [v for v in c["per_site"].values() if v is not None]
    out: dict[str, float | None] = {"n_test": float(sum(len(test[s]) for s in names)),
                                    "cindex": c["cindex"], "cindex_pooled": c["cindex_pooled"],
                                    "cindex_sites": float(np.mean(per)) if per else None}
    labels, scores = [], []
    for s in names:
        st = sites[s].status[test[s]]
        m = st >= 0
        if m.any() and prob.get(s) is not None:
            labels.append(st[m])
            scores.append(prob[s][m])
    try:
        out["auc"] = binary_auc(np.concatenate(labels), np.concatenate(scores)) if labels else None
    except MetricUndefinedError:
        out["auc"] = None
    return out


def training_parts(sites: dict[str, SiteData], fold: FoldSpec, cfg: Config, seed: int
                   ) -> tuple[tuple[ModalitySpec, ...], list[TrainPart], dict[str, SiteTensors]]:
    """(model specs, one :class:`TrainPart` per site with >= 2 training patients, site tensors):
    each site's validation rows carved from its training rows of ``fold`` (``seed``), its
    inputs standardised with its training patients' statistics."""
    names = [s for s in sites if len(fold.train.get(s, [])) >= 2]
    specs = union_specs([sites[s].spec for s in names])
    parts, tensors = [], {}
    for s in names:
        site = sites[s]
        fit_rows, val_rows = carve_validation(site.event, fold.train[s], cfg.train.val_fraction, seed,
                                              status=site.status)
        tensors[s] = SiteTensors.for_training(site, specs, fold.train[s], cfg.train.standardize_embeddings)
        parts.append(TrainPart(tensors[s], fit_rows, val_rows))
    return specs, parts, tensors


def run_neural(sites: dict[str, SiteData], fold: FoldSpec, cfg: Config, seed: int) -> tuple[dict, dict, dict]:
    specs, parts, tensors = training_parts(sites, fold, cfg, seed)
    names = list(tensors)
    model, result = train_selected(model_builder(specs, cfg, seed), parts, cfg.train, seed=seed)
    risk, prob = {}, {}
    for s in names:
        if len(fold.test.get(s, [])):
            risk[s], prob[s] = predict_rows(model, tensors[s], fold.test[s])
    info = {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "selection": result.selection_metric, "val_score": result.best_score,
            "seconds": result.seconds}
    return risk, prob, info


def ensemble_size(method: str) -> int | None:
    """N of a method ``ensemble:N`` (N >= 2); None for any other method."""
    if not method.startswith("ensemble:"):
        return None
    n_txt = method.split(":", 1)[1]
    if not n_txt.isdigit() or int(n_txt) < 2:
        raise ValueError(f"method {method!r}: expected ensemble:N with an integer N >= 2 (e.g. ensemble:3)")
    return int(n_txt)


def run_ensemble(sites: dict[str, SiteData], fold: FoldSpec, cfg: Config, seed: int, n: int
                 ) -> tuple[dict, dict, dict]:
    """The ensemble of :func:`ensemble_members`, averaged by :func:`average_members`."""
    return average_members(ensemble_members(sites, fold, cfg, seed, n), seed)


def ensemble_members(sites: dict[str, SiteData], fold: FoldSpec, cfg: Config, seed: int, n: int
                     ) -> list[tuple[dict, dict, dict]]:
    """``n`` fused models (seeds seed .. seed+n-1), each trained as :func:`run_neural`."""
    return [run_neural(sites, fold, cfg, seed + k) for k in range(n)]


def average_members(members: Sequence[tuple[dict, dict, dict]], seed: int) -> tuple[dict, dict, dict]:
    """The ensemble of ``members`` (each a :func:`run_neural` result, seeds seed, seed+1, ...).

    Per test patient: log-risk = mean of the members' log-risks (a product of their
    hazard ratios' geometric mean), status probability = mean of their probabilities.
    """
    risk = {s: np.mean([m[0][s] for m in members], axis=0) for s in members[0][0]}
    prob: dict[str, np.ndarray | None] = {}
    for s in members[0][1]:
        ps = [m[1][s] for m in members]
        prob[s] = None if any(p is None for p in ps) else np.mean(ps, axis=0)
    info = {"best_epoch": float(np.median([m[2]["best_epoch"] for m in members])),
            "member_best_epochs": [m[2]["best_epoch"] for m in members],
            "member_seeds": [seed + k for k in range(len(members))],
            "seconds": float(sum(m[2]["seconds"] for m in members))}
    return risk, prob, info


CLASSICAL_METHODS = ("coxph", "coxph-pairwise", "coxph-agreement", "rf")


def run_classical(method: str, sites: dict[str, SiteData], fold: FoldSpec, seed: int) -> tuple[dict, dict, dict]:
    names = list(sites)
    specs = union_specs([sites[s].spec for s in names])
    feats = ConcatFeatures(specs, pairwise=method == "coxph-pairwise", agreement=method == "coxph-agreement").fit(
        [(sites[s], fold.train[s]) for s in names])
    x_train = np.concatenate([feats.transform(sites[s], fold.train[s]) for s in names])
    risk, prob = {}, {}
    if method in ("coxph", "coxph-pairwise", "coxph-agreement"):
        t = np.concatenate([sites[s].time[fold.train[s]] for s in names])
        e = np.concatenate([sites[s].event[fold.train[s]] for s in names])
        strata = np.concatenate([[s] * len(fold.train[s]) for s in names])
        model = fit_coxph(x_train, t, e, strata=strata)
        for s in names:
            if len(fold.test[s]):
                r = model.risk(feats.transform(sites[s], fold.test[s]))
                risk[s], prob[s] = r, 1 / (1 + np.exp(-r))
    elif method == "rf":
        y = np.concatenate([sites[s].status[fold.train[s]] for s in names])
        m = y >= 0
        if m.sum() < 2 or len(np.unique(y[m])) < 2:
            raise ValueError("rf needs a status label with both classes in the training folds")
        model = fit_random_forest(x_train[m], y[m], seed=seed)
        for s in names:
            if len(fold.test[s]):
                p = model.score(feats.transform(sites[s], fold.test[s]))
                risk[s], prob[s] = p, p
    else:
        raise ValueError(f"unknown method {method!r}")
    return risk, prob, {}


def _task(args: tuple) -> dict[str, Any]:
    """One (method, fold, seed) job; runs in a worker process when --jobs > 1. A job that raises
    becomes an error row naming its method, fold and seed (the other jobs' results are kept and
    written; ``oncofed cv`` then exits non-zero)."""
    try:
        return _run_task(args)
    except Exception as ex:  # noqa: BLE001 - reported in the row, the table and the exit status
        method, fold, seed = args[0], args[1], args[5]
        return {"method": method, "fold": fold.index, "seed": seed,
                "error": f"fold {fold.index}, seed {seed}: {type(ex).__name__}: {ex}",
                "traceback": traceback.format_exc()}


def _run_task(args: tuple) -> dict[str, Any]:
    method, fold, site_paths, label, cfg_dict, seed, threads = args
    import torch

    torch.set_num_threads(threads)
    sites = {s.name: relabel(s, label) for s in (load_site(p) for p in site_paths)}
    t0 = time.perf_counter()
    if method.startswith("single:"):
        m = method.split(":", 1)[1]
        sub = {k: v for k, v in ((k, restrict(s, m)) for k, s in sites.items()) if v is not None}
        if not sub:
            return {"method": method, "fold": fold.index, "error": f"no site has modality {m!r}"}
        # rows change when restricting: map fold rows through patient ids
        fold = _remap_fold(fold, sites, sub)
        sites = sub
    if method in CLASSICAL_METHODS:
        risk, prob, info = run_classical(method, sites, fold, seed)
    else:
        cfg = load_config(overrides={**cfg_dict, **ABLATIONS.get(method, {})})
        n_members = ensemble_size(method)
        if n_members:
            risk, prob, info = run_ensemble(sites, fold, cfg, seed, n_members)
        else:
            risk, prob, info = run_neural(sites, fold, cfg, seed)
    out = {"method": method, "fold": fold.index, "seed": seed, **fold_metrics(sites, fold.test, risk, prob), **info,
           "wall_seconds": time.perf_counter() - t0}
    out.update(oracle_metrics(sites, fold.test, list(risk)))
    reads = part_reading(sites, fold.test, risk)
    if reads:
        out["reads"] = reads
    if not method.startswith("single:"):
        out["same_patients"] = _subset_metrics(sites, fold.test, risk, prob)
    out["_pred"] = (risk, prob)  # for the paired comparisons (simulations.cv_paired); never written
    return out


def oracle_metrics(sites: dict[str, SiteData], test: dict[str, np.ndarray], names: Sequence[str]
                   ) -> dict[str, float | None]:
    """The generator's oracle C on the test patients of ``names`` (simulated sites only).

    ``oracle_cindex``: C of eta; ``observable_oracle_cindex``: C of E[eta | what each
    patient's observed modalities reveal, its site] (:meth:`SiteData.observable_oracle_risk`) —
    the ceiling of any model given what the patients have (for a ``single:m`` run, what
    m alone reveals). Both within sites, like ``cindex``; empty without oracle data.
    """
    out: dict[str, float | None] = {}
    for key, risk_of in (("oracle_cindex", lambda site: site.oracle_risk),
                         ("observable_oracle_cindex", lambda site: site.observable_oracle_risk())):
        risk = {s: risk_of(sites[s]) for s in names}
        if names and all(v is not None for v in risk.values()):
            o = {s: v[test[s]] for s, v in risk.items()}
            out[key] = fold_metrics(sites, test, o, {s: None for s in o})["cindex"]
    return out


def part_reading(sites: dict[str, SiteData], test: dict[str, np.ndarray], risk: dict[str, np.ndarray]
                 ) -> dict[str, float]:
    """How strongly a model's risk follows each part of the generator's eta (simulated sites).

    For every oracle part (``SiteData.oracle_parts``, keyed by the modalities that reveal
    it, e.g. ``radiology``, ``pathology``, ``pathology+radiology``): the test patients of
    each site that have all of the part's modalities are ranked within their site by the
    predicted risk and by the part (average ranks, scaled to (-1/2, 1/2)); the value is
    the Pearson correlation of the pooled within-site ranks — a Spearman correlation that
    never compares patients of different sites. 1 = the risk orders those patients
    exactly as the part does; about 0 = the model ignores it. Sites without parts, and
    sites with fewer than 3 such test patients, are left out; empty for real sites.
    """
    from scipy.stats import rankdata

    pooled: dict[tuple[str, ...], tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for s, r in risk.items():
        site = sites[s]
        if site.oracle_parts is None:
            continue
        rows = test[s]
        for mods, part in site.oracle_parts.items():
            has = site.presence_matrix(mods)[rows].all(axis=1)
            n = int(has.sum())
            if n < 3:
                continue
            a, b = pooled.setdefault(mods, ([], []))
            a.append((rankdata(r[has]) - (n + 1) / 2) / n)
            b.append((rankdata(part[rows][has]) - (n + 1) / 2) / n)
    out: dict[str, float] = {}
    for mods, (a, b) in sorted(pooled.items()):
        x, y = np.concatenate(a), np.concatenate(b)
        if x.std() > 0 and y.std() > 0:
            out["+".join(mods)] = float(np.corrcoef(x, y)[0, 1])
    return out


def _subset_metrics(sites: dict[str, SiteData], test: dict[str, np.ndarray], risk: dict[str, np.ndarray],
                    prob: dict[str, np.ndarray | None]) -> dict[str, dict[str, float | None]]:
    """Metrics on the test patients that have modality m, for each m.

    A ``single:m`` model is tested only on the patients that have m (it cannot score
    the others); these numbers put a multimodal model on exactly those patients.
    """
    out: dict[str, dict[str, float | None]] = {}
    mods = {m for s in risk for m in sites[s].modalities}
    for m in sorted(mods):
        sub_test, sub_risk, sub_prob = {}, {}, {}
        for s in risk:
            keep = has_modality(sites[s], m, test[s])
            if keep is not None and keep.any():
                sub_test[s], sub_risk[s] = test[s][keep], risk[s][keep]
                sub_prob[s] = None if prob.get(s) is None else prob[s][keep]
        if sub_test:
            met = fold_metrics(sites, sub_test, sub_risk, sub_prob)
            out[m] = {k: met[k] for k in ("cindex", "auc")}
    return out


def _flat(cfg: Config) -> dict[str, Any]:
    d = cfg.to_dict()
    return {f"{sec}.{k}": (list(v) if isinstance(v, tuple) else v) for sec in ("model", "train")
            for k, v in d[sec].items()}


def _remap_fold(fold: FoldSpec, full: dict[str, SiteData], sub: dict[str, SiteData]) -> FoldSpec:
    train, test = {}, {}
    for s, site in sub.items():
        pos = {pid: i for i, pid in enumerate(site.patient_ids)}
        ids_tr = full[s].patient_ids[fold.train[s]]
        ids_te = full[s].patient_ids[fold.test[s]]
        train[s] = np.array([pos[p] for p in ids_tr if p in pos], dtype=np.int64)
        test[s] = np.array([pos[p] for p in ids_te if p in pos], dtype=np.int64)
    return FoldSpec(fold.index, train, test)


def _single_scored(sites: dict[str, SiteData], fold: FoldSpec, methods: Sequence[str]
                   ) -> dict[str, dict[str, np.ndarray]]:
    """For each ``single:<m>`` method: site -> bool [len(fold.test[s])], the test patients
    that have m (the ones :func:`restrict` keeps, in fold order); sites without m are absent."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for method in methods:
        if method.startswith("single:"):
            m = method.split(":", 1)[1]
            out[method] = {s: keep for s, site in sites.items()
                           if (keep := has_modality(site, m, fold.test[s])) is not None}
    return out


def check_methods(methods: Sequence[str], sites: Sequence[SiteData]) -> None:
    """Refuse an unknown method name before any training starts."""
    mods = {m.name for m in union_specs([s.spec for s in sites])}
    for m in methods:
        if m.startswith("single:"):
            modality = m.split(":", 1)[1]
            if modality not in mods:
                raise ValueError(f"method {m!r}: no site has modality {modality!r} (modalities: {sorted(mods)})")
        elif m.startswith("ensemble:"):
            ensemble_size(m)
        elif m not in ("fused", *CLASSICAL_METHODS, *ABLATIONS):
            raise ValueError(f"unknown method {m!r}; expected fused, single:<modality>, ensemble:<N>, "
                             f"{', '.join(CLASSICAL_METHODS)} or one of {sorted(ABLATIONS)}")
        elif m == "rf" and len(np.unique(np.concatenate([s.status[s.status >= 0] for s in sites]))) < 2:
            raise ValueError(f"method 'rf' classifies the status label, and the patients of "
                             f"{', '.join(s.name for s in sites)} do not have both classes; use --label event "
                             f"(all deaths) or leave rf out")


def training_seed_problem(config_path: str | None, overrides: Mapping[str, Any]) -> str | None:
    """Why ``train.seed`` would be silently ignored here (None: it is not set): centralised runs take
    their training seeds from ``--seed`` / ``--seeds`` (each result row records its ``seed``)."""
    if "train.seed" in overrides or (config_path and load_config(config_path).train.seed != load_config().train.seed):
        return "train.seed is not read by oncofed cv or model_choice: give the training seeds with --seed / --seeds"
    return None


def default_methods(sites: Sequence[SiteData]) -> list[str]:
    mods = list(union_specs([s.spec for s in sites]))
    methods = ["fused"] + [f"single:{m.name}" for m in mods] + ["mlp", "-dce", "-gcs", "-alignment", "coxph"]
    if any((s.status >= 0).any() for s in sites):
        methods.append("rf")
    return methods


METRIC_KEYS = ("cindex", "cindex_pooled", "cindex_sites", "auc", "oracle_cindex", "observable_oracle_cindex")


def mean_std(values: list[float | None]) -> tuple[float, float, int] | None:
    """(mean, std, n) of the values that are not None; None when there are none."""
    vals = [v for v in values if v is not None]
    return (float(np.mean(vals)), float(np.std(vals)), len(vals)) if vals else None


def _mean_or_none(values: list[float | None]) -> float | None:
    stats = mean_std(values)
    return None if stats is None else stats[0]


def mean_over_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, fold): each metric averaged over the fold's training seeds.

    Rows of one (method, fold) differ only in the training seed (initialisation,
    validation carve-out, batch order); averaging them first makes the fold the unit
    of the mean ± std. Adds ``seeds`` (the seeds averaged) and ``seed_std_cindex``
    (std of the C-index over seeds). A row with an ``error`` makes the group an error.
    """
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], int(r["fold"])), []).append(r)
    out = []
    for (method, fold), rs in groups.items():
        if len(rs) == 1:
            out.append({**rs[0], "seeds": [rs[0].get("seed", 0)]})
            continue
        errors = [r for r in rs if "error" in r]
        if errors:
            out.append({**errors[0], "seeds": [r.get("seed", 0) for r in rs]})
            continue
        merged: dict[str, Any] = {"method": method, "fold": fold, "seeds": [r.get("seed", 0) for r in rs]}
        for key in METRIC_KEYS:
            merged[key] = _mean_or_none([r.get(key) for r in rs])
        c = [r["cindex"] for r in rs if r.get("cindex") is not None]
        merged["seed_std_cindex"] = float(np.std(c)) if len(c) > 1 else None
        reads = [r["reads"] for r in rs if r.get("reads")]
        if reads:
            merged["reads"] = {k: _mean_or_none([rd.get(k) for rd in reads]) for k in sorted({k for rd in reads for k in rd})}
        same = [r["same_patients"] for r in rs if "same_patients" in r]
        if same:
            merged["same_patients"] = {
                m: {k: _mean_or_none([sp.get(m, {}).get(k) for sp in same]) for k in ("cindex", "auc")}
                for m in sorted({m for sp in same for m in sp})}
        out.append(merged)
    return sorted(out, key=lambda r: (r["method"], r["fold"]))


def summarise(rows: list[dict[str, Any]], methods: list[str], refs: dict[str, Any]) -> tuple[str, list[dict]]:
    rows = mean_over_seeds(rows)
    table = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m and "error" not in r]
        entry: dict[str, Any] = {"method": m, "folds": len(rs)}
        for key in METRIC_KEYS:
            entry[key] = mean_std([r.get(key) for r in rs])
        seed_std = [r["seed_std_cindex"] for r in rs if r.get("seed_std_cindex") is not None]
        entry["seed_std_cindex"] = float(np.mean(seed_std)) if seed_std else None
        entry["reference"] = refs.get(m)
        parts = sorted({k for r in rs for k in r.get("reads", {})})
        if parts:
            entry["reads"] = {k: mean_std([r["reads"].get(k) for r in rs if r.get("reads")]) for k in parts}
        errs = [r["error"] for r in rows if r["method"] == m and "error" in r]
        entry["error"] = errs[0] if errs else None
        table.append(entry)

    def fmt(v):
        if v is None:
            return "—"
        mean, std, n = v
        return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"

    lines = ["| method | C-index (within sites) | C-index (pooled) | C-index (mean of sites) | status AUC | "
             "oracle C (within sites) | observable-oracle C | reference |",
             "|---|---|---|---|---|---|---|---|"]
    for e in table:
        ref = e["reference"]
        ref_txt = "—" if not ref else ", ".join(f"{k} {v}" for k, v in ref.items() if k != "source")
        if e["error"]:
            lines.append(f"| {e['method']} | error: {e['error']} | | | | | | |")
            continue
        lines.append(f"| {e['method']} | {fmt(e['cindex'])} | {fmt(e['cindex_pooled'])} | {fmt(e['cindex_sites'])} | "
                     f"{fmt(e['auc'])} | {fmt(e['oracle_cindex'])} | {fmt(e['observable_oracle_cindex'])} | "
                     f"{ref_txt} |")
    read_parts = sorted({k for e in table for k in (e.get("reads") or {})})
    if read_parts:
        lines += ["", "What each model reads of the generator's latent risk eta = sum of parts: rank correlation "
                  "(within sites) of the predicted risk with each part, on the test patients that have the "
                  "part's modalities (`part_reading`; 1 = ordered exactly like the part, 0 = ignores it):", "",
                  "| method | " + " | ".join(f"part `{k}`" for k in read_parts) + " |",
                  "|---|" + "---|" * len(read_parts)]
        for e in table:
            if e.get("reads"):
                lines.append(f"| {e['method']} | " + " | ".join(fmt(e["reads"].get(k)) for k in read_parts) + " |")
    fused = [r for r in rows if r["method"] == "fused" and "error" not in r]
    singles = [e for e in table if e["method"].startswith("single:") and not e["error"]]
    if fused and singles:
        lines += ["", "Each modality alone vs the fused model **on the same test patients** (a single-modality "
                  "model can only score the patients that have its modality):", "",
                  "| modality | alone: C-index | fused: C-index | alone: AUC | fused: AUC |", "|---|---|---|---|---|"]
        for e in singles:
            m = e["method"].split(":", 1)[1]
            same = {}
            for key in ("cindex", "auc"):
                same[key] = mean_std([r["same_patients"][m].get(key) for r in fused
                                       if m in r.get("same_patients", {})])
            e["fused_same_patients"] = same
            lines.append(f"| {m} | {fmt(e['cindex'])} | {fmt(same['cindex'])} | {fmt(e['auc'])} | {fmt(same['auc'])} |")
    return "\n".join(lines), table


def run_cv(
    site_paths: Sequence[Path], folds_column: str, *, methods: Sequence[str] | None = None,
    label: str = "status", overrides: dict[str, Any] | None = None, config_path: str | None = None,
    seed: int = 0, seeds: Sequence[int] | None = None, jobs: int = 1, out_dir: Path | None = None,
    protocol: str | None = None,
    max_folds: int | None = None, fold_ids: Sequence[int] | None = None, bootstrap: int = 1000, log=None,
) -> dict[str, Any]:
    """Run the CV and write ``results.md`` and ``results.json`` to ``out_dir``.

    ``seeds``: training seeds (default ``[seed]``); every (method, fold) runs once per
    seed and the table averages each fold over its seeds before the mean ± std over folds.
    ``bootstrap``: replicates of the paired comparison of ``fused`` with every other
    method on the same test patients (:mod:`simulations.cv_paired`); 0 = none.
    """
    log = log or (lambda msg: print(msg, flush=True))
    sites = [relabel(load_site(p), label) for p in site_paths]
    folds = make_folds(sites, folds_column)
    folds = folds[:first_folds(len(folds), max_folds)]
    if fold_ids is not None:
        folds = select_folds(folds, fold_ids, folds_column)
    methods = list(methods or default_methods(sites))
    check_methods(methods, sites)
    problem = training_seed_problem(config_path, overrides or {})
    if problem:
        raise ValueError(problem)
    cfg = load_config(config_path, overrides or {})
    cfg_dict = _flat(cfg)
    threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))
    seeds = list(seeds) if seeds else [seed]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {seeds} repeats a seed")
    if bootstrap != 0 and bootstrap < 2:
        raise ValueError(f"--bootstrap must be 0 (no paired comparisons) or >= 2 replicates, not {bootstrap}")
    tasks = [(m, f, [str(p) for p in site_paths], label, cfg_dict, sd, threads)
             for sd in seeds for f in folds for m in methods]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def done(r):
        if "traceback" in r:
            log(r.pop("traceback"))
        rows.append(r)
        msg = r.get("error") or " ".join(
            f"{k}={r[k]:.3f}" for k in ("cindex", "auc", "oracle_cindex", "observable_oracle_cindex")
            if r.get(k) is not None)
        log(f"[cv] fold {r['fold']} seed {r['seed']} {r['method']:<24} {msg}  ({r.get('wall_seconds', 0):.0f} s)")

    if jobs > 1:
        with cf.ProcessPoolExecutor(max_workers=jobs) as ex:
            for fut in cf.as_completed([ex.submit(_task, t) for t in tasks]):
                done(fut.result())
    else:
        for t in tasks:
            done(_task(t))
    paired = []
    preds: dict[int, dict[str, dict[int, Any]]] = {}
    # a (method, fold) with a failed seed is an error in the table (mean_over_seeds), so it is
    # left out of the paired comparisons too: both then average the same folds and seeds
    failed = {(r["method"], int(r["fold"])) for r in rows if "error" in r}
    for r in rows:
        pred = r.pop("_pred", None)
        if pred is not None and (r["method"], int(r["fold"])) not in failed:
            preds.setdefault(int(r["fold"]), {}).setdefault(r["method"], {})[int(r["seed"])] = pred
    if bootstrap:
        by_name = {s.name: s for s in sites}
        for f in folds:
            paired += fold_comparisons(by_name, f.test, f.index, preds.get(f.index, {}), bootstrap,
                                       _single_scored(by_name, f, methods))
    result = {"sites": [s.name for s in sites], "simulated": [s.name for s in sites if s.spec.simulated],
              "cohorts": {s.name: s.spec.cohort for s in sites},
              "folds_column": folds_column, "folds": [f.index for f in folds], "label": label, "seed": seeds[0],
              "seeds": seeds, "methods": methods,
              "rows": sorted(rows, key=lambda r: (r["method"], r["fold"], r["seed"])),
              "config": cfg.to_dict(), "seconds": time.perf_counter() - t0, "protocol": protocol,
              "paired": paired}
    text = write_results(result, out_dir)
    log(text)
    return result


def write_results(result: dict[str, Any], out_dir: Path | None, notes: Sequence[str] = ()) -> str:
    """Add the mean ± std table to ``result`` and write ``results.md`` / ``results.json``.

    ``result`` holds ``sites``, ``simulated``, ``cohorts`` (optional), ``folds_column``, ``folds``, ``label``,
    ``seed`` / ``seeds``, ``methods``, ``rows`` (one per method, fold and seed) and ``protocol``.
    Returns the Markdown text.
    """
    refs_all = yaml.safe_load(REFERENCES.read_text()) or {}
    refs = refs_all.get(result.get("protocol"), {}) if result.get("protocol") else {}
    table_md, table = summarise(result["rows"], result["methods"], refs)
    result["table"] = table
    seeds = result.get("seeds") or [result.get("seed", 0)]
    header = [
        f"# oncofed cv — sites {', '.join(result['sites'])}; folds `{result['folds_column']}` "
        f"({len(result['folds'])}: {', '.join(map(str, result['folds']))}); label `{result['label']}`; "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}",
        "",
    ]
    cohorts = result.get("cohorts") or {}  # runs written before cohorts were recorded: real labels
    note = simulated_data_note({n: cohorts.get(n, "") for n in result.get("simulated", [])})
    if note:
        header += [note, ""]
    header += list(notes)
    header += ["Mean ± std over folds (population std, ddof = 0); epoch chosen on a validation split carved "
               "from the training folds.", ""]
    if len(seeds) > 1:
        spread = "; ".join(f"{e['method']} {e['seed_std_cindex']:.3f}" for e in table
                           if e.get("seed_std_cindex") is not None)
        header += [f"Each fold's value is the mean over the {len(seeds)} training seeds (initialisation, "
                   f"validation carve-out, batch order); C-index std over seeds within a fold, mean over "
                   f"folds: {spread}.", ""]
    paired_md, result["paired_table"] = summarise_paired(result.get("paired") or [], result["methods"])
    text = "\n".join(header) + table_md + "\n" + "".join(line + "\n" for line in paired_md)
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write_bytes(out_dir / "results.md", text.encode())
        atomic_write_bytes(out_dir / "results.json", json.dumps(result, indent=2, default=float).encode())
    return text


def cli_overrides(items: Sequence[str]) -> dict[str, str]:
    """The ``--set KEY=VALUE`` items of a command line as one override dict (a later item wins)."""
    overrides: dict[str, str] = {}
    for item in items:
        overrides.update(parse_overrides(item))
    return overrides


def cli_sites_and_folds(sites_dir: str | Path, sites: str, column: str, label: str, fold_ids: str | None
                        ) -> tuple[dict[str, SiteData], list[FoldSpec]]:
    """The comma-separated site folders ``sites`` under ``sites_dir``, relabelled for ``label``
    (:func:`relabel`) and keyed by site name, and their folds of ``column`` — only the
    comma-separated ``fold_ids`` when given (:func:`select_folds`)."""
    paths = [Path(sites_dir) / s.strip() for s in sites.split(",") if s.strip()]
    listed = [relabel(load_site(q), label) for q in paths]
    folds = make_folds(listed, column)  # refuses two folders with one site name
    loaded = {s.name: s for s in listed}
    if fold_ids:
        folds = select_folds(folds, [int(x) for x in fold_ids.split(",")], column)
    return loaded, folds


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cv", help="K-fold CV of the fused model, single modalities, ablations and baselines")
    p.add_argument("--sites-dir", default=str(oncofed_home() / "sites"))
    p.add_argument("--sites", required=True, help="comma-separated site folder names (several = pooled)")
    p.add_argument("--folds", required=True, help="fold column, e.g. fold_cv10, split_official, fold_parachute")
    p.add_argument("--label", default="status", choices=("status", "event"),
                   help="status label for AUC: the site's status, or event (all deaths)")
    p.add_argument("--methods", default="", help="comma-separated; default: all applicable")
    p.add_argument("--config", default=None, help="YAML with model./train. overrides")
    p.add_argument("--set", action="append", default=[], help="override, e.g. --set train.epochs=30")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default=None,
                   help="comma-separated training seeds (e.g. 0,1,2): every fold runs once per seed "
                        "and is averaged over them before the mean ± std over folds (default: --seed)")
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes")
    p.add_argument("--max-folds", type=int, default=None)
    p.add_argument("--fold-ids", default=None,
                   help="comma-separated fold indices to run (e.g. split one CV over machines)")
    p.add_argument("--protocol", default=None, help="key in simulations/references.yaml to show beside")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap replicates of the paired comparison fused − method on the same test "
                        "patients (0 = none)")
    p.add_argument("--out", default=None, help="output folder (default results/cv-<sites>-<folds>-<label>)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    paths = [Path(args.sites_dir) / s.strip() for s in args.sites.split(",") if s.strip()]
    overrides = cli_overrides(args.set)
    out = Path(args.out) if args.out else Path("results") / (
        f"cv-{'+'.join(p.name for p in paths)}-{args.folds}-{args.label}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or None
    result = run_cv(paths, args.folds, methods=methods, label=args.label, overrides=overrides,
                    config_path=args.config, seed=args.seed, jobs=args.jobs, out_dir=out,
                    seeds=[int(x) for x in args.seeds.split(",")] if args.seeds else None,
                    protocol=args.protocol, max_folds=args.max_folds, bootstrap=args.bootstrap,
                    fold_ids=[int(x) for x in args.fold_ids.split(",")] if args.fold_ids else None)
    print(f"\n[cv] results written to {out}")
    failed = [r for r in result["rows"] if "error" in r]
    if failed:
        print(f"[cv] {len(failed)} job(s) failed: " + "; ".join(f"{r['method']} {r['error']}" for r in failed),
              file=sys.stderr)
        return 1
    return 0
