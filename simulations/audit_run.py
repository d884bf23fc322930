"""Audit of a finished *simulation*: exact pooled metrics vs. the server's pooled-from-counts.

``python -m simulations.audit_run results/<run>`` loads the run's final model and
every site folder (possible only in a simulation, where all sites sit on one
machine — in a real federation no party can do this), predicts each site's
held-out patients, and computes centrally, with lifelines/scikit-learn on the
concatenated predictions, the numbers the server derived from summed counts in the
last round: Harrell's C, Uno's C, status AUC, time-dependent AUC. It prints them
side by side with the differences and with the mean-of-sites values.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from shared_model import metrics
from shared_model.batch import SiteTensors
from shared_model.config import Config, apply_overrides
from shared_model.model import build_model
from shared_model.specs import specs_from_json
from shared_model.train import predict_rows
from sites import load_site


def _config(settings: dict) -> Config:
    cfg = settings["config"]
    return apply_overrides(Config(), {"model": cfg["model"], "train": cfg["train"]})


def audit(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    conf = json.loads((run_dir / "config.json").read_text())
    settings = conf["settings"]
    cfg = _config(settings)
    specs = specs_from_json(conf["model_spec"])
    model = build_model(specs, cfg.model, seed=int(settings["seed"]))
    model.load_state_dict(torch.load(run_dir / "final_model.pt", map_location="cpu"))
    last = json.loads((run_dir / "rounds.json").read_text())[-1]
    # the run config lists folders; rounds.json keys sites by their site.yaml names, which may differ
    loaded = [load_site(Path(settings["sites_dir"]) / folder) for folder in settings["sites"]]
    by_name = {site.name: site for site in loaded}
    missing = sorted(set(last["sites"]) - set(by_name))
    if missing:
        raise ValueError(f"sites {missing} of {run_dir} are not among the run config's folders "
                         f"{settings['sites']} in {settings['sites_dir']}")
    parts, lab, prob = {}, [], []
    for name in sorted(last["sites"]):
        site = by_name[name]
        split = site.resolve_split(settings["split"])
        # each node's own input standardisation (node config), as its client predicted
        standardise = conf.get("sites", {}).get(name, {}).get("standardize_embeddings") or \
            cfg.train.standardize_embeddings
        tensors = SiteTensors.for_training(site, specs, split.train, standardise)
        risk, p = predict_rows(model, tensors, split.test)
        parts[name] = (site.time[split.test], site.event[split.test], risk)
        st = site.status[split.test]
        if p is not None and (st >= 0).any():
            lab.append(st[st >= 0]), prob.append(p[st >= 0])
    t, e, r = (np.concatenate([q[k] for q in parts.values()]) for k in range(3))
    c = metrics.site_cindices(parts)
    exact = {"cindex_harrell": c["cindex_pooled"], "n": int(len(t)), "cindex_harrell_within_sites": c["cindex"]}
    pooled = last["pooled"]
    tau = max(settings["eval_horizons_days"]) if settings["eval_horizons_days"] else None
    try:
        exact["cindex_uno"] = metrics.uno_cindex(t, e, r, tau=tau)
    except metrics.MetricUndefinedError:
        exact["cindex_uno"] = None
    if lab:
        exact["auc_status"] = metrics.binary_auc(np.concatenate(lab), np.concatenate(prob))
    horizons = [h for h in settings["eval_horizons_days"] if t.min() < h < t.max()]
    try:
        tda = metrics.time_dependent_auc(t, e, r, horizons)
        exact["td_auc"] = {f"{h:g}d": float(a) for h, a in zip(horizons, tda)}
    except metrics.MetricUndefinedError:
        exact["td_auc"] = {}
    return {"round": last["round"], "exact": exact, "pooled": pooled,
            "mean_of_sites": (last.get("mean_of_sites") or {}).get("mean", {}),
            "sites": {k: v.get("cindex") for k, v in last["sites"].items()},
            "exact_sites": c["per_site"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    args = ap.parse_args(argv)
    a = audit(Path(args.run_dir))
    ex, po, mean = a["exact"], a["pooled"], a["mean_of_sites"]
    print(f"Run {args.run_dir}, round {a['round']}, {ex['n']} held-out patients")
    print(f"{'metric':<28}{'pooled (counts)':>17}{'exact (central)':>17}{'difference':>12}{'mean of sites':>15}")
    for key in ("cindex_harrell", "cindex_harrell_within_sites", "cindex_uno", "auc_status"):
        p, x = po.get(key), ex.get(key)
        d = f"{p - x:+.4f}" if p is not None and x is not None else "—"
        m = mean.get(key)
        print(f"{key:<28}{(f'{p:.4f}' if p is not None else '—'):>17}{(f'{x:.4f}' if x is not None else '—'):>17}"
              f"{d:>12}{(f'{m:.4f}' if m is not None else '—'):>15}")
    for h, x in ex.get("td_auc", {}).items():
        p = next((v for k, v in (po.get("td_auc") or {}).items() if abs(float(k.rstrip("d")) - float(h.rstrip("d"))) < 2), None)
        d = f"{p - x:+.4f}" if p is not None else "—"
        print(f"{'td-AUC ' + h:<28}{(f'{p:.4f}' if p is not None else '—'):>17}{x:>17.4f}{d:>12}")
    print("per-site C-index:", ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} —" for k, v in sorted(a["sites"].items())))
    # the clients' own exact C against the audit's recomputation: a mismatch means the audit's
    # predictions are not the clients' (another model, split or preprocessing), not binning
    differ = [k for k, v in a["sites"].items()
              if (v is None) != (a["exact_sites"].get(k) is None) or
              (v is not None and abs(v - a["exact_sites"][k]) > 1e-9)]
    if differ:
        print(f"WARNING: the audit's per-site C differs from the clients' at {', '.join(sorted(differ))}: "
              "its predictions are not the clients'")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
