"""Hospital sites: the on-disk site format, its loader/validator, the built-in cohorts.

Format: ``sites/FORMAT.md``. Public API::

    load_site(path) -> SiteData            # validates; raises SiteValidationError
    validate_site(path) -> list[Problem]   # every problem, nothing raised, nothing written
    load_sites(root, names) -> list[SiteData]
    union_specs(specs) -> tuple[ModalitySpec, ...]

Built-in cohorts: :mod:`sites.builtin`; generator of the simulated embeddings:
:mod:`sites.simulate`; missing-modality protocols: :mod:`sites.missingness`;
tiny sites for tests: :mod:`sites.synthetic`.
"""

from sites.loader import load_site, load_sites, read_site, union_specs, validate_site
from sites.problems import Problem, SitesValidationError, SiteValidationError
from sites.types import ModalityData, ModalitySpec, SiteData, SiteSpec, Split

__all__ = [
    "load_site",
    "load_sites",
    "read_site",
    "union_specs",
    "validate_site",
    "Problem",
    "SiteValidationError",
    "SitesValidationError",
    "ModalityData",
    "ModalitySpec",
    "SiteData",
    "SiteSpec",
    "Split",
]
