"""Already-scored rows looked up in URL order, a page of the listing at a time.

A dump's listing streams by in ascending URL order (``lafite_core.datapath.listing``), and every
merged score table is written sorted by URL in row groups of ``SCORES_ROW_GROUP`` rows. The lookup
walks each table alongside the listing, reading a row group only when the listing reaches its URLs:
all tables are read once per run, and memory holds one row group per table, however long the listing
or the history. A table whose row groups are not in URL order by their statistics (older writers, or
statistics missing) and the parts of unmerged runs (crashed or concurrent ones, one shard each) are
read whole and sorted in memory instead.

Only rows of one method without error count: an image that failed is tried again.
"""

from __future__ import annotations

import bisect
from contextlib import ExitStack
from typing import Iterable, Iterator, NamedTuple, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lafite_core.store.storage import Store

_COLUMNS = ("image_url", "content_hash", "listing_signature", "method", "error")
_SCORED = pa.schema([("image_url", pa.string()), ("content_hash", pa.string()), ("listing_signature", pa.string())])


class Known(NamedTuple):
    """One row scored without error: the content hash, and the listing signature when recorded."""

    content_hash: str | None
    listing_signature: str | None


class _Block(NamedTuple):
    urls: pa.Array  # sorted ascending
    hashes: pa.Array
    signatures: pa.Array


class _Urls(Sequence[str]):
    """An Arrow string array seen as a Python sequence, for ``bisect`` (O(log n) element reads)."""

    def __init__(self, arr: pa.Array) -> None:
        self.arr = arr

    def __len__(self) -> int:
        return len(self.arr)

    def __getitem__(self, i):  # type: ignore[override]
        return self.arr[i].as_py()


def _scored(table: pa.Table, method: str) -> pa.Table:
    """(image_url, content_hash, listing_signature) of the rows of ``method`` without error, sorted by
    URL; a ``listing_signature`` column missing from an older table is null."""
    if "listing_signature" not in table.column_names:
        table = table.append_column("listing_signature", pa.nulls(table.num_rows, pa.string()))
    keep = pc.fill_null(pc.and_(pc.equal(table["method"], method), pc.is_null(table["error"])), False)
    return (table.filter(keep).select(["image_url", "content_hash", "listing_signature"])
            .cast(_SCORED).sort_by([("image_url", "ascending")]))


def _block(table: pa.Table) -> _Block:
    """A sorted ``_scored`` table as one block of contiguous arrays."""
    return _Block(*(pa.concat_arrays(table[c].chunks) if table[c].num_chunks else pa.array([], pa.string())
                    for c in table.column_names))


def _ordered_groups(pf: pq.ParquetFile) -> bool:
    """True when the statistics show the file's row groups in ascending, non-overlapping URL order."""
    col = pf.schema_arrow.get_field_index("image_url")
    meta = pf.metadata
    previous_max = None
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(col).statistics
        if meta.row_group(i).num_rows == 0:
            continue
        if stats is None or not stats.has_min_max:
            return False
        if previous_max is not None and stats.min < previous_max:
            return False
        previous_max = stats.max
    return True


class _Stream:
    """Sorted blocks of rows consumed in URL order."""

    def __init__(self, blocks: Iterator[_Block]) -> None:
        self.blocks = blocks
        self.block: _Block | None = None
        self.pos = 0

    def take_through(self, last: str) -> Iterator[tuple[str, str | None, str | None]]:
        """(url, hash, signature) of every row with url <= ``last`` not yet taken, in order."""
        while True:
            if self.block is None or self.pos >= len(self.block.urls):
                self.block = next(self.blocks, None)
                self.pos = 0
                if self.block is None:
                    return
                continue
            end = bisect.bisect_right(_Urls(self.block.urls), last, lo=self.pos)
            if end > self.pos:
                b = self.block
                yield from zip(b.urls[self.pos:end].to_pylist(), b.hashes[self.pos:end].to_pylist(),
                               b.signatures[self.pos:end].to_pylist())
            self.pos = end
            if end < len(self.block.urls):
                return  # the block goes on past ``last``


class ScoredLookup:
    """Rows a method scored without error, for URLs asked in ascending order (see the module docstring).

    Use as a context manager (it holds the merged tables open); ``take`` pages of the listing in order.
    """

    def __init__(self, store: Store, merged: Sequence[Sequence[str]], unmerged: Sequence[Sequence[str]],
                 method: str) -> None:
        self.store, self.method = store, method
        self._merged, self._unmerged = [list(p) for p in merged], [list(p) for p in unmerged]
        self._stack = ExitStack()
        self._streams: list[_Stream] = []
        self._last: str | None = None

    def __enter__(self) -> "ScoredLookup":
        for parts in self._merged:
            pf = self._stack.enter_context(self.store.open_parquet(*parts))
            if _ordered_groups(pf):
                self._streams.append(_Stream(self._groups(pf, parts)))
            else:  # not known to be sorted: read whole, sort in memory
                self._streams.append(_Stream(iter([_block(_scored(self._read(pf, parts), self.method))])))
        if self._unmerged:  # one shard each, of crashed or concurrent runs: read whole, sorted together
            tables = [self.store.read_table(*p) for p in self._unmerged]
            scored = pa.concat_tables([_scored(t, self.method) for t in tables])
            self._streams.append(_Stream(iter([_block(scored.sort_by([("image_url", "ascending")]))])))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _read(self, pf: pq.ParquetFile, parts: Sequence[str], group: int | None = None) -> pa.Table:
        cols = [c for c in _COLUMNS if c in pf.schema_arrow.names]
        what = f"reading {self.store.url(*parts)}"
        if group is None:
            return self.store.retry.call(pf.read, columns=cols, what=what)
        return self.store.retry.call(pf.read_row_group, group, columns=cols, what=what)

    def _groups(self, pf: pq.ParquetFile, parts: Sequence[str]) -> Iterator[_Block]:
        for i in range(pf.metadata.num_row_groups):
            yield _block(_scored(self._read(pf, parts, i), self.method))

    def take(self, urls: Iterable[str]) -> dict[str, list[Known]]:
        """The scored rows of ``urls`` (ascending, each call after the previous one's last URL): url ->
        its rows, absent when it has none. Rows of URLs before ``urls`` and not asked for are passed over.
        """
        urls = list(urls)
        if not urls:
            return {}
        if any(a > b for a, b in zip(urls, urls[1:])) or (self._last is not None and urls[0] <= self._last):
            raise ValueError("ScoredLookup.take needs URLs in ascending order across calls (the listing's order)")
        self._last = urls[-1]
        wanted = set(urls)
        out: dict[str, list[Known]] = {}
        for stream in self._streams:
            for url, digest, signature in stream.take_through(urls[-1]):
                if url in wanted:
                    out.setdefault(url, []).append(Known(digest, signature))
        return out
