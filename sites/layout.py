"""``site.yaml``: parsing it into a :class:`~sites.types.SiteSpec` plus file locations.

The format is documented for hospitals in ``sites/FORMAT.md``. In short::

    format_version: 1
    name: my-hospital              # lower-case letters, digits, '-' or '_'
    cohort: CPTAC-PDA
    time_unit: days                # the only unit accepted
    tasks: [survival, status]      # survival = time + event (required); status = binary label
    patients: patients.csv         # optional (this is the default)
    oracle_risk: oracle_risk.csv   # optional; simulated sites only, never a model input
    simulated: false
    modalities:
      - {name: radiology, kind: sequence, dim: 1024}               # folder radiology/<id>.npy
      - {name: pathology, kind: vector, dim: 768}                  # archive pathology.npz
      - {name: clinical, kind: tabular, columns: [age, sex]}       # table clinical.csv

Parsing never raises on bad content: it returns the problems it found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from sites.problems import Problem, repeated
from sites.types import ALL_KINDS, TOKEN_KINDS, ModalitySpec, SiteSpec

FORMAT_VERSION = 1
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SITE_YAML = "site.yaml"
DEFAULT_PATIENTS = "patients.csv"

#: Patient ids double as file names (``<id>.npy``), so they are restricted.
PATIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SITE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
MODALITY_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
TASKS = ("survival", "status")

_TOP_KEYS = {
    "format_version", "name", "cohort", "description", "source", "simulated", "time_unit",
    "tasks", "patients", "oracle_risk", "modalities", "provenance",
}
_MOD_KEYS = {"name", "kind", "dim", "columns", "path", "description"}


@dataclass(frozen=True)
class SiteLayout:
    """A parsed ``site.yaml``: the spec and where each file lives (relative paths)."""

    spec: SiteSpec
    patients: str
    oracle_risk: str | None
    modality_paths: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)


def default_modality_path(name: str, kind: str) -> str:
    """Where a modality lives when ``path`` is not given in ``site.yaml``."""
    if kind == "tabular":
        return f"{name}.csv"
    if kind == "vector":
        return f"{name}.npz"
    return f"{name}/"


def is_archive(path: str) -> bool:
    """Token modalities stored in one ``.npz`` keyed by patient id (else: a folder of ``.npy``)."""
    return path.lower().endswith(".npz")


def _safe_relpath(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    p = PurePosixPath(value.strip())
    if p.is_absolute() or ".." in p.parts or str(p) in ("", "."):
        return None
    return value.strip()


def parse_site_yaml(root: Path) -> tuple[SiteLayout | None, list[Problem]]:
    """Read ``root/site.yaml``; return the layout (None if unusable) and every problem found."""
    problems: list[Problem] = []

    def bad(msg: str) -> None:
        problems.append(Problem(SITE_YAML, msg))

    path = root / SITE_YAML
    if not path.is_file():
        return None, [Problem(SITE_YAML, f"missing: every site folder needs a {SITE_YAML} "
                                         "(see sites/FORMAT.md)")]
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(SITE_YAML, f"unreadable: {exc}")]
    except yaml.YAMLError as exc:
        return None, [Problem(SITE_YAML, f"not valid YAML: {exc}".replace("\n", " "))]
    if not isinstance(doc, dict):
        return None, [Problem(SITE_YAML, "must be a YAML mapping (key: value lines)")]

    for key in sorted(set(doc) - _TOP_KEYS, key=str):
        bad(f"unknown key {key!r} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    version = doc.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        bad(f"format_version {version!r} is not supported (this loader reads version {FORMAT_VERSION})")

    name = doc.get("name")
    if not isinstance(name, str) or not SITE_NAME_RE.match(name):
        bad(f"name {name!r} must be lower-case letters, digits, '-' or '_' (e.g. 'my-hospital')")
        name = str(name) if name is not None else root.name
    cohort = doc.get("cohort")
    if not isinstance(cohort, str) or not cohort.strip():
        bad("cohort is required (free text, e.g. 'CPTAC-PDA')")
        cohort = ""
    time_unit = doc.get("time_unit")
    if time_unit != "days":
        bad(f"time_unit is {time_unit!r}; it must be 'days' (convert months with x 30.4375)")

    tasks_raw = doc.get("tasks")
    tasks: tuple[str, ...] = ()
    if not isinstance(tasks_raw, list) or not all(isinstance(t, str) for t in tasks_raw):
        bad("tasks must be a list, e.g. [survival] or [survival, status]")
    else:
        for t in tasks_raw:
            if t not in TASKS:
                bad(f"unknown task {t!r} (allowed: {', '.join(TASKS)})")
        if len(set(tasks_raw)) != len(tasks_raw):
            bad("tasks lists a task twice")
        tasks = tuple(t for t in TASKS if t in tasks_raw)
        if "survival" not in tasks:
            bad("tasks must include 'survival' (columns time and event of patients.csv)")

    simulated = doc.get("simulated", False)
    if not isinstance(simulated, bool):
        bad(f"simulated must be true or false, not {simulated!r}")
        simulated = bool(simulated)
    description = doc.get("description", "") or ""
    source = doc.get("source", "") or ""
    if not isinstance(description, str):
        bad("description must be text")
        description = str(description)
    if not isinstance(source, str):
        bad("source must be text")
        source = str(source)

    patients = _safe_relpath(doc.get("patients", DEFAULT_PATIENTS))
    if patients is None:
        bad(f"patients {doc.get('patients')!r} must be a relative path inside the site folder")
        patients = DEFAULT_PATIENTS
    oracle = None
    if doc.get("oracle_risk") is not None:
        oracle = _safe_relpath(doc.get("oracle_risk"))
        if oracle is None:
            bad(f"oracle_risk {doc.get('oracle_risk')!r} must be a relative path inside the site folder")
    provenance = doc.get("provenance") or {}
    if not isinstance(provenance, dict):
        bad("provenance must be a mapping")
        provenance = {}

    specs, paths = _parse_modalities(doc.get("modalities"), bad)
    taken = {patients.rstrip("/"): "patients"}
    if oracle:
        taken.setdefault(oracle.rstrip("/"), "oracle_risk")
    for mname, mpath in paths.items():
        key = mpath.rstrip("/")
        if key in taken:
            bad(f"modality {mname!r} uses path {mpath!r}, already used by {taken[key]}")
        taken.setdefault(key, f"modality {mname!r}")

    spec = SiteSpec(
        name=name,
        cohort=cohort,
        time_unit="days",
        tasks=tasks,
        modalities=tuple(specs),
        simulated=simulated,
        description=description.strip(),
        source=source.strip(),
    )
    return SiteLayout(spec, patients, oracle, paths, provenance), problems


def _parse_modalities(raw: Any, bad) -> tuple[list[ModalitySpec], dict[str, str]]:
    specs: list[ModalitySpec] = []
    paths: dict[str, str] = {}
    if not isinstance(raw, list) or not raw:
        bad("modalities must be a non-empty list (one entry per modality: name, kind, dim)")
        return specs, paths
    for i, entry in enumerate(raw):
        where = f"modalities[{i}]"
        if not isinstance(entry, dict):
            bad(f"{where} must be a mapping with name, kind and dim")
            continue
        for key in sorted(set(entry) - _MOD_KEYS, key=str):
            bad(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(_MOD_KEYS))})")
        name = entry.get("name")
        if not isinstance(name, str) or not MODALITY_NAME_RE.match(name):
            bad(f"{where}: name {name!r} must start with a lower-case letter and use "
                "only lower-case letters, digits and '_'")
            continue
        where = f"modality {name!r}"
        if name in paths:
            bad(f"{where} is declared twice")
            continue
        kind = entry.get("kind")
        if kind not in ALL_KINDS:
            bad(f"{where}: kind {kind!r} must be one of {', '.join(ALL_KINDS)}")
            continue
        columns: tuple[str, ...] = ()
        dim = entry.get("dim")
        if kind == "tabular":
            cols = entry.get("columns")
            if not isinstance(cols, list) or not cols or not all(
                isinstance(c, str) and c.strip() for c in cols
            ):
                bad(f"{where}: a tabular modality needs 'columns', a non-empty list of column names")
                continue
            if len(set(cols)) != len(cols):
                bad(f"{where}: columns listed twice: {repeated(cols)}")
                continue
            if "patient_id" in cols:
                bad(f"{where}: 'patient_id' is the key column, not a feature column")
                continue
            columns = tuple(cols)
            if dim is None:
                dim = len(columns)
            elif dim != len(columns):
                bad(f"{where}: dim {dim!r} does not match its {len(columns)} columns")
                continue
        else:
            if entry.get("columns") is not None:
                bad(f"{where}: 'columns' is only for tabular modalities")
            if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
                bad(f"{where}: dim {dim!r} must be a positive integer (embedding size)")
                continue
        path = entry.get("path", default_modality_path(name, kind))
        safe = _safe_relpath(path)
        if safe is None:
            bad(f"{where}: path {path!r} must be a relative path inside the site folder")
            continue
        if kind == "tabular" and not safe.lower().endswith(".csv"):
            bad(f"{where}: a tabular modality is a .csv file, not {safe!r}")
            continue
        if kind in TOKEN_KINDS and safe.lower().endswith(".csv"):
            bad(f"{where}: a {kind} modality is a folder of <patient_id>.npy or one .npz, not a .csv")
            continue
        desc = entry.get("description", "") or ""
        specs.append(ModalitySpec(name, kind, int(dim), columns, str(desc).strip()))
        paths[name] = safe
    return specs, paths


def site_yaml_document(layout: SiteLayout) -> dict[str, Any]:
    """The mapping written to ``site.yaml`` for ``layout`` (inverse of :func:`parse_site_yaml`)."""
    spec = layout.spec
    doc: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": spec.name,
        "cohort": spec.cohort,
        "description": spec.description,
        "source": spec.source,
        "simulated": spec.simulated,
        "time_unit": "days",
        "tasks": list(spec.tasks),
        "patients": layout.patients,
    }
    if layout.oracle_risk:
        doc["oracle_risk"] = layout.oracle_risk
    mods = []
    for m in spec.modalities:
        entry: dict[str, Any] = {"name": m.name, "kind": m.kind, "dim": m.dim}
        entry["path"] = layout.modality_paths.get(m.name, default_modality_path(m.name, m.kind))
        if m.description:
            entry["description"] = m.description
        if m.kind == "tabular":
            entry["columns"] = list(m.columns)
        mods.append(entry)
    doc["modalities"] = mods
    if layout.provenance:
        doc["provenance"] = layout.provenance
    return doc
