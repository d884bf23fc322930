"""Benchmark of the fusion network's training step: throughput with and without GCS.

    python -m simulations.bench_model [--repeats 7] [--steps 4] [--threads 2] [--device auto]

The model is the federation's: the union of the 8 modalities of the built-in
sites (shapes below, from ``sites/hancock.py`` and the CPTAC/TCGA generator),
default ``ModelConfig`` (GCS, random drop, alignment on). Two synthetic batches
of the real shapes are timed:

* HANCOCK-like: 5 tabular modalities (7/37/16/40/4 columns, ~10 % empty
  values, blood/ICD/cell density missing for some patients) + a bag of 1-8
  stain vectors x 520;
* CPTAC-like: CT per-slice tokens 40-150 x 1024 + 1-3 slide vectors x 768.

For each batch, plain and GCS steps are interleaved (same process, same
batch) and the median over repeats is reported: patients/s, step-time ratio
GCS/plain (target <= 2), the estimated time of one local epoch over ~490
HANCOCK + ~80 CPTAC training patients, the parameter count and the state size
in bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Sequence

import torch

from shared_model.batch import Batch, ModalityBatch
from shared_model.config import ModelConfig, TrainConfig, load_config
from shared_model.model import build_model
from shared_model.objective import training_step
from shared_model.runconfig import parse_overrides
from shared_model.train import make_optimizer
from sites.types import ModalitySpec

#: union of the built-in sites' modalities (name, kind, dim), model order
UNION: tuple[tuple[str, str, int], ...] = (
    ("clinical", "tabular", 7),
    ("pathological", "tabular", 37),
    ("blood", "tabular", 16),
    ("icd", "tabular", 40),
    ("tma_cell_density", "tabular", 4),
    ("tma_texture", "bag", 520),
    ("radiology", "sequence", 1024),
    ("pathology", "vector", 768),
)
#: share of patients having each modality at its site (HANCOCK provenance counts / 763)
PRESENT_RATE = {"clinical": 1.0, "pathological": 1.0, "blood": 0.91, "icd": 0.93,
                "tma_cell_density": 0.96, "tma_texture": 0.996, "radiology": 0.9, "pathology": 0.9}
HANCOCK_MODALITIES = ("clinical", "pathological", "blood", "icd", "tma_cell_density", "tma_texture")
CPTAC_MODALITIES = ("radiology", "pathology")
EPOCH_PATIENTS = {"hancock": 490, "cptac": 80}


def union_specs() -> tuple[ModalitySpec, ...]:
    return tuple(
        ModalitySpec(n, k, d, tuple(f"{n}_{j}" for j in range(d)) if k == "tabular" else ())
        for n, k, d in UNION
    )


def synthetic_batch(specs: Sequence[ModalitySpec], site_modalities: Sequence[str], b: int,
                    gen: torch.Generator) -> Batch:
    """A batch of ``b`` patients of a site holding ``site_modalities`` (others absent)."""
    token_counts = {"tma_texture": (1, 8), "radiology": (40, 150), "pathology": (1, 3)}
    mods: dict[str, ModalityBatch] = {}
    for s in specs:
        at_site = s.name in site_modalities
        present = (torch.rand(b, generator=gen) < PRESENT_RATE[s.name]) & at_site
        if at_site and not present.any():
            present[0] = True
        if s.kind == "tabular":
            obs = (torch.rand(b, s.dim, generator=gen) > 0.1) & present[:, None]
            vals = torch.randn(b, s.dim, generator=gen) * obs
            mods[s.name] = ModalityBatch(vals, obs, present)
            continue
        lo, hi = token_counts[s.name]
        n = torch.randint(lo, hi + 1, (b,), generator=gen) * present
        t = max(int(n.max()), 1)
        mask = torch.arange(t)[None, :] < n[:, None]
        vals = torch.randn(b, t, s.dim, generator=gen) * mask[..., None]
        mods[s.name] = ModalityBatch(vals, mask, present)
    expected = torch.tensor([s.name in site_modalities for s in specs]).expand(b, -1).clone()
    time_days = torch.rand(b, generator=gen) * 3000.0
    event = (torch.rand(b, generator=gen) < 0.4).float()
    event[0] = 1.0
    has_status = "clinical" in site_modalities
    status = (torch.rand(b, generator=gen) < 0.3).float() * has_status
    status_mask = torch.full((b,), has_status)
    return Batch(mods, expected, time_days, event, status, status_mask, torch.arange(b))


def _time_steps(model, batch, opt, rng, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        training_step(model, batch, opt, rng=rng, grad_clip=5.0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench(cfg: ModelConfig, train_cfg: TrainConfig, batch_size: int, repeats: int, steps: int,
          device: torch.device) -> dict:
    specs = union_specs()
    gen = torch.Generator().manual_seed(0)
    batches = {
        "hancock": synthetic_batch(specs, HANCOCK_MODALITIES, batch_size, gen).to(device),
        "cptac": synthetic_batch(specs, CPTAC_MODALITIES, batch_size, gen).to(device),
    }
    modes = {"plain": dataclasses.replace(cfg, use_gcs=False), "gcs": dataclasses.replace(cfg, use_gcs=True)}
    out: dict = {}
    for name, batch in batches.items():
        runs = {}
        for mode, mcfg in modes.items():
            model = build_model(specs, mcfg, seed=0).to(device)
            opt = make_optimizer(model, train_cfg)  # the trainers' optimiser (AdamW by default)
            rng = torch.Generator(device=device).manual_seed(0)
            _time_steps(model, batch, opt, rng, 2, device)  # warm-up
            runs[mode] = (model, opt, rng, [])
        for _ in range(repeats):  # interleaved, so load drift hits both modes alike
            for mode, (model, opt, rng, times) in runs.items():
                times.append(_time_steps(model, batch, opt, rng, steps, device))
        med = {mode: statistics.median(r[3]) for mode, r in runs.items()}
        out[name] = {
            "step_s": med,
            "patients_per_s": {m: batch_size / t for m, t in med.items()},
            "ratio": med["gcs"] / med["plain"],
            "tokens": {m: tuple(batch.modalities[m].values.shape[1:]) for m in ("tma_texture", "radiology",
                                                                                 "pathology")},
        }
        model = runs["gcs"][0]
        out["params"] = model.num_parameters()
        out["bytes"] = model.state_bytes()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed repeat")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0 = torch default)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--config", default=None, help="YAML with model./train. overrides")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.random_drop=false")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    try:
        overrides = parse_overrides(";".join(args.overrides))
    except ValueError as exc:
        parser.error(str(exc))
    full = load_config(args.config, overrides)
    cfg = full.model
    res = bench(cfg, full.train, args.batch_size, args.repeats, args.steps, device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"median of {args.repeats} x {args.steps} steps; random_drop={cfg.random_drop} "
          f"alignment={cfg.use_alignment}")
    print(f"parameters: {res['params']:,}   state size: {res['bytes']:,} bytes "
          f"({res['bytes'] / 2**20:.2f} MiB)")
    print(f"{'batch':<9}{'tokens (bag, ct, slides)':<34}{'plain pat/s':>12}{'GCS pat/s':>11}"
          f"{'plain ms':>10}{'GCS ms':>9}{'GCS/plain':>11}")
    epoch = {"plain": 0.0, "gcs": 0.0}
    for name in ("hancock", "cptac"):
        r = res[name]
        print(f"{name:<9}{str(tuple(r['tokens'].values())):<34}{r['patients_per_s']['plain']:>12.1f}"
              f"{r['patients_per_s']['gcs']:>11.1f}{1e3 * r['step_s']['plain']:>10.1f}"
              f"{1e3 * r['step_s']['gcs']:>9.1f}{r['ratio']:>11.2f}")
        for m in epoch:
            epoch[m] += EPOCH_PATIENTS[name] / r["patients_per_s"][m]
    print(f"estimated epoch (~{EPOCH_PATIENTS['hancock']} HANCOCK + ~{EPOCH_PATIENTS['cptac']} CPTAC "
          f"patients): plain {epoch['plain']:.2f} s, GCS {epoch['gcs']:.2f} s; "
          f"10 rounds x 1 epoch with GCS: {10 * epoch['gcs']:.1f} s of training")
    worst = max(res[n]["ratio"] for n in ("hancock", "cptac"))
    verdict = "OK" if worst <= 2 else "ABOVE TARGET"
    print(f"step-time ratio GCS/plain: worst {worst:.2f} (target <= 2): {verdict}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
