"""What a batch-scoring run did, in numbers: totals, and counts per category from its score rows.

Kept apart from the report (no matplotlib) so that scoring workers can count what they score.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields
from typing import Iterable

NO_CATEGORY = "(no category folder)"


@dataclass(frozen=True)
class BatchCounts:
    """What one batch-scoring run did: images listed under the source, scored, skipped as already
    scored with this model version, and failed."""

    model_version: str
    listed: int
    scored: int
    skipped: int
    errors: int


@dataclass(frozen=True)
class CategoryCounts:
    """One category's part of a batch run: images scored (of them judged anomalous and normal where
    calibrated), skipped as already scored, and failed. ``category`` is NO_CATEGORY for images outside
    any category folder, and for errors (their rows carry no category)."""

    category: str
    scored: int = 0
    anomalous: int = 0
    normal: int = 0
    skipped: int = 0
    errors: int = 0


COUNT_FIELDS = tuple(f.name for f in fields(CategoryCounts) if f.name != "category")


def count_by_category(rows: Iterable[dict], skipped: Iterable[str | None] = ()) -> list[CategoryCounts]:
    """Counts per category of SCORES_SCHEMA ``rows`` and of the categories of the images ``skipped``, sorted."""
    tally: dict[str, Counter] = {}

    def bump(category: str | None, *names: str) -> None:
        tally.setdefault(category or NO_CATEGORY, Counter()).update(names)

    for r in rows:
        if r["error"] is not None:
            bump(r["category"], "errors")
        elif r["decision"] in ("anomalous", "normal"):
            bump(r["category"], "scored", r["decision"])
        else:
            bump(r["category"], "scored")
    for category in skipped:
        bump(category, "skipped")
    return [CategoryCounts(c, **t) for c, t in sorted(tally.items())]


def add_counts(groups: Iterable[Iterable[CategoryCounts]]) -> list[CategoryCounts]:
    """The sum per category of several shards' counts, sorted by category."""
    tally: dict[str, Counter] = {}
    for group in groups:
        for c in group:
            tally.setdefault(c.category, Counter()).update({n: getattr(c, n) for n in COUNT_FIELDS})
    return [CategoryCounts(c, **t) for c, t in sorted(tally.items())]
