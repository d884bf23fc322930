"""Flower ServerApp (Flower 1.41 Message API): ``flwr run .`` starts here.

Resolves the run folder, runs :class:`server.strategy.SurvivalFedStrategy`, then
writes the final model, the Kaplan–Meier plot of the last round's pooled risk
groups, the C-index-per-round plot and a summary, and prints where they are.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from shared_model.atomic import atomic_path, atomic_write_bytes
from server.plots import kaplan_meier_problem, plot_cindex_per_round, plot_kaplan_meier
from server.results import RunRecorder
from server.strategy import FederationError, SurvivalFedStrategy
from server.summary import write_summary
from shared_model.runconfig import settings_from_run_config

app = ServerApp()
log = logging.getLogger("oncofed.server")


def run_dir_for(settings, run_id: int) -> Path:
    name = settings.run_name or time.strftime("run-%Y%m%d-%H%M%S") + f"-{run_id}"
    return settings.results_dir / name


def _configure_logging() -> None:
    logger = logging.getLogger("oncofed")
    if not logger.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(h)
    logger.setLevel(logging.INFO)


@app.main()
def main(grid: Grid, context: Context) -> None:
    _configure_logging()
    t0 = time.perf_counter()
    settings = settings_from_run_config(context.run_config)
    run_dir = run_dir_for(settings, context.run_id)
    if not settings.resume and run_dir.is_dir() and any(run_dir.iterdir()):
        # a new run over an old one would leave the old DONE, final model and round files beside it
        raise FederationError(f"run folder {run_dir} already holds a run; choose another run-name, "
                              "or set resume=true to continue that run")
    recorder = RunRecorder(run_dir)
    log.info("oncofed run %s: %d sites, %d rounds, %s; outputs in %s", context.run_id,
             len(settings.sites), settings.num_rounds, settings.server_optimizer, run_dir)
    strategy = SurvivalFedStrategy(settings, recorder)
    arrays = strategy.run(grid)
    state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
    with atomic_path(run_dir / "final_model.pt") as tmp:
        torch.save(state, tmp)
    atomic_write_bytes(run_dir / "final_model_spec.json", strategy.model_spec.encode())
    last = recorder.history[-1]
    km = run_dir / "km_final.png"
    km.unlink(missing_ok=True)  # a resumed run's plot is redrawn from its last round, or not at all
    km_problem = kaplan_meier_problem(last.get("pooled"))
    if km_problem is None:
        plot_kaplan_meier(last["pooled"], km,
                          title=f"Pooled risk groups, round {last['round']} (held-out patients of all sites)")
    else:  # e.g. every patient in one risk bin: the summary says why there is no plot
        log.warning("no Kaplan–Meier plot: %s", km_problem)
    plot_cindex_per_round(recorder.history, run_dir / "cindex_per_round.png")
    write_summary(run_dir, settings, strategy, recorder.history, seconds=time.perf_counter() - t0)
    atomic_write_bytes(run_dir / "DONE", (json.dumps({"round": last["round"]}) + "\n").encode())
    log.info("oncofed run finished in %.1f s; results: %s", time.perf_counter() - t0, run_dir)
    print(f"\nResults: {run_dir}\n")
