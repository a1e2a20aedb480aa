"""The artefact store: one root URL (local folder or ``s3://bucket/prefix``) for everything.

Where each artefact lives under the root is :mod:`lafite_core.store.layout`'s business. Every file is
written whole or not at all (temporary file and rename locally, a single PUT on object storage),
and every path component is checked so that names from data (categories, image keys) cannot lead
outside the root.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from lafite_core.store import layout
from lafite_core.store.layout import MANIFEST
from lafite_core.store.tables import parquet_bytes

log = logging.getLogger(__name__)

_BAD_PART = re.compile(r"[\x00-\x1f\x7f/\\]")


class StoreError(RuntimeError):
    """The store could not be read or written; the message says what and where."""


class IntegrityError(StoreError):
    """A model version is incomplete or its files do not match their recorded checksums."""


def safe_part(part: str) -> str:
    """A single path component that cannot climb out of its folder; raises ValueError otherwise."""
    if not isinstance(part, str) or part in ("", ".", "..") or _BAD_PART.search(part) or part.strip() != part:
        raise ValueError(f"unsafe name for a store path component: {part!r}")
    return part


def content_hash(data: bytes) -> str:
    """sha256 of a file's bytes, hex (identifies an image independently of its path; checks model files)."""
    return hashlib.sha256(data).hexdigest()


def fs_protocol(fs: fsspec.AbstractFileSystem) -> str:
    """The filesystem's protocol name ("file", "s3", ...), the first when it has several."""
    p = fs.protocol
    return p[0] if isinstance(p, (tuple, list)) else p


def storage_options_from_env(url: str) -> dict[str, Any]:
    """fsspec options for ``url`` from the environment (credentials never come from code).

    For s3:// URLs: ``AWS_ENDPOINT_URL`` / ``LAFITE_S3_ENDPOINT`` sets the endpoint; keys come from
    the standard AWS variables, read by botocore itself.
    """
    if not url.startswith(("s3://", "s3a://")):
        return {}
    endpoint = os.environ.get("LAFITE_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    opts: dict[str, Any] = {}
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


@dataclass(frozen=True)
class ModelVersion:
    version: str
    created: str
    config_hash: str


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: connection problems, timeouts, throttling and 5xx answers."""
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
                        IntegrityError, ValueError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    module = type(exc).__module__
    if module.startswith(("botocore", "aiohttp", "aiobotocore", "urllib3", "fsspec")):
        return True
    if isinstance(exc, OSError):
        # s3fs maps service errors to OSError with an errno; EINVAL / EACCES are not transient
        return exc.errno not in (errno.EINVAL, errno.EACCES, errno.EPERM, errno.ENOENT)
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``attempts`` tries, waiting base, 2 base, 4 base ... between them."""

    attempts: int = 5
    base_delay: float = 0.5

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        return cls(int(os.environ.get("LAFITE_STORE_RETRIES", 5)), float(os.environ.get("LAFITE_STORE_RETRY_DELAY", 0.5)))

    def call(self, fn, *args, what: str = "storage call", **kwargs):
        """``fn(*args, **kwargs)``, retrying transient errors; then StoreError naming ``what``."""
        for i in range(self.attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - filtered by is_transient
                if not is_transient(exc):
                    raise
                if i == self.attempts - 1:
                    raise StoreError(f"{what} failed after {self.attempts} attempts: {type(exc).__name__}: {exc}") from exc
                delay = self.base_delay * 2**i
                log.warning("%s failed (%s: %s); retry %d/%d in %.2g s", what, type(exc).__name__, exc, i + 1,
                            self.attempts - 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


class Store:
    """Artefact store rooted at a local path or fsspec URL; transient errors are retried with backoff."""

    def __init__(self, root: str, storage_options: dict | None = None, retry: RetryPolicy | None = None) -> None:
        self.root_url = root.rstrip("/") or root
        self.storage_options = storage_options if storage_options is not None else storage_options_from_env(root)
        try:
            self.fs, self.root = url_to_fs(self.root_url, **self.storage_options)
        except Exception as exc:
            raise StoreError(f"cannot open store {root!r}: {exc}") from exc
        self.root = self.root.rstrip("/")
        self.retry = retry or RetryPolicy.from_env()
        self.local = fs_protocol(self.fs) == "file"
        if self.local:
            os.makedirs(self.root, exist_ok=True)

    # ------------------------------------------------------------------ paths

    def path(self, *parts: str) -> str:
        """Absolute fs path of ``parts`` under the root; every part is checked with ``safe_part``."""
        return posixpath.join(self.root, *(safe_part(p) for p in parts))

    def url(self, *parts: str) -> str:
        p = self.path(*parts)
        return p if self.local else self.fs.unstrip_protocol(p)

    # ------------------------------------------------------------------ bytes

    def write_bytes(self, parts: Iterable[str], data: bytes, exclusive: bool = False) -> str:
        """Write ``data`` whole (temporary file + rename locally, one PUT remotely); returns the path.

        ``exclusive``: fail with FileExistsError when the file exists (an atomic create, for locks
        and claims: O_EXCL locally, a conditional PUT on S3).
        """
        parts = list(parts)
        path = self.path(*parts)
        return self.retry.call(self._write, path, data, exclusive, what=f"writing {self.url(*parts)}")

    def _write(self, path: str, data: bytes, exclusive: bool) -> str:
        if self.local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            if exclusive:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return path
            tmp = f"{path}.{uuid.uuid4().hex}.partial"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        elif exclusive:
            self.fs.pipe_file(path, data, mode="create")
        else:
            self.fs.pipe_file(path, data)
        return path

    def read_bytes(self, *parts: str) -> bytes:
        return self.retry.call(self.fs.cat_file, self.path(*parts), what=f"reading {self.url(*parts)}")

    def exists(self, *parts: str) -> bool:
        return self.retry.call(self.fs.exists, self.path(*parts), what=f"checking {self.url(*parts)}")

    def delete(self, *parts: str, recursive: bool = False) -> None:
        """Remove a file or folder; absent is fine."""
        try:
            self.retry.call(self.fs.rm, self.path(*parts), recursive=recursive, what=f"removing {self.url(*parts)}")
        except FileNotFoundError:
            pass

    def listdir(self, *parts: str) -> list[str]:
        """Names directly under ``parts`` (files and folders); empty when the folder is absent."""
        path = self.path(*parts)
        try:
            self.fs.invalidate_cache(path)
            entries = self.retry.call(self.fs.ls, path, detail=False, what=f"listing {self.url(*parts)}")
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def write_json(self, parts: Iterable[str], obj: Any) -> str:
        return self.write_bytes(parts, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    # ------------------------------------------------------------------ tables

    def write_table(self, parts: Iterable[str], table: pa.Table, metadata: dict[str, str] | None = None,
                    row_group_size: int | None = None) -> str:
        """Parquet, written whole; ``metadata`` goes into the schema metadata (config JSON, hash)."""
        return self.write_bytes(parts, parquet_bytes(table, metadata, row_group_size))

    def read_table(self, *parts: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(*parts)))

    @contextlib.contextmanager
    def open_parquet(self, *parts: str) -> Iterator[pq.ParquetFile]:
        """A Parquet file opened for reading row group by row group (ranged reads on object storage);
        only its footer is read on opening."""
        path = self.path(*parts)
        f = self.retry.call(self.fs.open, path, "rb", what=f"opening {self.url(*parts)}")
        try:
            yield self.retry.call(pq.ParquetFile, f, what=f"reading {self.url(*parts)}")
        finally:
            f.close()

    # ------------------------------------------------------------------ model versions

    def publish_model(self, files: dict[str, bytes], config_hash: str, version: str | None = None) -> ModelVersion:
        """Write a model version's files, then its manifest (sha256 and size of each file) last."""
        created = datetime.now(timezone.utc)
        version = version or f"v{created.strftime('%Y%m%dT%H%M%S%f')}-{config_hash[:8]}"
        safe_part(version)
        if self.exists(*layout.model_file(version, MANIFEST)):
            raise StoreError(f"model version {version} already exists")
        for name, data in files.items():
            self.write_bytes(layout.model_file(version, safe_part(name)), data)
        manifest = {
            "version": version,
            "created": created.isoformat(),
            "config_hash": config_hash,
            "files": {name: {"sha256": content_hash(data), "bytes": len(data)} for name, data in sorted(files.items())},
        }
        self.write_json(layout.model_file(version, MANIFEST), manifest)
        log.info("published model version %s at %s", version, self.url(*layout.models(), version))
        return ModelVersion(version, manifest["created"], config_hash)

    def list_versions(self) -> list[ModelVersion]:
        """Complete versions (those with a manifest), oldest first."""
        out = []
        for name in self.listdir(*layout.models()):
            try:
                m = self.read_json(*layout.model_file(name, MANIFEST))
            except FileNotFoundError:
                continue
            out.append(ModelVersion(m["version"], m["created"], m["config_hash"]))
        return sorted(out, key=lambda v: (v.created, v.version))

    def resolve_version(self, version: str | None = None) -> str:
        """``version`` if complete, else the latest complete version; raises when there is none."""
        if version:
            if not self.exists(*layout.model_file(version, MANIFEST)):
                raise IntegrityError(f"model version {version!r} is not a complete version in {self.root_url}")
            return version
        versions = self.list_versions()
        if not versions:
            raise StoreError(f"no complete model version in {self.root_url}/models; run `lafite train` first")
        return versions[-1].version

    def load_model_file(self, version: str, name: str) -> bytes:
        """One file of a version, checked against the manifest (as ``load_model_files`` checks all)."""
        try:
            meta = self.read_json(*layout.model_file(version, MANIFEST))["files"][name]
            data = self.read_bytes(*layout.model_file(version, name))
        except (FileNotFoundError, KeyError):
            raise IntegrityError(f"model version {version}: no verified file {name}") from None
        return _checked(version, name, data, meta)

    def load_model_files(self, version: str) -> dict[str, bytes]:
        """All files of a version, each checked against the manifest; refuses partial or altered ones."""
        try:
            manifest = self.read_json(*layout.model_file(version, MANIFEST))
        except FileNotFoundError:
            raise IntegrityError(f"model version {version!r} has no manifest: it is incomplete") from None
        files: dict[str, bytes] = {}
        for name, meta in manifest["files"].items():
            try:
                data = self.read_bytes(*layout.model_file(version, name))
            except FileNotFoundError:
                raise IntegrityError(f"model version {version}: file {name} is missing") from None
            files[name] = _checked(version, name, data, meta)
        return files


def _checked(version: str, name: str, data: bytes, meta: dict) -> bytes:
    """``data`` when its size and sha256 match the manifest entry ``meta``; else IntegrityError."""
    if len(data) != meta["bytes"] or content_hash(data) != meta["sha256"]:
        raise IntegrityError(f"model version {version}: file {name} does not match its checksum")
    return data
