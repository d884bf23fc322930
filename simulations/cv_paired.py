"""Paired comparisons in ``oncofed cv``: the reference method (``fused``) against each other method.

For every fold, the test patients are resampled with replacement within each site
(``--bootstrap`` replicates, the resamples drawn with the fold index as seed, so every
method of the fold is scored on the same resamples), and each method's metric —
Harrell's C with pairs within sites, and the status AUC — is computed on every
replicate exactly (:mod:`shared_model.paired_bootstrap`) and averaged over the method's
training seeds, as the table averages them. The per-fold result is the difference
reference − method and its bootstrap standard error; over K folds the mean difference
has SE sqrt(sum se_k^2) / K (disjoint test sets). 95 % intervals and two-sided p use
the normal approximation.

What the interval covers: the sampling of the test patients, with the trained models
fixed. It does not cover retraining on other patients (the ± over folds, the seeds).
Only aggregate numbers are kept (difference, SE, counts of replicates); the
predictions themselves are never written.

A ``single:<m>`` method scores only the patients that have m: it is compared with the
reference on exactly those patients (as in the "same test patients" table).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from shared_model.paired_bootstrap import (PairedDifference, auc_replicates, bootstrap_counts,
                                           cindex_replicates, combine_folds, paired_difference)
from sites.types import SiteData

REFERENCE = "fused"
METRICS = ("cindex", "auc")

Prediction = tuple[dict[str, np.ndarray], dict[str, "np.ndarray | None"]]  # (risk, prob) per site


def _fold_arrays(sites: dict[str, SiteData], test: dict[str, np.ndarray], names: Sequence[str]):
    time = np.concatenate([sites[s].time[test[s]] for s in names])
    event = np.concatenate([sites[s].event[test[s]] for s in names])
    status = np.concatenate([sites[s].status[test[s]] for s in names])
    strata = np.concatenate([np.full(len(test[s]), i) for i, s in enumerate(names)])
    return time, event, status, strata


def _expand(pred: Prediction, which: int, names: Sequence[str], mask: dict[str, np.ndarray],
            sizes: dict[str, int]) -> np.ndarray | None:
    """One seed's predictions over all the fold's test patients (NaN where not scored);
    None when the method gives no status probability at a site it scores."""
    parts = []
    for s in names:
        full = np.full(sizes[s], np.nan)
        values = pred[which].get(s)
        if values is not None:
            full[mask[s]] = values
        elif s in pred[0]:
            return None
        parts.append(full)
    return np.concatenate(parts)


def fold_comparisons(sites: dict[str, SiteData], test: dict[str, np.ndarray], fold: int,
                     preds: dict[str, dict[int, Prediction]], n_boot: int,
                     scored: dict[str, dict[str, np.ndarray]] | None = None,
                     reference: str = REFERENCE) -> list[dict[str, Any]]:
    """Paired differences ``reference`` − m on one fold, for every other method m.

    ``preds``: method -> seed -> (risk, prob), each a dict site -> array over the test
    patients the method scores: all of ``test[s]``, or for a method in ``scored`` the
    rows where ``scored[method][s]`` (bool [len(test[s])]) is True (a ``single:<m>``
    model scores only the patients with m; a site missing from its predictions has none).
    Each pair is compared on the patients both methods score. Returns one entry per
    (method, metric) with ``diff``, ``se``, ``n_valid``, ``n_boot``, ``n_patients`` and
    the seeds of both methods, or ``undefined`` when the metric cannot be compared.
    """
    if reference not in preds:
        return []
    scored = scored or {}
    names = [s for s in sites if len(test.get(s, []))]
    if not names:
        return []
    sizes = {s: len(test[s]) for s in names}
    time, event, status, strata = _fold_arrays(sites, test, names)
    counts = bootstrap_counts(strata, n_boot, seed=fold)  # shared by every method of the fold

    def mask_of(method: str) -> dict[str, np.ndarray]:
        if method in scored:
            return {s: np.asarray(scored[method].get(s, np.zeros(sizes[s], bool)), dtype=bool) for s in names}
        return {s: np.ones(sizes[s], dtype=bool) for s in names}

    def stacked(method: str, which: int) -> np.ndarray | None:
        mask = mask_of(method)
        rows = [_expand(preds[method][sd], which, names, mask, sizes) for sd in sorted(preds[method])]
        return None if any(r is None for r in rows) else np.stack(rows)

    out = []
    for method in preds:
        if method == reference:
            continue
        for metric in METRICS:
            entry: dict[str, Any] = {"a": reference, "b": method, "fold": fold, "metric": metric,
                                     "seeds_a": sorted(preds[reference]), "seeds_b": sorted(preds[method])}
            which = 0 if metric == "cindex" else 1
            pa, pb = stacked(reference, which), stacked(method, which)
            res = None
            if pa is not None and pb is not None:
                keep = np.isfinite(pa).all(axis=0) & np.isfinite(pb).all(axis=0)
                if metric == "auc":
                    keep &= status >= 0
                entry["n_patients"] = int(keep.sum())
                if keep.sum() >= 2:
                    res = _difference(metric, time[keep], event[keep], status[keep], strata[keep],
                                      pa[:, keep], pb[:, keep], counts[:, keep])
            if res is None:
                entry["undefined"] = f"{metric} undefined on this fold or in over 10 % of the replicates"
            else:
                entry.update(diff=res.diff, se=res.se, n_valid=res.n_valid, n_boot=res.n_boot)
            out.append(entry)
    return out


def _difference(metric: str, time: np.ndarray, event: np.ndarray, status: np.ndarray, strata: np.ndarray,
                pa: np.ndarray, pb: np.ndarray, counts: np.ndarray) -> PairedDifference | None:
    """A − B of ``metric`` from predictions [S_a, n], [S_b, n] and counts [B, n]."""
    if metric == "cindex":
        def reps(p: np.ndarray, w: np.ndarray) -> np.ndarray:
            return cindex_replicates(time, event, p, strata, w)
    else:
        def reps(p: np.ndarray, w: np.ndarray) -> np.ndarray:
            return auc_replicates(status, p, w)
    ones = np.ones((1, len(time)))
    point_a, point_b = float(np.mean(reps(pa, ones))), float(np.mean(reps(pb, ones)))
    if not (np.isfinite(point_a) and np.isfinite(point_b)):
        return None
    return paired_difference(reps(pa, counts), reps(pb, counts), point_a, point_b)


def summarise_paired(entries: Sequence[dict[str, Any]], methods: Sequence[str]) -> tuple[list[str], list[dict]]:
    """Markdown lines and table rows: mean difference over folds with 95 % CI and p."""
    if not entries:
        return [], []
    reference = entries[0]["a"]
    table, lines = [], []
    for m in methods:
        if m == reference:
            continue
        row: dict[str, Any] = {"a": reference, "b": m}
        for metric in METRICS:
            es = [e for e in entries if e["b"] == m and e["metric"] == metric]
            ok = [e for e in es if "undefined" not in e]
            if not ok:
                row[metric] = None
                continue
            comb = combine_folds([PairedDifference(e["diff"], e["se"], e["n_valid"], e["n_boot"]) for e in ok])
            lo, hi = comb.ci
            row[metric] = {"diff": comb.diff, "se": comb.se, "ci": [lo, hi], "p": comb.p, "folds": len(ok),
                           "folds_ahead": sum(e["diff"] > 0 for e in ok), "folds_behind": sum(e["diff"] < 0 for e in ok),
                           "folds_undefined": len(es) - len(ok), "n_boot": comb.n_boot,
                           # how much the per-fold differences vary vs what one fold's test sampling gives
                           "fold_spread": float(np.std([e["diff"] for e in ok], ddof=1)) if len(ok) > 1 else None,
                           "fold_se_rms": float(np.sqrt(np.mean([e["se"] ** 2 for e in ok])))}
        table.append(row)
    if not table:
        return [], []

    def fmt(v: dict | None) -> str:
        if v is None:
            return "— | — | —"
        p = f"{v['p']:.2f}" if v["p"] >= 0.01 else "< 0.01"
        return (f"{v['diff']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}] | {p} | "
                f"{v['folds_ahead']}/{v['folds']}")

    n_boot = max((v["n_boot"] for r in table for v in (r.get("cindex"), r.get("auc")) if v), default=0)
    lines += ["", f"Paired differences **{reference} − method** on the same test patients: each fold's test "
              f"patients resampled within sites ({n_boot} bootstrap replicates, the same resamples for every "
              "method), each method's metric averaged over its seeds; mean over folds with a 95 % interval and "
              "two-sided p (normal approximation, SE² summed over folds). The interval covers the sampling of "
              "the test patients with the trained models fixed, not retraining. \"Ahead\": folds where the "
              f"difference is > 0 (`{reference}` better).", "",
              "| method | Δ C-index (within sites) [95 % CI] | p | ahead | Δ status AUC [95 % CI] | p | ahead |",
              "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['b']} | {fmt(r['cindex'])} | {fmt(r['auc'])} |")
    spread = [f"{r['b']} {label} {v['fold_spread']:.3f} vs {v['fold_se_rms']:.3f}" for r in table
              for label, v in (("C", r.get("cindex")), ("AUC", r.get("auc"))) if v and v["fold_spread"] is not None]
    if spread:
        lines += ["", "Spread of the per-fold differences (std over folds) vs the test-sampling SE of one fold (root "
                  "mean square): " + "; ".join(spread) + ". Similar values mean the fold-to-fold swings are what "
                  "the size of a test fold produces by chance."]
    return lines, table


def merge_paired(runs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], log=print) -> list[dict[str, Any]]:
    """The paired entries of several runs that still describe the merged rows.

    ``rows``: the merged rows, each with its ``source`` file. An entry of run R for
    methods a, b on fold k is kept when the merged rows of a and b on fold k all come
    from R and have exactly the entry's seeds; otherwise it describes predictions the
    merged table no longer holds (another run's seeds or replaced rows) and is dropped
    (reported).
    """
    held: dict[tuple[str, int], tuple[set[int], set[str]]] = {}
    for r in rows:
        seeds, sources = held.setdefault((r["method"], int(r["fold"])), (set(), set()))
        seeds.add(int(r["seed"]))
        sources.add(r.get("source"))
    kept: dict[tuple[str, str, int, str], dict[str, Any]] = {}
    for run in runs:
        for e in run.get("paired", []):
            fold = int(e["fold"])
            ok = all(held.get((m, fold)) == (set(seeds), {run.get("_file")})
                     for m, seeds in ((e["a"], e["seeds_a"]), (e["b"], e["seeds_b"])))
            if ok:
                kept[(e["a"], e["b"], fold, e["metric"])] = {**e, "source": run.get("_file")}
            else:
                log(f"[cv-merge] paired {e['a']} − {e['b']} fold {fold} {e['metric']} from {run.get('_file')}: "
                    "the merged rows of these methods on this fold are not exactly this run's, dropped")
    return sorted(kept.values(), key=lambda e: (e["b"], e["fold"], e["metric"]))
