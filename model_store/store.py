"""Versioned model artifacts on a filesystem: atomic publish, verification, newest-valid selection.

Layout (DESIGN.md 4.4): STORE/NAME/VERSION/{manifest.json, model.safetensors, catalog.*, ...} with
integer VERSION directories. Why it is built this way:

- A version is written into STORE/NAME/.tmp-*/ (every file fsynced) and only then renamed to its
  integer name, so a reader never sees a half-written version: until the rename it does not exist.
  Publishers take an advisory lock on STORE/NAME/.publish.lock while they pick the number and rename,
  and a rename that meets an existing version retries with the next number, so concurrent publishers
  never clobber each other.
- The manifest records the sha256 and size of every file and the dtype/shape of every tensor, read from
  the safetensors header. Verification recomputes all of it, so a flipped byte, a truncated file or a
  manifest edited to disagree with the weights is refused before anything parses the weights.
- The service loads the newest *valid* version: a corrupt newer version is skipped with a JSON log line,
  never served, and never stops the older good version from loading.

No torch and no onerec imports here: the store is plain files, shared by the offline build and the
service.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Generic, TypeVar

from model_store.safetensors_header import HeaderError, parse_header, read_header, tensor_specs

__all__ = [
    "MANIFEST",
    "SCHEMA_VERSION",
    "WEIGHTS",
    "CorruptVersionError",
    "NoValidVersionError",
    "PublishedVersion",
    "Rejection",
    "RefusalMemory",
    "Selected",
    "VerifiedVersion",
    "list_models",
    "list_versions",
    "load_newest_valid",
    "publish_version",
    "read_verified_file",
    "select_version",
    "verify_version",
    "version_fingerprint",
]

logger = logging.getLogger("model_store")

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
TMP_PREFIX = ".tmp-"
LOCK_FILE = ".publish.lock"
RESERVED_KEYS = frozenset({"schema_version", "name", "version", "created", "files", "tensors"})
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 1 << 20
# A manifest is a few kB; the bound keeps a crafted one from costing memory before it is even parsed.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
# Fingerprinting looks at this many directory entries at most (a version has three files).
_FINGERPRINT_ENTRIES = 64

T = TypeVar("T")
Fingerprint = str


# --------------------------------------------------------------------------------------------------
# Results and errors
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedVersion:
    """Where `publish_version` put the new version."""

    name: str
    version: int
    path: Path


@dataclass(frozen=True)
class VerifiedVersion:
    """A version whose manifest, checksums and tensor header all verified."""

    name: str
    version: int
    path: Path
    manifest: dict[str, Any] = field(repr=False)

    def file(self, filename: str) -> Path:
        """Path of a file the manifest lists (KeyError for anything else)."""
        if filename not in self.manifest["files"]:
            raise KeyError(f"{filename!r} is not part of {self.path}")
        return self.path / filename


@dataclass(frozen=True)
class Rejection:
    """A version that was skipped, and why (for logs, metrics and /v1/models)."""

    name: str
    version: int
    path: Path
    reason: str
    fingerprint: Fingerprint = ""  # of the version's files when it was refused ("" = not taken)
    remembered: bool = False  # refused before with the same files: skipped, not checked again


class CorruptVersionError(Exception):
    """A version directory failed verification; `path` and `reason` say which and why."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class NoValidVersionError(Exception):
    """No version of a model verified (or the pinned one did not); lists what was rejected."""

    def __init__(self, path: Path, reason: str, rejections: list[Rejection] | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        self.rejections = list(rejections or [])
        details = "; ".join(f"v{r.version}: {r.reason}" for r in self.rejections)
        super().__init__(f"{path}: {reason}" + (f" ({details})" if details else ""))


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _check_name(name: str, what: str) -> None:
    """Model and file names are single, non-hidden path components (no traversal, no temp-dir look)."""
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise ValueError(f"invalid {what} {name!r}: want letters, digits, '.', '_', '-', not leading '.'")


def _is_version_name(entry: str) -> bool:
    """Only plain non-negative decimal integers name versions ('.tmp-x', '3a', '-1', '+2' do not)."""
    return entry.isascii() and entry.isdigit()


def _sha256_file(path: Path, fname: str) -> tuple[str, int]:
    """sha256 hex digest and size of a version's file, streamed (large weights never sit in memory)."""
    digest = hashlib.sha256()
    size = 0
    with _open_regular(path, fname) as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _resolve_inside(path: Path, fname: str) -> Path:
    """Where `fname` of version `path` really is; refused when that is outside the version directory.

    A symlink out of a version (to a file elsewhere, or into another version) would make the store
    serve bytes nobody published under this version, so any file whose resolved path leaves the
    directory is refused, whatever its checksum.
    """
    try:
        root = path.resolve(strict=True)
        real = (path / fname).resolve(strict=True)
    except FileNotFoundError:
        raise CorruptVersionError(path, f"{fname} missing") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a permission error
        raise CorruptVersionError(path, f"{fname} cannot be resolved: {type(exc).__name__}: {exc}") from None
    if root not in real.parents:
        raise CorruptVersionError(path, f"{fname} resolves outside the version directory (a symlink out of it)")
    return real


@contextlib.contextmanager
def _open_regular(path: Path, fname: str) -> Iterator[Any]:
    """Open a file of a version for reading: inside the version directory, and a regular file.

    O_NONBLOCK keeps a FIFO from blocking the open; O_NOFOLLOW refuses a symlink swapped in after
    resolution; fstat then refuses anything that is not a plain file (a device would never end).
    """
    real = _resolve_inside(path, fname)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        raise CorruptVersionError(path, f"{fname} cannot be opened: {exc.strerror}") from None
    handle = os.fdopen(fd, "rb")
    with handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise CorruptVersionError(path, f"{fname} is not a regular file")
        yield handle


def _write_synced(path: Path, data: bytes) -> None:
    """Write a file and fsync it, so the rename that publishes it cannot outrun its contents."""
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _publish_lock(model_dir: Path) -> Iterator[None]:
    """Advisory exclusive lock serialising version-number choice among local publishers."""
    with (model_dir / LOCK_FILE).open("a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _manifest_json(manifest: dict[str, Any]) -> bytes:
    try:
        text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata is not plain JSON (no NaN/inf, no objects): {exc}") from None
    return (text + "\n").encode("utf-8")


# --------------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------------


def list_versions(store: Path, name: str) -> list[int]:
    """Published versions of `name`, ascending. Temp dirs and non-integer names are not versions."""
    model_dir = Path(store) / name
    if not model_dir.is_dir():
        return []
    return sorted(int(e.name) for e in model_dir.iterdir() if _is_version_name(e.name) and e.is_dir())


def list_models(store: Path) -> list[str]:
    """Names of the models in the store that have at least one published version, sorted."""
    store = Path(store)
    if not store.is_dir():
        return []
    return sorted(
        e.name for e in store.iterdir() if e.is_dir() and not e.name.startswith(".") and list_versions(store, e.name)
    )


# --------------------------------------------------------------------------------------------------
# Publish
# --------------------------------------------------------------------------------------------------


def _build_manifest(name: str, files: dict[str, bytes], metadata: dict[str, Any]) -> dict[str, Any]:
    """Everything of the manifest except the version number, which is fixed at rename time."""
    clashes = RESERVED_KEYS & set(metadata)
    if clashes:
        raise ValueError(f"metadata may not set reserved manifest keys {sorted(clashes)}")
    if WEIGHTS not in files:
        raise ValueError(f"a version needs {WEIGHTS}")
    for filename in files:
        _check_name(filename, "file name")
        if filename == MANIFEST:
            raise ValueError(f"{MANIFEST} is written by the store, not passed in files")
    weights = files[WEIGHTS]
    try:
        header = parse_header(weights, len(weights))
    except HeaderError as exc:
        raise ValueError(f"{WEIGHTS} is not valid safetensors: {exc}") from None
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {
            fname: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for fname, data in sorted(files.items())
        },
        "tensors": tensor_specs(header),
        **metadata,
    }


def _rename_into_place(model_dir: Path, tmp_dir: Path, manifest: dict[str, Any]) -> int:
    """Number the version (newest + 1), write its manifest, rename; retry if another publisher won."""
    with _publish_lock(model_dir):
        while True:
            existing = list_versions(model_dir.parent, model_dir.name)
            version = (existing[-1] + 1) if existing else 1
            manifest["version"] = version
            _write_synced(tmp_dir / MANIFEST, _manifest_json(manifest))
            _fsync_dir(tmp_dir)
            try:
                os.rename(tmp_dir, model_dir / str(version))
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue  # a publisher outside our lock took this number: take the next one
                raise
            _fsync_dir(model_dir)
            return version


def publish_version(store: Path, name: str, files: dict[str, bytes], metadata: dict[str, Any]) -> PublishedVersion:
    """Atomically add a new version of model `name` holding `files` (+ a generated manifest.json).

    `files` maps plain file names to contents and must include model.safetensors; `metadata` (model
    config, catalog size, metrics, dataset, seed, ...) is merged into the manifest and must be plain JSON.
    The version number is the newest existing one + 1 (1 for a new model).
    """
    _check_name(name, "model name")
    manifest = _build_manifest(name, files, dict(metadata))
    model_dir = Path(store) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=model_dir))
    try:
        for filename, data in files.items():
            _write_synced(tmp_dir / filename, data)
        version = _rename_into_place(model_dir, tmp_dir, manifest)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    path = model_dir / str(version)
    logger.info(json.dumps({"event": "model_version_published", "model": name, "version": version, "path": str(path)}))
    return PublishedVersion(name=name, version=version, path=path)


# --------------------------------------------------------------------------------------------------
# Verify
# --------------------------------------------------------------------------------------------------


def _load_manifest(path: Path) -> dict[str, Any]:
    """Read and parse manifest.json, bounded in size and nesting (a crafted one must not cost memory)."""
    with _open_regular(path, MANIFEST) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > MAX_MANIFEST_BYTES:
            raise CorruptVersionError(path, f"{MANIFEST} is {size} bytes, more than {MAX_MANIFEST_BYTES}")
        raw = handle.read(MAX_MANIFEST_BYTES + 1)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CorruptVersionError(path, f"{MANIFEST} is nested too deeply to parse") from None
    except ValueError as exc:  # not UTF-8, not JSON, or an integer too long to convert
        raise CorruptVersionError(path, f"{MANIFEST} unreadable: {exc}") from None
    if not isinstance(manifest, dict):
        raise CorruptVersionError(path, f"{MANIFEST} is not a JSON object")
    return manifest


def _check_schema(path: Path, manifest: dict[str, Any]) -> None:
    """Schema version, identity (name/version match the directory) and the files/tensors tables."""
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CorruptVersionError(path, f"schema_version {manifest.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    if manifest.get("name") != path.parent.name:
        raise CorruptVersionError(path, f"manifest name {manifest.get('name')!r} != dir {path.parent.name!r}")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or str(version) != path.name:
        raise CorruptVersionError(path, f"manifest version {version!r} != directory {path.name!r}")
    if not isinstance(manifest.get("created"), str):
        raise CorruptVersionError(path, "manifest 'created' missing")
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise CorruptVersionError(path, f"manifest 'files' missing or without {WEIGHTS}")
    for fname, entry in files.items():
        if not isinstance(fname, str) or not _NAME_RE.match(fname) or fname == MANIFEST:
            raise CorruptVersionError(path, f"manifest lists an invalid file name {fname!r}")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not _SHA256_RE.match(entry["sha256"])
            or not isinstance(entry.get("bytes"), int)
        ):
            raise CorruptVersionError(path, f"manifest entry {fname!r} needs sha256 (hex) and bytes (int)")
    if not isinstance(manifest.get("tensors"), dict):
        raise CorruptVersionError(path, "manifest 'tensors' missing")


def _check_files(path: Path, files: dict[str, Any]) -> None:
    """Exactly the listed files are present, each with the recorded size and sha256."""
    present = {e.name for e in path.iterdir()} - {MANIFEST}
    unlisted = sorted(present - set(files))
    if unlisted:
        raise CorruptVersionError(path, f"files not in the manifest: {unlisted}")
    for fname, entry in sorted(files.items()):
        digest, size = _sha256_file(path, fname)
        if size != entry["bytes"]:
            raise CorruptVersionError(path, f"{fname} is {size} bytes, manifest says {entry['bytes']}")
        if digest != entry["sha256"]:
            raise CorruptVersionError(
                path, f"{fname} sha256 mismatch (file {digest[:12]}…, manifest {entry['sha256'][:12]}…)"
            )


def _check_tensors(path: Path, recorded: dict[str, Any]) -> None:
    """The weights' own header must parse and agree with the manifest's dtype/shape table exactly."""
    try:
        actual = tensor_specs(read_header(_resolve_inside(path, WEIGHTS)))
    except HeaderError as exc:
        raise CorruptVersionError(path, f"{WEIGHTS}: {exc}") from None
    if set(actual) != set(recorded):
        missing, extra = sorted(set(recorded) - set(actual)), sorted(set(actual) - set(recorded))
        raise CorruptVersionError(path, f"tensors differ from manifest (missing {missing}, extra {extra})")
    for tensor, spec in actual.items():
        want = recorded[tensor]
        recorded_spec = (want.get("dtype"), want.get("shape")) if isinstance(want, dict) else None
        if recorded_spec != (spec["dtype"], spec["shape"]):
            raise CorruptVersionError(
                path, f"tensor {tensor!r}: header {spec['dtype']}{spec['shape']}, manifest {want!r}"
            )


def verify_version(path: Path) -> VerifiedVersion:
    """Verify a version directory: manifest schema, every file's sha256 and size, the tensor header.

    Raises CorruptVersionError(path, reason) on the first problem found. Anything else that goes
    wrong on the way (a RecursionError, a MemoryError, an OSError) is a refusal of this version too,
    never an exception that stops the caller from trying an older one.
    """
    path = Path(path)
    try:
        return _verify(path)
    except CorruptVersionError:
        raise
    except RecursionError:
        raise CorruptVersionError(path, "nested too deeply to parse") from None
    except Exception as exc:
        raise CorruptVersionError(path, f"verification failed: {type(exc).__name__}: {exc}") from None


def _verify(path: Path) -> VerifiedVersion:
    if not _is_version_name(path.name):
        raise CorruptVersionError(path, "not a version directory (name is not an integer)")
    if path.is_symlink():
        raise CorruptVersionError(path, "version directory is a symlink (versions are published by rename)")
    if not path.is_dir():
        raise CorruptVersionError(path, "version directory missing")
    manifest = _load_manifest(path)
    _check_schema(path, manifest)
    _check_files(path, manifest["files"])
    _check_tensors(path, manifest["tensors"])
    return VerifiedVersion(name=manifest["name"], version=manifest["version"], path=path, manifest=manifest)


def read_verified_file(version: VerifiedVersion, filename: str) -> bytes:
    """Read one file of a verified version and re-check its size and sha256 on the bytes actually read.

    Loading through this closes the gap between verification and use: a file replaced after
    `verify_version` (by other bytes, a bigger file or a symlink out) is refused instead of being
    loaded, and the read never takes more than the verified size (+1 byte to notice growth).
    """
    version.file(filename)  # KeyError for a file the manifest does not list
    expected = version.manifest["files"][filename]
    with _open_regular(version.path, filename) as handle:
        data = handle.read(expected["bytes"] + 1)
    if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise CorruptVersionError(version.path, f"{filename} changed after verification (size or sha256)")
    return data


# --------------------------------------------------------------------------------------------------
# Newest valid
# --------------------------------------------------------------------------------------------------


def version_fingerprint(path: Path) -> Fingerprint:
    """A short digest of what a version directory holds, as `lstat` sees it (never raises).

    Name, type, inode, size, mtime and ctime of the directory and of each entry (a symlink's target
    too): any edit, replacement or re-link changes it. A refused version is remembered under this, so
    it is not checked again (and does not cost a build again) until its files change.
    """
    parts: list[str] = []
    try:
        st = os.lstat(path)
        parts.append(f".:{st.st_mode}:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}")
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(path) as entries:
                names = sorted(e.name for e in entries)
            parts.append(f"#{len(names)}")
            for name in names[:_FINGERPRINT_ENTRIES]:
                entry = os.path.join(path, name)
                st = os.lstat(entry)
                parts.append(f"{name}:{st.st_mode}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")
                if stat.S_ISLNK(st.st_mode):
                    parts.append(f"->{os.readlink(entry)}")
    except OSError as exc:
        parts.append(f"!{type(exc).__name__}:{exc.errno}")
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:16]


class RefusalMemory:
    """Versions refused before, keyed by version number and the fingerprint of their files.

    Selection skips a remembered version without verifying or building it again, so a bad version
    costs its checks once, not on every poll; editing or replacing its files forgets the refusal.
    Not thread-safe by itself: its users serialise loads (the service holds one lock per reload).
    """

    def __init__(self) -> None:
        self._refused: dict[int, Rejection] = {}

    def get(self, version: int, fingerprint: Fingerprint) -> Rejection | None:
        """The remembered refusal of `version`, if its files are still the ones that were refused."""
        known = self._refused.get(version)
        return known if known is not None and known.fingerprint == fingerprint else None

    def add(self, rejection: Rejection) -> bool:
        """Remember a refusal; False when exactly this one (version and files) was known already."""
        known = self._refused.get(rejection.version)
        if known is not None and known.fingerprint == rejection.fingerprint:
            return False
        self._refused[rejection.version] = replace(rejection, remembered=False)
        return True

    def copy(self) -> RefusalMemory:
        """An independent copy (a caller that wants to skip a version for one attempt only adds it there)."""
        other = RefusalMemory()
        other._refused = dict(self._refused)
        return other

    def refused_now(self, store: Path, name: str, version: int) -> bool:
        """True when `version` was refused and its files have not changed since."""
        return self.get(version, version_fingerprint(Path(store) / name / str(version))) is not None

    def __contains__(self, version: object) -> bool:
        return version in self._refused

    def rejections(self) -> list[Rejection]:
        """Every remembered refusal, newest version first."""
        return [self._refused[v] for v in sorted(self._refused, reverse=True)]


@dataclass(frozen=True)
class Selected(Generic[T]):
    """The version `select_version` chose: what `prepare` made of it, and what was refused on the way."""

    value: T
    verified: VerifiedVersion
    fingerprint: Fingerprint
    rejections: list[Rejection]


def _log_rejection(rejection: Rejection) -> None:
    fields = {
        "event": "model_version_rejected",
        "model": rejection.name,
        "version": rejection.version,
        "reason": rejection.reason,
    }
    logger.warning(
        json.dumps(fields),
        extra={"event": fields["event"], "model_version": rejection.version, "reason": rejection.reason},
    )


def _reason(exc: BaseException) -> str:
    """A refusal reason that names what failed but not the store's filesystem path."""
    if isinstance(exc, CorruptVersionError):
        return exc.reason
    if isinstance(exc, RecursionError):
        return "nested too deeply to parse (RecursionError)"
    return f"{type(exc).__name__}: {exc}"


def select_version(
    store: Path,
    name: str,
    prepare: Callable[[VerifiedVersion], T],
    *,
    pin: int | None = None,
    memory: RefusalMemory | None = None,
) -> Selected[T]:
    """The newest version of `name` that verifies *and* that `prepare` accepts, newest first.

    `prepare` is whatever the caller still has to do with a version (parse its catalogue, build the
    model): any exception it raises refuses that version like a failed checksum does, and the next
    older one is tried. With `pin`, only that version is considered (an operator who pins wants that
    one, not a silent fallback); a pinned version that does not exist is not a rejection. With
    `memory`, versions refused before with unchanged files are skipped (reported with remembered=True,
    not logged again) and new refusals are added to it. Raises NoValidVersionError when none is left.
    """
    model_dir = Path(store) / name
    if pin is not None:
        if not (model_dir / str(pin)).is_dir():
            raise NoValidVersionError(model_dir, f"pinned version {pin} does not exist")
        candidates = [pin]
    else:
        candidates = sorted(list_versions(store, name), reverse=True)
    if not candidates:
        raise NoValidVersionError(model_dir, "no published versions")
    rejections: list[Rejection] = []
    for version in candidates:
        path = model_dir / str(version)
        fingerprint = version_fingerprint(path)
        known = memory.get(version, fingerprint) if memory is not None else None
        if known is not None:
            rejections.append(replace(known, remembered=True))
            continue
        try:
            verified = verify_version(path)
            value = prepare(verified)
        except Exception as exc:  # anything wrong with a version refuses that version, never the store
            rejection = Rejection(name, version, path, _reason(exc), fingerprint)
            _log_rejection(rejection)
            rejections.append(rejection)
            if memory is not None:
                memory.add(rejection)
            continue
        return Selected(value, verified, fingerprint, rejections)
    what = f"pinned version {pin} is not valid" if pin is not None else "no valid version"
    raise NoValidVersionError(model_dir, what, rejections)


def load_newest_valid(store: Path, name: str, pin: int | None = None) -> tuple[VerifiedVersion, list[Rejection]]:
    """The newest version of `name` that verifies, plus the newer versions rejected on the way.

    With `pin`, only that version is considered. Each rejection is logged as one JSON line. Raises
    NoValidVersionError when nothing verifies.
    """
    selected = select_version(store, name, lambda verified: verified, pin=pin)
    return selected.value, selected.rejections
