"""Which site folder a node serves, and a per-process cache of loaded sites.

* Deployment: ``flower-supernode --node-config 'site-dir="/srv/oncofed/hancock"'``
  (the folder of the hospital's site), or ``site="hancock"`` resolved inside the
  run config's ``sites-dir``.
* Simulation: ``partition-id`` i serves the i-th name of the run config's
  ``sites`` list, resolved inside ``sites-dir``.

The folder is read on the client's machine only. A hospital may also choose its own
input preprocessing: ``--node-config 'standardize-embeddings="none"'`` overrides the
run config's ``train.standardize_embeddings`` for this node only (local preprocessing;
the shared model is unchanged), and ``eval-*`` keys set what it agrees to send in an
evaluation (:class:`EvaluationLimits`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from shared_model.config import EMBEDDING_STANDARDISATION
from shared_model.runconfig import FederationSettings
from sites import load_site
from sites.problems import SiteValidationError
from sites.types import SiteData

_CACHE: dict[Path, tuple[float, SiteData]] = {}
_LOG = logging.getLogger(__name__)


class SiteFolderInvalid(RuntimeError):
    """A node's site folder failed validation. The message is what the server may see: the site's
    folder name, how many problems, in which files. Patient ids, lines and values stay in the
    node's own log (Flower sends an exception's text to the server as the reply's error)."""


def embedding_standardisation(node_config: Mapping[str, Any], settings: FederationSettings) -> str:
    """This node's ``standardize-embeddings`` (node config) or the run config's setting."""
    value = str(node_config.get("standardize-embeddings", settings.config.train.standardize_embeddings))
    if value not in EMBEDDING_STANDARDISATION:
        raise ValueError(f"node config standardize-embeddings={value!r}: use one of {EMBEDDING_STANDARDISATION}")
    return value


@dataclass(frozen=True)
class EvaluationLimits:
    """What this node agrees to send in a federated evaluation (node config, its own policy).

    * ``eval-min-patients`` (default 3): a site with fewer held-out patients sends no evaluation
      statistics (pass 1's moments of 1 or 2 scores would be the scores themselves), and a site
      with fewer status-labelled held-out patients sends no status statistics;
    * ``eval-min-time-bin-days`` (default 7), ``eval-max-time-bins`` (2048),
      ``eval-max-score-bins`` (1024): the finest pass-2 grid it counts on
      (:func:`shared_model.pooled_eval.grid_problem`). The run config's default grid (512 bins of
      10.7 days, 512 score bins) is within them."""

    min_patients: int = 3
    min_time_bin_days: float = 7.0
    max_time_bins: int = 2048
    max_score_bins: int = 1024


def evaluation_limits(node_config: Mapping[str, Any]) -> EvaluationLimits:
    """This node's :class:`EvaluationLimits` from its node config (defaults where unset)."""
    d = EvaluationLimits()
    try:
        limits = EvaluationLimits(
            min_patients=int(node_config.get("eval-min-patients", d.min_patients)),
            min_time_bin_days=float(node_config.get("eval-min-time-bin-days", d.min_time_bin_days)),
            max_time_bins=int(node_config.get("eval-max-time-bins", d.max_time_bins)),
            max_score_bins=int(node_config.get("eval-max-score-bins", d.max_score_bins)),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"node config eval-* limits: {exc}") from exc
    if limits.min_patients < 1 or limits.max_time_bins < 1 or limits.max_score_bins < 2 or not (
            math.isfinite(limits.min_time_bin_days) and limits.min_time_bin_days >= 0):
        raise ValueError(f"node config eval-* limits out of range: {limits} (eval-min-patients >= 1, "
                         "eval-max-time-bins >= 1, eval-max-score-bins >= 2, eval-min-time-bin-days >= 0)")
    return limits


def site_path(node_config: Mapping[str, Any], settings: FederationSettings) -> Path:
    """Folder of this node's site (see module docstring)."""
    if "site-dir" in node_config:
        return Path(str(node_config["site-dir"])).expanduser()
    if "site" in node_config:
        return settings.sites_dir / str(node_config["site"])
    if "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        if not settings.sites:
            raise ValueError("run config 'sites' is empty: no site for partition-id %d" % pid)
        if pid < 0:  # Python's negative indexing would silently serve another site
            raise ValueError(f"partition-id {pid} is negative; it must be 0 to {len(settings.sites) - 1} "
                             f"(one per site of the run config: {', '.join(settings.sites)})")
        if pid >= len(settings.sites):
            raise ValueError(
                f"partition-id {pid} but the run config lists only {len(settings.sites)} sites "
                f"({', '.join(settings.sites)}); run the simulation with "
                f"--federation-config \"num-supernodes={len(settings.sites)}\""
            )
        return settings.sites_dir / settings.sites[pid]
    raise ValueError(
        "this node has no site: set --node-config 'site-dir=\"/path/to/site\"' "
        "(or 'site=\"name\"' with the run config's sites-dir)"
    )


def load_site_cached(path: Path) -> SiteData:
    """Load (and validate) a site once per process; reload when ``site.yaml`` changes."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"site folder {path} does not exist; build the built-in sites with "
            f"`oncofed sites build --all {path.parent}` or point the node at its site folder"
        )
    yaml_file = path / "site.yaml"
    mtime = yaml_file.stat().st_mtime if yaml_file.exists() else -1.0
    hit = _CACHE.get(path)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    try:
        site = load_site(path)
    except SiteValidationError as err:
        _LOG.error("%s", err)  # the full list (patients, lines, values): this node's log only
        # top-level entries only: a folder modality's file is named after its patient (ct/P0000.npy)
        files = sorted({p.file.split("/")[0] + ("/" if "/" in p.file else "") for p in err.problems})
        n = len(err.problems)
        raise SiteFolderInvalid(
            f"site folder {path.name!r} is not valid ({n} problem{'s' if n != 1 else ''} in "
            f"{', '.join(files)}); the details are in this node's log and are not sent to the server: "
            f"run `oncofed sites validate <folder>` on the node"
        ) from None
    _CACHE[path] = (mtime, site)
    return site
