"""Modality-aware weighted averaging, group by group (DESIGN §7).

Every array of the model belongs to one parameter group; each group has its own
weight per client (a patient count, see ``shared_model.groups``). The aggregate of
a group is the weighted mean of the clients' arrays with those weights; a group
that no client informed (total weight 0) keeps its current value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from shared_model.groups import weight_key


@dataclass
class ClientUpdate:
    """One client's trained arrays and the counts that weight them."""

    site: str
    arrays: Mapping[str, np.ndarray]
    counts: Mapping[str, float]


@dataclass
class AggregationResult:
    arrays: dict[str, np.ndarray]
    group_weights: dict[str, dict[str, float]]  # group -> site -> weight
    informed: set[str]  # groups with total weight > 0


def aggregate_groups(
    current: Mapping[str, np.ndarray],
    groups: Mapping[str, Sequence[str]],
    updates: Sequence[ClientUpdate],
) -> AggregationResult:
    """Per-group weighted mean of ``updates`` (sorted by site for a deterministic sum order).

    ``current`` is the global state sent this round; ``groups`` maps group name ->
    array keys and must cover every key of ``current`` exactly once.
    """
    covered = [k for keys in groups.values() for k in keys]
    if sorted(covered) != sorted(current):
        missing = sorted(set(current) - set(covered))
        extra = sorted(set(covered) - set(current))
        raise ValueError(
            f"parameter groups do not cover the model state exactly once "
            f"(uncovered: {missing[:5]}, unknown: {extra[:5]})"
        )
    updates = sorted(updates, key=lambda u: u.site)
    for u in updates:
        bad = sorted(set(current) ^ set(u.arrays))
        if bad:
            raise ValueError(f"site {u.site!r} sent arrays that do not match the model: {bad[:5]}")
        for k, v in u.arrays.items():
            if v.shape != current[k].shape:
                raise ValueError(
                    f"site {u.site!r}: array {k!r} has shape {v.shape}, model has {current[k].shape}"
                )
            if not np.all(np.isfinite(v)):
                raise ValueError(f"site {u.site!r}: array {k!r} contains NaN or Inf")

    out: dict[str, np.ndarray] = {}
    weights: dict[str, dict[str, float]] = {}
    informed: set[str] = set()
    for group, keys in groups.items():
        wkey = weight_key(group)
        w = []
        for u in updates:
            if wkey not in u.counts:
                raise ValueError(f"site {u.site!r} did not report the count {wkey!r} for group {group!r}")
            wi = float(u.counts[wkey])
            if not (np.isfinite(wi) and wi >= 0):  # a NaN count made the group NaN; a negative one
                raise ValueError(                   # inflated the other sites' weights
                    f"site {u.site!r}: count {wkey!r} for group {group!r} is {wi!r}; counts are patients (>= 0)")
            w.append(wi)
        weights[group] = {u.site: wi for u, wi in zip(updates, w)}
        total = sum(w)
        if total <= 0:
            for k in keys:
                out[k] = np.array(current[k], copy=True)
            continue
        informed.add(group)
        for k in keys:
            acc = np.zeros(current[k].shape, dtype=np.float64)
            for u, wi in zip(updates, w):
                if wi > 0:
                    acc += (wi / total) * np.asarray(u.arrays[k], dtype=np.float64)
            if np.issubdtype(current[k].dtype, np.integer):  # a counter: round, do not truncate
                acc = np.rint(acc)
            out[k] = np.asarray(acc, dtype=current[k].dtype)
    return AggregationResult(out, weights, informed)
