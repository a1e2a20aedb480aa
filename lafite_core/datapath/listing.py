"""An image dump listed page by page, in URL order, without holding the whole listing.

``iter_listing`` walks a local folder, an ``s3://`` prefix or any other fsspec folder and yields pages
of :class:`ListedObject` (URL, size, listing signature). The walk is lazy: the first page is yielded
before the rest is listed. S3 pages are the service's own ``list_objects_v2`` pages; a local folder is
walked with ``os.scandir`` one directory at a time, so memory holds one page and the names of the
directories on the current path (a folder of a million files directly is a million names).

Every walk yields URLs in ascending code-point order (the order of ``sorted`` and of Arrow's string
sort), the same order ``list_images`` returns, so a listing can be joined with sorted score tables as
both stream by (``lafite_core.store.lookup``).

The listing signature is what the listing says about an object's version without reading it:
``"<size>:<ETag>"`` on S3, ``"<size>:<mtime_ns>"`` for a local file. Equal signatures mean the object
is unchanged (a rewrite with the same size and modification time is not seen: the same trade-off as
rsync's default check); ``None`` where the listing gives nothing usable (a broken link).
"""

from __future__ import annotations

import os
import posixpath
from typing import Iterator, NamedTuple, Sequence

import fsspec
from fsspec.core import url_to_fs

from lafite_core.datapath.images import IMAGE_EXTENSIONS
from lafite_core.store.storage import RetryPolicy, fs_protocol, safe_part

DEFAULT_PAGE_SIZE = 1000  # S3's largest list_objects_v2 page


class ListedObject(NamedTuple):
    """One image file of a listing."""

    url: str
    size: int | None
    signature: str | None  # "<size>:<ETag>" (S3), "<size>:<mtime_ns>" (local); None when unknown


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def iter_listing(source: str, storage_options: dict | None = None,
                 page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[list[ListedObject]]:
    """Pages of at most ``page_size`` image files (by extension) under ``source``, recursively, in URL order.

    Raises FileNotFoundError (at the first ``next``) when ``source`` is not a folder or prefix.
    """
    fs, path = url_to_fs(source, **(storage_options or {}))
    path = path.rstrip("/") or path
    if not fs.isdir(path):
        raise FileNotFoundError(f"image source {source!r} does not exist or is not a folder")
    yield from list_pages(fs, path, page_size)


def list_pages(fs: fsspec.AbstractFileSystem, path: str, page_size: int = DEFAULT_PAGE_SIZE
               ) -> Iterator[list[ListedObject]]:
    """``iter_listing`` on an open filesystem and a folder path in it (S3: a bucket/key prefix)."""
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, got {page_size}")
    protocol = fs_protocol(fs)
    if protocol == "file":
        objects = _walk_local(path)
    elif protocol in ("s3", "s3a") and hasattr(fs, "call_s3"):
        yield from _pages_s3(fs, path, page_size)
        return
    else:
        objects = _walk_fs(fs, path)
    page: list[ListedObject] = []
    for obj in objects:
        page.append(obj)
        if len(page) >= page_size:
            yield page
            page = []
    if page:
        yield page


def _sort_key(name: str, is_dir: bool) -> str:
    # a folder's files all start with "<name>/": sorting folders by that key gives whole-path order
    return name + "/" if is_dir else name


def _walk_local(root: str) -> Iterator[ListedObject]:
    """Files below ``root`` in path order; links are listed as files (not followed into folders), as
    ``fs.find`` does; ``outside_root`` refuses the ones that leave the folder when they are scored."""

    def entries(folder: str) -> Iterator[tuple[str, bool]]:
        try:
            with os.scandir(folder) as it:
                found = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return iter(())
        return iter(sorted(found, key=lambda e: _sort_key(*e)))

    stack = [(root, entries(root))]
    while stack:
        folder, it = stack[-1]
        for name, is_dir in it:
            path = posixpath.join(folder, name)
            if is_dir:
                stack.append((path, entries(path)))
                break
            if is_image_name(name):
                try:
                    st = os.stat(path)
                    yield ListedObject(path, st.st_size, f"{st.st_size}:{st.st_mtime_ns}")
                except OSError:  # a broken link or a file gone since: listed, read (and refused) later
                    yield ListedObject(path, None, None)
        else:
            stack.pop()


def _info_signature(info: dict) -> str | None:
    size = info.get("size")
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated"):
        if info.get(key) is not None and size is not None:
            return f"{size}:{info[key]}"
    return None


def _walk_fs(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[ListedObject]:
    """Any other fsspec filesystem, one ``ls`` per folder, in path order."""
    retry = RetryPolicy.from_env()

    def entries(folder: str) -> Iterator[tuple[str, bool, dict]]:
        try:
            infos = retry.call(fs.ls, folder, detail=True, what=f"listing {folder}")
        except FileNotFoundError:
            return iter(())
        found = [(posixpath.basename(i["name"].rstrip("/")), i["type"] == "directory", i) for i in infos]
        return iter(sorted(found, key=lambda e: _sort_key(e[0], e[1])))

    stack = [(root, entries(root))]
    while stack:
        folder, it = stack[-1]
        for name, is_dir, info in it:
            path = posixpath.join(folder, name)
            if is_dir:
                stack.append((path, entries(path)))
                break
            if is_image_name(name):
                yield ListedObject(fs.unstrip_protocol(path), info.get("size"), _info_signature(info))
        else:
            stack.pop()


def _pages_s3(fs, path: str, page_size: int) -> Iterator[list[ListedObject]]:
    """``list_objects_v2`` page by page (each request retried on transient errors), keys in order."""
    bucket, key, _ = fs.split_path(path)
    kwargs = {"Bucket": bucket, "Prefix": key.rstrip("/") + "/" if key else "", "MaxKeys": min(page_size, 1000)}
    retry = RetryPolicy.from_env()
    while True:
        out = retry.call(fs.call_s3, "list_objects_v2", what=f"listing s3://{bucket}/{kwargs['Prefix']}", **kwargs)
        page = [ListedObject(fs.unstrip_protocol(f"{bucket}/{c['Key']}"), int(c["Size"]),
                             f"{c['Size']}:{c.get('ETag')}" if c.get("ETag") else None)
                for c in out.get("Contents", []) if is_image_name(c["Key"])]
        if page:
            yield page
        if not out.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = out["NextContinuationToken"]


def relative_parts(url: str, source_root: str) -> list[str]:
    """Path components of ``url`` below ``source_root``; ValueError for a name that could escape."""
    root = source_root.rstrip("/") + "/"
    rel = url[len(root):] if url.startswith(root) else posixpath.basename(url)
    return [safe_part(p) for p in rel.split("/") if p]


def infer_category(parts: Sequence[str], categories: Sequence[str]) -> str | None:
    """The model category ("dataset/category") named by a folder on the image's path, if any."""
    names = {c.split("/", 1)[1]: c for c in categories}
    folders = list(parts[:-1])
    for a, b in zip(folders, folders[1:]):
        if f"{a}/{b}" in categories:
            return f"{a}/{b}"
    for p in folders:
        if p in names:
            return names[p]
    return None


def category_of(url: str, source_root: str, categories: Sequence[str]) -> str | None:
    """``infer_category`` of ``url`` below ``source_root``; None for a name ``relative_parts`` refuses."""
    try:
        return infer_category(relative_parts(url, source_root), categories)
    except ValueError:
        return None
