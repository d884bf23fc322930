"""Modality specs <-> JSON, so the server can send the federation's model definition.

The federation's model is built from the union of the sites' modality specs; the
server collects each site's declaration (no patient data) and sends the union to
every client with each message, so all clients build the identical network.
"""

from __future__ import annotations

import json
from typing import Sequence

from sites.types import ALL_KINDS, ModalitySpec


def specs_to_json(specs: Sequence[ModalitySpec]) -> str:
    return json.dumps(
        [
            {"name": s.name, "kind": s.kind, "dim": int(s.dim), "columns": list(s.columns),
             "description": s.description}
            for s in specs
        ],
        sort_keys=True,
    )


def specs_from_json(text: str) -> tuple[ModalitySpec, ...]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"model spec is not valid JSON: {exc}") from exc
    out = []
    for i, d in enumerate(raw):
        if d.get("kind") not in ALL_KINDS:
            raise ValueError(f"model spec entry {i}: unknown kind {d.get('kind')!r}")
        out.append(
            ModalitySpec(
                name=str(d["name"]), kind=d["kind"], dim=int(d["dim"]),
                columns=tuple(d.get("columns", ())), description=str(d.get("description", "")),
            )
        )
    return tuple(out)
