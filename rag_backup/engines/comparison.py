"""What a restore compared with its backup, field by field, and what it found.

Every restore that claims its target "matches" says what it compared (``compared``: aspect ->
how many items), what it could not compare and why (``not_run``), and every difference it found,
each naming the item and the property. A restore matches only when every aspect it was meant to
compare ran and nothing differs: a comparison that did not run is never reported as passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_LISTED = 50


@dataclass(frozen=True)
class Difference:
    """One property of one item that differs between the backup and the restored store."""

    item: str  # which object: "table public.documents", "object documents/a.pdf"
    property: str  # which property of it: "rows", "tag project", "setting search_path"
    expected: Any  # what the backup holds (None: absent)
    actual: Any  # what the restored store has (None: absent)

    def __str__(self) -> str:
        return f"{self.item}: {self.property} is {self.actual!r}, the backup has {self.expected!r}"

    def to_dict(self) -> dict[str, Any]:
        return {"item": self.item, "property": self.property, "expected": self.expected,
                "actual": self.actual}


@dataclass
class Comparison:
    """The outcome of comparing a restored target with its backup."""

    compared: dict[str, int] = field(default_factory=dict)
    not_run: dict[str, str] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return not self.differences and not self.not_run

    def count(self, aspect: str, n: int = 1) -> None:
        """``n`` more items of ``aspect`` were compared."""
        self.compared[aspect] = self.compared.get(aspect, 0) + n

    def skip(self, aspect: str, why: str) -> None:
        """``aspect`` could not be compared, for the reason ``why``."""
        self.not_run[aspect] = why

    def differ(self, item: str, prop: str, expected: Any, actual: Any) -> None:
        self.differences.append(Difference(item, prop, expected, actual))

    def check(self, aspect: str, item: str, prop: str, expected: Any, actual: Any) -> bool:
        """Count one comparison of ``aspect``; record a difference when the values differ."""
        self.count(aspect)
        if expected != actual:
            self.differ(item, prop, expected, actual)
            return False
        return True

    def merge(self, other: Comparison, prefix: str = "") -> Comparison:
        """Fold ``other`` in (items prefixed with ``prefix``, e.g. a database or bucket name)."""
        for aspect, n in other.compared.items():
            self.count(aspect, n)
        for aspect, why in other.not_run.items():
            self.not_run[f"{prefix}{aspect}"] = why
        self.differences.extend(Difference(f"{prefix}{d.item}", d.property, d.expected,
                                           d.actual) for d in other.differences)
        return self

    def summary(self, limit: int = 10) -> str:
        """One line for an error message or a log: the differences and what did not run."""
        parts = [str(d) for d in self.differences[:limit]]
        if len(self.differences) > limit:
            parts.append(f"... {len(self.differences) - limit} more")
        parts += [f"{aspect} not compared: {why}" for aspect, why in self.not_run.items()]
        return "; ".join(parts) if parts else "no differences"

    def to_dict(self) -> dict[str, Any]:
        return {"matches": self.matches, "compared": dict(self.compared),
                "not_run": dict(self.not_run),
                "differences": [d.to_dict() for d in self.differences[:MAX_LISTED]],
                "differences_total": len(self.differences)}
