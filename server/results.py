"""Outputs of a federated run, one folder per run.

::

    <results-dir>/<run-name>/
        config.json               resolved run config, model spec, site declarations
        rounds.json               every round: per-site train/eval metrics, aggregated
                                  values, pooled metrics (the full history)
        metrics_per_round.csv     one row per (round, site); rows "pooled" and
                                  "mean-of-sites" hold the federation's numbers
        pooled/round_NNN.json     pooled evaluation of round NNN (C-index, Uno's C,
                                  AUC, td-AUC, KM curves, log-rank, HR)
        checkpoint.pt             last round's checkpoint (resume)
        final_model.pt            final global state_dict (+ final_model_spec.json)
        km_final.png              Kaplan–Meier of pooled risk groups, last round
        cindex_per_round.png      pooled vs mean-of-sites vs per-site C-index
        summary.md                short human-readable summary

Every file is written atomically (temp file + rename).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable

from shared_model.atomic import atomic_write_bytes

log = logging.getLogger("oncofed.server")

CSV_COLUMNS = (
    "round", "site", "simulated", "n_train", "train_loss", "n_test", "n_events",
    "cindex", "cindex_within_sites", "auc", "cindex_uno", "td_auc", "logrank_p", "hazard_ratio",
)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=False).encode())


def _fmt(v: Any, width: int = 7) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—".rjust(width)
    if isinstance(v, float):
        return f"{v:.4f}".rjust(width)
    return str(v).rjust(width)


class RunRecorder:
    """Writes a run's outputs; keeps the history so a resumed run continues it."""

    def __init__(self, run_dir: Path, history: list[dict[str, Any]] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.history: list[dict[str, Any]] = list(history or [])

    def clear_done(self) -> None:
        """Remove ``DONE`` (the marker of a finished run) when a run or a resume starts its rounds."""
        (self.run_dir / "DONE").unlink(missing_ok=True)

    def write_config(self, config: dict[str, Any]) -> None:
        write_json(self.run_dir / "config.json", config)

    def add_round(self, record: dict[str, Any]) -> None:
        """Append one round's record and rewrite rounds.json, the CSV and pooled/round_NNN.json."""
        self.history = [r for r in self.history if r["round"] != record["round"]] + [record]
        self.history.sort(key=lambda r: r["round"])
        write_json(self.run_dir / "rounds.json", self.history)
        if record.get("report") is not None:
            write_json(self.run_dir / "pooled" / f"round_{record['round']:03d}.json", record["report"])
        self._write_csv()

    def rows(self) -> Iterable[dict[str, Any]]:
        for r in self.history:
            for site, s in sorted(r.get("sites", {}).items()):
                yield {
                    "round": r["round"], "site": site, "simulated": s.get("simulated"),
                    "n_train": s.get("n_train"), "train_loss": s.get("train_loss"),
                    "n_test": s.get("n_test"), "n_events": s.get("n_events"),
                    "cindex": s.get("cindex"), "auc": s.get("auc"),
                }
            mean = (r.get("mean_of_sites") or {}).get("mean", {})
            yield {"round": r["round"], "site": "mean-of-sites", "cindex": mean.get("cindex_harrell"),
                   "auc": mean.get("auc_status")}
            p = r.get("pooled") or {}
            td = p.get("td_auc") or {}
            yield {
                "round": r["round"], "site": "pooled",
                "n_train": r.get("n_train"), "train_loss": r.get("train_loss"),
                "n_test": p.get("n"), "n_events": p.get("n_events"),
                "cindex": p.get("cindex_harrell"), "auc": p.get("auc_status"),
                "cindex_within_sites": p.get("cindex_harrell_within_sites"),
                "cindex_uno": p.get("cindex_uno"),
                "td_auc": ";".join(f"{k}:{v:.4f}" for k, v in td.items() if v is not None) or None,
                "logrank_p": p.get("logrank_p"), "hazard_ratio": p.get("hazard_ratio"),
            }

    def _write_csv(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in self.rows():
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
        atomic_write_bytes(self.run_dir / "metrics_per_round.csv", buf.getvalue().encode())

    def round_table(self, record: dict[str, Any]) -> str:
        """A short per-round table for the log."""
        label = f"round {record['round']}:"
        lines = [f"{label:<10}{'site':<22}{'n_train':>8}{'loss':>8}{'n_test':>8}"
                 f"{'C-index':>8}{'AUC':>8}"]
        for site, s in sorted(record.get("sites", {}).items()):
            tag = f"{site}{' (sim)' if s.get('simulated') else ''}"
            lines.append(
                f"          {tag:<22}{_fmt(s.get('n_train'), 8)}{_fmt(s.get('train_loss'), 8)}"
                f"{_fmt(s.get('n_test'), 8)}{_fmt(s.get('cindex'), 8)}{_fmt(s.get('auc'), 8)}"
            )
        mean = (record.get("mean_of_sites") or {}).get("mean", {})
        p = record.get("pooled") or {}
        lines.append(f"          {'mean of sites':<22}{'':>8}{'':>8}{'':>8}"
                     f"{_fmt(mean.get('cindex_harrell'), 8)}{_fmt(mean.get('auc_status'), 8)}")
        lines.append(f"          {'POOLED':<22}{_fmt(record.get('n_train'), 8)}"
                     f"{_fmt(record.get('train_loss'), 8)}{_fmt(p.get('n'), 8)}"
                     f"{_fmt(p.get('cindex_harrell'), 8)}{_fmt(p.get('auc_status'), 8)}")
        return "\n".join(lines)
