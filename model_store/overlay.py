"""Live catalogue edits kept beside a model: items withdrawn (out of stock, banned) and items added.

``STORE/NAME/catalog-overlay.json`` belongs to the model name, not to a version, so the edits survive
an engine restart and a hot reload to a newer version of the same catalogue. It is written whole to a
temporary file and renamed into place, so a reader sees the old or the new overlay, never half of one.

    {"schema_version": 1, "withdrawn": ["item", ...], "added": {"item": [c1, c2, c3], ...}}
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

OVERLAY = "catalog-overlay.json"
OVERLAY_SCHEMA = 1
MAX_OVERLAY_BYTES = 64 * 1024 * 1024


class OverlayError(ValueError):
    """The overlay file exists but cannot be used (not JSON, wrong shape, too large)."""


@dataclass
class CatalogOverlay:
    withdrawn: list[str] = field(default_factory=list)
    added: dict[str, list[int]] = field(default_factory=dict)

    def withdraw(self, item_ids: list[str]) -> None:
        have = set(self.withdrawn)
        self.withdrawn += [i for i in dict.fromkeys(item_ids) if i not in have]

    def restore(self, item_ids: list[str]) -> None:
        gone = set(item_ids)
        self.withdrawn = [i for i in self.withdrawn if i not in gone]

    def add(self, item_id: str, path: list[int]) -> None:
        self.added[item_id] = [int(c) for c in path]
        self.restore([item_id])

    def to_json(self) -> bytes:
        doc = {"schema_version": OVERLAY_SCHEMA, "withdrawn": self.withdrawn, "added": self.added}
        return json.dumps(doc, separators=(",", ":")).encode()


def overlay_path(store: Path, name: str) -> Path:
    return Path(store) / name / OVERLAY


def read_overlay(path: Path) -> CatalogOverlay:
    """The overlay at ``path``; an empty one when the file does not exist."""
    try:
        if path.stat().st_size > MAX_OVERLAY_BYTES:
            raise OverlayError(f"{path}: larger than {MAX_OVERLAY_BYTES} bytes")
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return CatalogOverlay()
    except (OSError, ValueError, RecursionError) as exc:
        raise OverlayError(f"{path}: unreadable overlay ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict):
        raise OverlayError(f"{path}: expected a JSON object")
    withdrawn, added = doc.get("withdrawn", []), doc.get("added", {})
    valid = (
        isinstance(withdrawn, list)
        and all(isinstance(i, str) for i in withdrawn)
        and isinstance(added, dict)
        and all(isinstance(p, list) and all(isinstance(c, int) for c in p) for p in added.values())
    )
    if not valid:
        raise OverlayError(f"{path}: expected {{'withdrawn': [str], 'added': {{str: [int]}}}}")
    return CatalogOverlay(list(withdrawn), {str(k): list(v) for k, v in added.items()})


def write_overlay(path: Path, overlay: CatalogOverlay) -> None:
    """Atomic replace: temporary file in the same directory, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".overlay-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(overlay.to_json())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
