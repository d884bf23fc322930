"""Local training on this machine's device: CUDA when present, else CPU.

``python -m simulations.bench_device_training`` builds the built-in sites (into a
temporary folder unless ``--sites-dir`` holds them), then runs the shared
local-training function (``shared_model.train.train_local`` — what every client
calls) for a few epochs on HANCOCK and on CPTAC-PDA with ``train.device: auto``.
It prints the device actually used, seconds per epoch (median) and patients/s,
and (with ``--device auto``) checks that the parameters live on CUDA whenever
CUDA is available.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from shared_model.batch import SiteTensors
from shared_model.config import load_config
from shared_model.model import build_model
from shared_model.train import TrainPart, predict_rows, resolve_device, train_local
from sites import load_site
from sites.builtin import build_site


def run(sites_dir: Path, names: list[str], epochs: int, device_name: str) -> int:
    cfg = load_config(overrides={"train.device": device_name})
    device = resolve_device(cfg.train.device)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device} ({label}); CUDA available: {torch.cuda.is_available()}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    failures = 0
    for name in names:
        site = load_site(sites_dir / name)
        split = site.resolve_split("default")
        model = build_model(site.spec.modalities, cfg.model, seed=0).to(device)
        on = {p.device.type for p in model.parameters()}
        if device_name == "auto" and torch.cuda.is_available() and on != {"cuda"}:
            print(f"  {name}: parameters on {on}, expected cuda")
            failures += 1
        tensors = SiteTensors.for_training(site, site.spec.modalities, split.train,
                                             cfg.train.standardize_embeddings)
        times = []
        train_local(model, [TrainPart(tensors, split.train)], cfg.train, epochs=epochs, early_stopping=False,
                    epoch_callback=lambda e, r: times.append(time.perf_counter()))
        t0 = time.perf_counter()
        risk, _ = predict_rows(model, tensors, split.test)
        t_pred = time.perf_counter() - t0
        per_epoch = statistics.median(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else float("nan")
        print(f"  {name:<12} {len(split.train):>4} train patients: {per_epoch:6.2f} s/epoch "
              f"({len(split.train) / per_epoch:7.1f} patients/s), predict {len(split.test)} patients "
              f"in {t_pred:.2f} s, risk finite: {bool(torch.isfinite(torch.as_tensor(risk)).all())}")
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites-dir", default=None)
    ap.add_argument("--sites", default="hancock,cptac-pda")
    ap.add_argument("--epochs", type=int, default=4,
                    help="epochs per site, >= 3: the first is warm-up, the median is over the rest")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    if args.epochs < 3:
        ap.error(f"--epochs must be >= 3 (one warm-up epoch, then a median over at least two), got {args.epochs}")
    names = [s for s in args.sites.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        sites_dir = Path(args.sites_dir) if args.sites_dir else Path(tmp)
        for n in names:
            if not (sites_dir / n / "site.yaml").exists():
                build_site(n, sites_dir)
        return run(sites_dir, names, args.epochs, args.device)


if __name__ == "__main__":
    sys.exit(main())
