"""A streamed listing cut into batch-scoring shards, and the manifest each shard reads.

``plan_shards`` walks the listing's pages (URL order) beside the rows already scored
(``ScoredLookup``, the same order). An image whose listing signature equals that of a row scored
without error is skipped there, without being read. Every other image goes into the next shard with
the content hashes already scored for its URL: the shard reads it, and skips it after all when its
hash is among them (a file touched but unchanged, or a row from before signatures were recorded);
else scores it. A shard is ``shard_size`` images to read, so a dump that is mostly scored becomes a
few full shards, not many nearly empty ones.

Only the current page and the shard being filled are held: the caller writes each shard's manifest
(``ShardManifest.to_bytes``) and hands a worker only its number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from lafite_core.datapath.data import outside_root
from lafite_core.datapath.listing import ListedObject
from lafite_core.store.lookup import ScoredLookup


@dataclass(frozen=True)
class ShardItem:
    """One image a shard reads: its URL, its listing signature (recorded with its row) and the content
    hashes already scored for that URL (the image is skipped when its bytes hash to one of them)."""

    url: str
    signature: str | None
    known: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShardManifest:
    """What one shard of a run reads; stored as JSON beside the run's parts."""

    run_id: str
    shard: int
    source_root: str
    items: tuple[ShardItem, ...]

    def to_bytes(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "shard": self.shard, "source_root": self.source_root,
                           "items": [[i.url, i.signature, list(i.known)] for i in self.items]}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ShardManifest":
        obj = json.loads(data)
        return cls(obj["run_id"], int(obj["shard"]), obj["source_root"],
                   tuple(ShardItem(u, s, tuple(k)) for u, s, k in obj["items"]))


@dataclass(frozen=True)
class Planned:
    """A step of the plan: images skipped unread since the last step, and a full (or the last) shard's
    items to read, empty when the step only skipped."""

    listed: int  # images listed since the last step
    skipped: tuple[str, ...]  # URLs whose listing signature matches a scored row: not read
    items: tuple[ShardItem, ...]


def plan_shards(pages: Iterable[Sequence[ListedObject]], lookup: ScoredLookup, shard_size: int,
                source_root: str) -> Iterator[Planned]:
    """Walk ``pages`` (URL order) and yield what to skip and what each shard reads (module docstring).

    A local file whose link leads outside ``source_root`` is never skipped: its shard refuses it.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    local = "://" not in source_root or source_root.startswith("file://")
    shard: list[ShardItem] = []
    for page in pages:
        known = lookup.take(o.url for o in page)
        listed, skipped = len(page), []
        for obj in page:
            rows = known.get(obj.url, ())
            if (obj.signature is not None and any(r.listing_signature == obj.signature for r in rows)
                    and not (local and outside_root(obj.url, source_root))):
                skipped.append(obj.url)
                continue
            hashes = tuple(sorted({r.content_hash for r in rows if r.content_hash}))
            shard.append(ShardItem(obj.url, obj.signature, hashes))
            if len(shard) >= shard_size:
                yield Planned(listed, tuple(skipped), tuple(shard))
                listed, skipped, shard = 0, [], []
        if listed or skipped:
            yield Planned(listed, tuple(skipped), ())
    if shard:
        yield Planned(0, (), tuple(shard))
