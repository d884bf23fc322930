"""Problems found in a site folder, and the error that lists them all.

The validator never stops at the first problem: it collects every
:class:`Problem` (file, patient or line, what is wrong) so that a hospital fixes
its folder in one pass. :class:`SiteValidationError` carries them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


def repeated(items: Sequence[str]) -> list[str]:
    """The items listed more than once, each once, sorted (e.g. ``['x0']`` for x0, x1, x0)."""
    return sorted({x for x in items if items.count(x) > 1})


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a site folder.

    ``file`` is relative to the site folder (``"."`` for the folder itself);
    ``patient`` the patient id concerned, if any; ``line`` the 1-based line of a
    CSV file (the header is line 1), if any; ``message`` what is wrong and,
    where useful, how to fix it.
    """

    file: str
    message: str
    patient: str | None = None
    line: int | None = None

    @property
    def row(self) -> int | None:
        """Alias of :attr:`line` (the CSV line, header = 1)."""
        return self.line

    def __str__(self) -> str:
        where = [self.file]
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.patient is not None:
            where.append(f"patient {self.patient}")
        return f"{', '.join(where)}: {self.message}"


class SiteValidationError(ValueError):
    """A site folder (or several) failed validation; ``problems`` lists everything found."""

    def __init__(self, root: Path | str, problems: Sequence[Problem]) -> None:
        self.root = Path(root)
        self.problems = list(problems)
        n = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"site folder {self.root} is not valid ({n} problem{'s' if n != 1 else ''}):\n{lines}"
        )

    def __reduce__(self):  # picklable (errors may cross process boundaries in simulations)
        return (self.__class__, (self.root, self.problems))


class SitesValidationError(SiteValidationError):
    """Several site folders failed validation (raised by ``load_sites``)."""

    def __init__(self, errors: Sequence[SiteValidationError]) -> None:
        self.errors = list(errors)
        self.problems = [p for e in self.errors for p in e.problems]
        self.root = self.errors[0].root if self.errors else Path(".")
        ValueError.__init__(self, "\n".join(str(e) for e in self.errors))

    def __reduce__(self):
        return (self.__class__, (self.errors,))
