"""Parameter groups and the patient counts that weight them (DESIGN §7).

The model exposes its state as named groups (``FusionModel.parameter_groups``).
Each group is aggregated by the server weighted by how much data informed it:

=======================  ==============================================================
group                    weight (metric key sent by the client)
=======================  ==============================================================
``encoder/<m>``          patients that have modality m  (``n-has:<m>``)
``missing/<m>``          patients on whom m's adapter- and fusion-level tokens stand in
                         during training (``n-token:<m>``): each patient lacking m counts
                         1; with HAF's random drop, each patient having m and another
                         modality counts 1/4 (see below)
``missing-input/<m>``    the same count at sites that collect m, 0 at a site that never
                         does (``n-input-token:<m>``)
``dce_missing``          patients for whom DCE's m(b) = 1 during training
                         (``n-incomplete``): each patient lacking a modality their site
                         collects counts 1; with random drop, each other patient with >= 2
                         modalities counts 1/2
``status_head``          patients with a status label (``n-status``)
anything else            patients (``num-examples``): fusion, hazard head, GCS gate
=======================  ==============================================================

Two deviations from DESIGN §7's literal "missing tokens by the number that lack m":

* **Random drop trains the tokens too.** HAF's drop pass (``model.random_drop``,
  :func:`shared_model.alignment.random_modality_keep`) replaces each present modality
  of a patient with >= 2 of them by its missing tokens with probability 1/2 and sets
  m(b) = 1, so a site where nobody lacks m still trains m's tokens and t_miss. Counting
  only the patients that lack m discarded those updates (weight 0) -- HANCOCK's
  tokens for clinical data, which every HANCOCK patient has, were the other sites'.
  Each patient counts by the share of a training step's two passes (full, drop) in
  which the token stands in for it: 1 for a patient lacking m (both passes), 1/4 for
  one who has m and may lose it (the drop pass, with probability 1/2); for t_miss 1
  and 1/2 (every drop sets m(b) = 1).
* **The input-level token is only informed where m is collected.** ``missing.<m>.input``
  (``unimodal_input='input'``) enters the prediction through a linear head, so at a
  site that never collects m it adds the same constant to every patient's log-risk
  and status logit: the Cox partial likelihood does not change with it, and the
  status loss trains it only as a second intercept beside the status head's bias.
  Under the literal rule those sites held the weight (HANCOCK 611 of 634 for CT's
  token in the main job), so the global CT token followed HANCOCK's intercept fit
  (its norm fell from 0.64 to 0.09 in 7 rounds of a replay of the main job), not
  what the CPTAC patients lacking CT taught it. The adapter- and fusion-level tokens
  do matter at such sites: they are attended beside each patient's own tokens, so
  they keep the whole count.

Counts are over the training patients a client used in the round: aggregate
numbers only, never patient-level data.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sites.types import ModalitySpec, SiteData

NUM_EXAMPLES = "num-examples"
INCOMPLETE = "n-incomplete"
STATUS = "n-status"


def has_key(modality: str) -> str:
    return f"n-has:{modality}"


def lacks_key(modality: str) -> str:
    """Patients lacking m (reported; not a weight since the tokens also learn from drops)."""
    return f"n-lacks:{modality}"


def token_key(modality: str) -> str:
    return f"n-token:{modality}"


def input_token_key(modality: str) -> str:
    return f"n-input-token:{modality}"


def weight_key(group: str) -> str:
    """Metric key whose value weights ``group`` in aggregation."""
    kind, _, modality = group.partition("/")
    if kind == "encoder":
        return has_key(modality)
    if kind == "missing":
        return token_key(modality)
    if kind == "missing-input":
        return input_token_key(modality)
    if group == "dce_missing":
        return INCOMPLETE
    if group == "status_head":
        return STATUS
    return NUM_EXAMPLES


DROP_TOKEN_SHARE = 0.25  # drop pass (1 of 2) x P(a present modality is dropped) = 1/2
DROP_INCOMPLETE_SHARE = 0.5  # drop pass (1 of 2); every drop sets m(b) = 1


def training_counts(
    site: SiteData, rows: np.ndarray, specs: Sequence[ModalitySpec], *, random_drop: bool,
) -> dict[str, float]:
    """Aggregate counts of training rows ``rows`` for every key :func:`weight_key` can ask for.

    ``specs``: the model's modalities (the federation's union); ``random_drop``: the
    model's ``random_drop`` switch (drop-eligible patients, >= 2 modalities present,
    also train the missing tokens and t_miss, see the module docstring).
    """
    rows = np.asarray(rows, dtype=np.int64)
    names = tuple(s.name for s in specs)
    present = site.presence_matrix(names)[rows]  # [n, M]
    collected = np.array([n in site.spec.modality_names for n in names])
    droppable = present.sum(axis=1) >= 2 if random_drop else np.zeros(len(rows), dtype=bool)
    counts: dict[str, float] = {NUM_EXAMPLES: int(len(rows))}
    for j, name in enumerate(names):
        lacks = int((~present[:, j]).sum())
        stands_in = lacks + DROP_TOKEN_SHARE * int((present[:, j] & droppable).sum())
        counts[has_key(name)] = int(present[:, j].sum())
        counts[lacks_key(name)] = lacks
        counts[token_key(name)] = stands_in
        counts[input_token_key(name)] = stands_in if collected[j] else 0
    incomplete = ((~present) & collected[None, :]).any(axis=1)
    counts[INCOMPLETE] = int(incomplete.sum()) + DROP_INCOMPLETE_SHARE * int((~incomplete & droppable).sum())
    counts[STATUS] = int((site.status[rows] >= 0).sum())
    return counts
