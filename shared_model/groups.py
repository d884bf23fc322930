"""Parameter groups and the patient counts that weight them (DESIGN §7).

The model exposes its state as named groups (``FusionModel.parameter_groups``).
Each group is aggregated by the server weighted by how much data informed it:

=====================  ==============================================
group                  weight (metric key sent by the client)
=====================  ==============================================
``encoder/<m>``        patients that have modality m  (``n-has:<m>``)
``missing/<m>``        patients that lack modality m  (``n-lacks:<m>``)
``dce_missing``        patients lacking a modality their site collects
                       (``n-incomplete``; DCE's m(b) = 1)
``status_head``        patients with a status label (``n-status``)
anything else          patients (``num-examples``): fusion, hazard head, GCS gate
=====================  ==============================================

Counts are over the training patients a client used in the round: aggregate
numbers only, never patient-level data.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sites.types import ModalitySpec, SiteData

NUM_EXAMPLES = "num-examples"


def has_key(modality: str) -> str:
    return f"n-has:{modality}"


def lacks_key(modality: str) -> str:
    return f"n-lacks:{modality}"


def weight_key(group: str) -> str:
    """Metric key whose value weights ``group`` in aggregation."""
    if group.startswith("encoder/"):
        return has_key(group.split("/", 1)[1])
    if group.startswith("missing/"):
        return lacks_key(group.split("/", 1)[1])
    if group == "dce_missing":
        return "n-incomplete"
    if group == "status_head":
        return "n-status"
    return NUM_EXAMPLES


def training_counts(site: SiteData, rows: np.ndarray, specs: Sequence[ModalitySpec]) -> dict[str, int]:
    """Aggregate counts of training rows ``rows`` for every key :func:`weight_key` can ask for."""
    rows = np.asarray(rows, dtype=np.int64)
    names = tuple(s.name for s in specs)
    present = site.presence_matrix(names)[rows]  # [n, M]
    expected = np.array([n in site.spec.modality_names for n in names])
    counts: dict[str, int] = {NUM_EXAMPLES: int(len(rows))}
    for j, name in enumerate(names):
        counts[has_key(name)] = int(present[:, j].sum())
        counts[lacks_key(name)] = int((~present[:, j]).sum())
    counts["n-incomplete"] = int(((~present) & expected[None, :]).any(axis=1).sum())
    counts["n-status"] = int((site.status[rows] >= 0).sum())
    return counts
