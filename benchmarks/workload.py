"""What the serving and overload benchmarks send: the model both sides serve, the rows, the requests.

``load_spec`` reads the newest valid model of a store into plain JSON (its shape and catalogue), so
the Hugging Face baseline's server, a separate process, builds the same-sized model over the same
trie from it. A ``Row`` is one measured configuration (mode x beam width x device);
``make_records`` gives its requests, each with exactly ``history_length`` catalogue items of
history, so every side does the same work.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.trace import TraceRecord
from model_store import list_versions

NUM_ITEMS = 10  # items asked for in every request, on every side


def log(message: str) -> None:
    """Progress on stderr: stdout carries the JSON report."""
    print(f"[serving-bench] {message}", file=sys.stderr, flush=True)


def newest_version_dir(store: Path, name: str) -> Path:
    """The directory of the newest published version of ``name`` (no verification: benchmarks read ids)."""
    versions = list_versions(store, name)
    if not versions:
        raise FileNotFoundError(f"model store {store} has no published version of {name!r}")
    return Path(store) / name / str(versions[-1])


def catalogue_ids(store: Path, name: str) -> list[str]:
    """The external item ids of the newest version's catalogue, in index order."""
    catalog = json.loads((newest_version_dir(store, name) / "catalog.json").read_text())
    return [str(i) for i in catalog["item_ids"]]


def load_spec(store: Path, name: str | None) -> dict[str, Any]:
    """Model config, catalogue (external ids and code paths) and version of the newest valid model."""
    from onerec.bundle import load_newest_bundle

    bundle, _ = load_newest_bundle(store, name)
    codes = bundle.catalog.trie.tensors.item_codes.tolist()
    return {
        "name": bundle.name,
        "version": bundle.version,
        "model_config": bundle.config.to_dict(),
        "item_ids": list(bundle.catalog.item_ids),
        "codes": codes,
        "live": [bool(x) for x in bundle.catalog.trie.tensors.item_live.tolist()],
        "parameters": int(sum(p.numel() for p in bundle.model.parameters())),
    }


@dataclass(frozen=True)
class Row:
    """One measured configuration: every server is measured on the same rows."""

    mode: str
    beam_width: int
    device: str = "cpu"

    @property
    def key(self) -> str:
        return f"{self.device}/{self.mode}/beam{self.beam_width}"


def make_records(
    spec: dict[str, Any], row: Row, history_length: int, users: int = 200, seed: int = 0
) -> list[TraceRecord]:
    """One request per user, each with exactly ``history_length`` distinct catalogue items as history."""
    rng = random.Random(seed)
    live = [item for item, ok in zip(spec["item_ids"], spec["live"], strict=True) if ok]
    return [
        TraceRecord(
            t=0.0,
            user_id=f"bench-u{u}",
            history=tuple(rng.sample(live, history_length)),
            num_items=NUM_ITEMS,
            mode=row.mode,
            beam_width=row.beam_width,
        )
        for u in range(users)
    ]


def known_indices(bundle: Any, item_ids: Sequence[str]) -> list[int]:
    """Internal indices of the catalogue items among ``item_ids`` (what the service does to a history)."""
    indices = (bundle.item_index(item) for item in item_ids)
    return [index for index in indices if index is not None]
