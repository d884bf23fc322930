"""The federation's strategy: modality-aware FedAvg family on Flower's message API.

``SurvivalFedStrategy`` subclasses ``flwr.serverapp.strategy.FedAvg`` (message
construction, reply checks and logging) and replaces the round loop of
``Strategy.start`` with one that adds what a medical federation needs:

1. **Handshake** (``query``): each site declares its modalities; the server builds
   the model from their union, so every client holds the same network.
2. **Train**: per-group weighted aggregation (``server.aggregation``) followed by
   the configured server optimiser (``server.server_optimizers``), per group.
3. **Evaluate** in two additive passes (``shared_model.pooled_eval``): moments ->
   grid -> counts -> pooled C-index / AUC / KM / log-rank / HR, beside per-site
   and mean-of-sites values.
4. **Checkpoint** after every round (atomic) and **resume** from it.
5. **Failures**: a site whose reply is an error (failed validation, crash) is
   logged by name with the reason and left out of that round; the run goes on
   while at least ``min-sites`` sites answer, and fails with a message below it —
   it never waits forever (node wait and round timeouts).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server.aggregation import ClientUpdate, aggregate_groups
from server.checkpoint import Checkpoint, load_checkpoint, resume_problems, save_checkpoint
from server.results import RunRecorder
from server.server_optimizers import make_server_optimizer
from shared_model import pooled_eval
from shared_model.model import build_model
from shared_model.runconfig import FederationSettings
from shared_model.specs import specs_from_json, specs_to_json
from sites import union_specs
from sites.problems import repeated
from sites.types import SiteSpec

log = logging.getLogger("oncofed.server")


class FederationError(RuntimeError):
    """The run cannot continue (too few sites, incompatible declarations...)."""


@dataclass
class SiteInfo:
    node_id: int
    site: str
    cohort: str
    simulated: bool
    tasks: tuple[str, ...]
    modalities: str  # JSON
    n_patients: int
    n_train: int
    n_test: int
    split: str
    standardize_embeddings: str = ""  # the node's input standardisation (its own choice, node config)


def _site_of(msg: Message) -> str | None:
    try:
        return str(msg.content["site"]["site"])
    except Exception:
        return None


class SurvivalFedStrategy(FedAvg):
    """See module docstring. ``settings`` come from the Flower run config."""

    def __init__(self, settings: FederationSettings, recorder: RunRecorder) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=settings.min_sites,
            min_evaluate_nodes=settings.min_sites,
            min_available_nodes=settings.min_sites,
        )
        self.settings = settings
        self.recorder = recorder
        self.sites: dict[int, SiteInfo] = {}
        self.optimizer = make_server_optimizer(
            settings.server_optimizer,
            eta=settings.server_lr,
            beta1=settings.server_beta1,
            beta2=settings.server_beta2,
            tau=settings.server_tau,
        )
        self.model_spec = ""
        self.groups: dict[str, list[str]] = {}
        self.buffers: set[str] = set()
        self._known_nodes: set[int] = set()  # connected when the run started (wait_for_nodes)

    # ------------------------------------------------------------------ nodes
    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """Node ids once all expected sites are connected, or ``min-sites`` after the timeout."""
        expected = max(self.settings.min_sites, len(self.settings.sites))
        deadline = time.monotonic() + self.settings.node_wait_timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            self._known_nodes = set(nodes)
            if len(nodes) >= expected:
                return nodes
            if time.monotonic() >= deadline:
                if len(nodes) >= self.settings.min_sites:
                    log.warning("only %d of %d expected sites connected after %.0f s; going on",
                                len(nodes), expected, self.settings.node_wait_timeout)
                    return nodes
                raise FederationError(
                    f"only {len(nodes)} node(s) connected after {self.settings.node_wait_timeout:.0f} s, "
                    f"below min-sites={self.settings.min_sites}. In simulation pass "
                    f"--federation-config \"num-supernodes={len(self.settings.sites)}\"."
                )
            time.sleep(0.5)

    def _send(self, grid: Grid, messages: list[Message]) -> list[Message]:
        replies = list(grid.send_and_receive(messages, timeout=self.settings.round_timeout))
        answered = {m.metadata.src_node_id for m in replies}
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                site = self.sites.get(m.metadata.dst_node_id)
                log.error("site %s (node %d) did not answer within %.0f s",
                          site.site if site else "?", m.metadata.dst_node_id, self.settings.round_timeout)
        return replies

    def _split_replies(self, replies: Iterable[Message], phase: str) -> list[Message]:
        """Valid replies; log every failed site by name with its reason."""
        ok = []
        for m in replies:
            site = self.sites.get(m.metadata.src_node_id)
            name = site.site if site else f"node {m.metadata.src_node_id}"
            if m.has_error():
                reason = m.error.reason.strip().splitlines()
                log.error("site %s failed in %s: %s", name, phase,
                          " | ".join(reason[-3:]) if reason else "(no reason)")
            else:
                ok.append(m)
        return ok

    def _require(self, n_ok: int, phase: str) -> None:
        if n_ok < self.settings.min_sites:
            raise FederationError(
                f"{phase}: only {n_ok} site(s) answered, below min-sites={self.settings.min_sites}; "
                "see the errors above for each failed site"
            )

    # -------------------------------------------------------------- handshake
    def handshake(self, grid: Grid, nodes: list[int]) -> None:
        msgs = [
            Message(RecordDict({"config": ConfigRecord({"phase": "describe"})}), dst_node_id=n,
                    message_type=MessageType.QUERY)
            for n in nodes
        ]
        for m in self._split_replies(self._send(grid, msgs), "handshake"):
            c = m.content["site"]
            self.sites[m.metadata.src_node_id] = SiteInfo(
                node_id=m.metadata.src_node_id, site=str(c["site"]), cohort=str(c["cohort"]),
                simulated=bool(c["simulated"]), tasks=tuple(str(c["tasks"]).split(",")),
                modalities=str(c["modalities"]), n_patients=int(c["n-patients"]),
                n_train=int(c["n-train"]), n_test=int(c["n-test"]), split=str(c["split"]),
                standardize_embeddings=str(c.get("standardize-embeddings", "")),
            )
        self._require(len(self.sites), "handshake")
        names = [s.site for s in self.sites.values()]
        dup = repeated(names)
        if dup:
            raise FederationError(f"several nodes serve the same site {dup}: each site needs its own node")
        order = {name: i for i, name in enumerate(self.settings.sites)}
        infos = sorted(self.sites.values(), key=lambda s: (order.get(s.site, len(order)), s.site))
        specs = union_specs(
            [SiteSpec(s.site, s.cohort, "days", s.tasks, specs_from_json(s.modalities), s.simulated)
             for s in infos]
        )
        self.model_spec = specs_to_json(specs)
        for s in infos:
            log.info("site %-14s node %d  %s  %d patients (%d train / %d test, %s)%s", s.site, s.node_id,
                     s.cohort, s.n_patients, s.n_train, s.n_test, s.split,
                     "  [simulated embeddings]" if s.simulated else "")

    # ------------------------------------------------------------------ rounds
    def _config(self, server_round: int, **extra: Any) -> ConfigRecord:
        return ConfigRecord({"server-round": server_round, "model-spec": self.model_spec,
                             "local-epochs": self.settings.local_epochs, **extra})

    def _messages(self, content_fn, message_type: str) -> list[Message]:
        return [Message(content_fn(), dst_node_id=n, message_type=message_type) for n in sorted(self.sites)]

    def warn_late_nodes(self, grid: Grid) -> None:
        """Log, once per node, a node that connected after the run's sites were fixed."""
        late = set(grid.get_node_ids()) - self._known_nodes
        if late:
            self._known_nodes |= late
            log.warning("node(s) %s connected after the run started and take no part in it; list every "
                        "participating site in the run config's sites so the server waits for it",
                        ", ".join(str(n) for n in sorted(late)))

    def train_round(self, grid: Grid, server_round: int, arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        self.warn_late_nodes(grid)
        record = ArrayRecord({k: Array(np.array(v, copy=True, order="C")) for k, v in arrays.items()})
        msgs = self._messages(lambda: RecordDict({"arrays": record, "config": self._config(server_round)}),
                              MessageType.TRAIN)
        replies = self._split_replies(self._send(grid, msgs), f"train round {server_round}")
        self._require(len(replies), f"train round {server_round}")
        updates, per_site = [], {}
        for m in replies:
            site = self.sites[m.metadata.src_node_id]
            metrics = dict(m.content["metrics"])
            updates.append(ClientUpdate(site.site, {k: v.numpy() for k, v in m.content["arrays"].items()},
                                        metrics))
            per_site[site.site] = {"n_train": int(metrics["num-examples"]),
                                   "train_loss": float(metrics["train-loss"]),
                                   "train_seconds": float(metrics.get("train-seconds", 0.0)),
                                   "torch_threads": int(metrics.get("torch-threads", 0)),
                                   "simulated": site.simulated}
        agg = aggregate_groups(arrays, self.groups, updates)
        new_arrays = self.optimizer.step(arrays, agg.arrays, self.groups, agg.informed, averaged=self.buffers)
        uninformed = sorted(set(self.groups) - agg.informed)
        if uninformed:
            log.info("round %d: groups no site informed (kept): %s", server_round, ", ".join(uninformed))
        return new_arrays, {"sites": per_site, "group_weights": agg.group_weights}

    def evaluate_round(self, grid: Grid, server_round: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        record = ArrayRecord({k: Array(np.array(v, copy=True, order="C")) for k, v in arrays.items()})
        msgs = self._messages(lambda: RecordDict({"arrays": record, "config": self._config(server_round)}),
                              MessageType.EVALUATE)
        replies = self._split_replies(self._send(grid, msgs), f"evaluate round {server_round}")
        self._require(len(replies), f"evaluate round {server_round}")
        per_site: dict[str, dict[str, Any]] = {}
        m_risk = np.zeros(3)
        m_status = np.zeros(3)
        answered = []
        for m in replies:
            site = self.sites[m.metadata.src_node_id]
            met = dict(m.content["metrics"])
            m_risk += np.asarray(met["moments-risk"], dtype=float)
            m_status += np.asarray(met["moments-status"], dtype=float)
            per_site[site.site] = {
                "n_test": int(met["num-examples"]), "n_events": int(met["n-events"]),
                "n_status": int(met.get("n-status", 0)),
                "cindex": met.get("cindex"), "auc": met.get("auc"), "cindex_uno": met.get("cindex-uno"),
                **{k.replace("td-auc-", "td_auc_"): v for k, v in met.items() if k.startswith("td-auc-")},
                "simulated": site.simulated,
            }
            answered.append(m.metadata.src_node_id)
        grid_def = pooled_eval.make_grid(
            m_risk, m_status,
            horizon_days=self.settings.eval_horizon_days,
            n_time_bins=self.settings.eval_time_bins,
            n_risk_bins=self.settings.eval_risk_bins,
            horizons_days=self.settings.eval_horizons_days,
        )
        grid_rec = ConfigRecord(grid_def.to_record())
        msgs = [
            Message(RecordDict({"grid": grid_rec, "config": self._config(server_round)}), dst_node_id=n,
                    message_type=f"{MessageType.EVALUATE}.counts")
            for n in sorted(answered)
        ]
        replies = self._split_replies(self._send(grid, msgs), f"evaluate (counts) round {server_round}")
        self._require(len(replies), f"evaluate (counts) round {server_round}")
        stats = []
        for m in replies:
            met = dict(m.content["metrics"])
            stats.append(pooled_eval.SiteStatistics.from_arrays(
                {k: np.asarray(v) for k, v in met.items() if k != "num-examples"}, grid_def))
        total = pooled_eval.sum_statistics(stats)
        pooled = pooled_eval.pooled_metrics(
            total, grid_def, horizons_days=self.settings.eval_horizons_days,
            groups=self.settings.eval_risk_groups,
        )
        pooled.cindex_harrell_within_sites = pooled_eval.within_site_cindex(stats, grid_def)
        report = pooled_eval.round_report(server_round, pooled, per_site)
        return {
            "sites_eval": per_site,
            "pooled": pooled.to_dict(),
            "mean_of_sites": report["mean_of_sites"],
            "report": report,
        }

    # -------------------------------------------------------------------- run
    def run(self, grid: Grid) -> dict[str, np.ndarray]:
        """Handshake, then rounds with checkpoints; returns the final global arrays."""
        s = self.settings
        nodes = self.wait_for_nodes(grid)
        self.handshake(grid, nodes)
        model = build_model(specs_from_json(self.model_spec), s.config.model, seed=s.seed)
        self.groups = {g: list(keys) for g, keys in model.parameter_groups().items()}
        self.buffers = {k for k, _ in model.named_buffers()}  # statistics: averaged, never stepped
        arrays = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
        n_params = int(sum(p.numel() for p in model.parameters()))
        start = 1
        ckpt = load_checkpoint(self.recorder.run_dir) if s.resume else None
        if ckpt is not None:
            if ckpt.model_spec != self.model_spec:
                raise FederationError(
                    f"cannot resume {self.recorder.run_dir}: the sites now declare a different model "
                    "than the checkpoint's (modalities changed)"
                )
            self.optimizer.load_state_dict(ckpt.optimizer_state)
            arrays = ckpt.arrays
            start = ckpt.round + 1
            self.recorder.history = ckpt.history
            log.info("resuming from %s after round %d", self.recorder.run_dir, ckpt.round)
        elif s.resume:
            log.info("resume requested but no checkpoint in %s: starting at round 1", self.recorder.run_dir)
        site_decl = {i.site: {"cohort": i.cohort, "simulated": i.simulated, "tasks": list(i.tasks),
                              "n_patients": i.n_patients, "n_train": i.n_train, "n_test": i.n_test,
                              "split": i.split, "modalities": [m.name for m in specs_from_json(i.modalities)],
                              "standardize_embeddings": i.standardize_embeddings}
                     for i in self.sites.values()}
        if ckpt is not None:
            problems = resume_problems(ckpt, s.as_dict(), site_decl)
            if problems:
                raise FederationError(
                    f"cannot resume {self.recorder.run_dir}: the run would not compute what the interrupted "
                    "one did (" + "; ".join(problems) + "); resume with the same settings, or start a new run-name"
                )
        # accepted: from here a resumed run is not done until it ends again (a refused resume, or one
        # that never got its sites, leaves the finished run's DONE as it was)
        self.recorder.clear_done()
        self.recorder.write_config({
            "settings": s.as_dict(), "model_spec": self.model_spec, "sites": site_decl,
            "n_parameters": n_params, "parameter_groups": {g: len(k) for g, k in self.groups.items()},
        })
        for server_round in range(start, s.num_rounds + 1):
            t0 = time.perf_counter()
            arrays, train_info = self.train_round(grid, server_round, arrays)
            t1 = time.perf_counter()
            eval_info = self.evaluate_round(grid, server_round, arrays)
            t2 = time.perf_counter()
            sites = {}
            for name in sorted(set(train_info["sites"]) | set(eval_info["sites_eval"])):
                sites[name] = {**train_info["sites"].get(name, {}), **eval_info["sites_eval"].get(name, {})}
            n_train = sum(v.get("n_train", 0) for v in train_info["sites"].values())
            loss = (sum(v["train_loss"] * v["n_train"] for v in train_info["sites"].values()) / n_train
                    if n_train else None)
            record = {
                "round": server_round, "sites": sites, "n_train": n_train, "train_loss": loss,
                "pooled": eval_info["pooled"], "mean_of_sites": eval_info["mean_of_sites"],
                "report": eval_info["report"],
                "group_weights": train_info["group_weights"],
                "seconds": {"train": t1 - t0, "evaluate": t2 - t1,
                            "client_train_max": max((v.get("train_seconds", 0.0)
                                                     for v in train_info["sites"].values()), default=0.0)},
            }
            self.recorder.add_round(record)
            save_checkpoint(self.recorder.run_dir, Checkpoint(
                round=server_round, arrays=arrays, optimizer_state=self.optimizer.state_dict(),
                model_spec=self.model_spec, settings=s.as_dict(), history=self.recorder.history,
                sites=site_decl,
            ))
            log.info("\n%s", self.recorder.round_table(record))
        return arrays
