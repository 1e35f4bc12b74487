"""A model version as the service uses it: weights + catalogue + trie + generator, loaded from the store.

Files of a version (DESIGN.md 4.4): ``model.safetensors`` (weights, never pickle), ``catalog.json``
(external item ids in internal order, their code paths, the semantic-ID level sizes and the
popularity ranking used for fallback answers) and ``manifest.json`` (written by ``model_store``,
with the model config, evaluation and a sha256 of every file).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save

from model_store import (
    CatalogOverlay,
    NoValidVersionError,
    PublishedVersion,
    Rejection,
    VerifiedVersion,
    list_models,
    load_newest_valid,
    publish_version,
    read_verified_file,
    verify_version,
)
from onerec.generate import Generator, RecRequest
from onerec.model import ModelConfig, OneRecModel
from onerec.trie import TrieIndex

WEIGHTS = "model.safetensors"
CATALOG = "catalog.json"


@dataclass
class Catalog:
    """External item ids <-> internal indices <-> code paths, plus the live trie."""

    item_ids: list[str]
    level_sizes: list[int]
    trie: TrieIndex
    popular: list[int] = field(default_factory=list)  # internal indices, most popular first

    def __post_init__(self) -> None:
        self._index = {item: i for i, item in enumerate(self.item_ids)}

    @classmethod
    def from_codes(cls, item_ids: list[str], codes: np.ndarray, level_sizes: list[int], popular: list[int]) -> Catalog:
        if len(item_ids) != len(codes):
            raise ValueError(f"{len(item_ids)} item ids but {len(codes)} code paths")
        return cls(list(item_ids), list(level_sizes), TrieIndex(codes, level_sizes), list(popular))

    def index(self, item_id: str) -> int | None:
        return self._index.get(item_id)

    def withdraw(self, item_ids: list[str]) -> None:
        if item_ids:
            self.trie.withdraw(self._known(item_ids))

    def restore(self, item_ids: list[str]) -> None:
        """Make withdrawn items live again under the path they always had."""
        for index in self._known(item_ids):
            self.trie.add(self.trie.path_of_item(index))

    def _known(self, item_ids: list[str]) -> list[int]:
        unknown = [i for i in item_ids if i not in self._index]
        if unknown:
            raise KeyError(f"unknown item ids: {unknown[:5]}")
        return [self._index[i] for i in item_ids]

    def is_live(self, index: int) -> bool:
        return self.trie.is_live(index)

    def apply_overlay(self, overlay: CatalogOverlay) -> list[str]:
        """Replay the live edits kept beside the model (added items first, then withdrawals).

        Returns the ids the overlay names that this catalogue cannot take (unknown ids, or a path that
        names another item here), so a newer version of a changed catalogue loads with a warning
        instead of being refused.
        """
        skipped = []
        for item_id, path in overlay.added.items():
            try:
                self.add(item_id, path)
            except ValueError:
                skipped.append(item_id)
        known = [i for i in overlay.withdrawn if i in self._index]
        skipped += [i for i in overlay.withdrawn if i not in self._index]
        if known:
            self.withdraw(known)
        return skipped

    def add(self, item_id: str, path: list[int]) -> int:
        """Make an item live under its code path (a new item or a withdrawn one coming back)."""
        known = self._index.get(item_id)
        existing = self.trie.item_of_path(path)
        if existing is not None and existing != known:
            raise ValueError(f"path {path} already names item {self.item_ids[existing]!r}")
        index = self.trie.add(path)
        if index == len(self.item_ids):
            self.item_ids.append(item_id)
            self._index[item_id] = index
        elif self.item_ids[index] != item_id:
            raise ValueError(f"path {path} belongs to withdrawn item {self.item_ids[index]!r}, not {item_id!r}")
        return index

    def to_json(self) -> bytes:
        codes = self.trie.tensors.item_codes.tolist()
        doc = {"item_ids": self.item_ids, "codes": codes, "level_sizes": self.level_sizes, "popular": self.popular}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Catalog:
        doc = json.loads(raw)
        codes = np.asarray(doc["codes"], dtype=np.int64)
        return cls.from_codes([str(i) for i in doc["item_ids"]], codes, doc["level_sizes"], doc.get("popular", []))


@dataclass
class VersionInfo:
    """What the front end needs of a version: its catalogue and config, not its weights.

    The weights live in the engine processes (``ModelBundle``); the front end maps external ids with
    this catalogue, prices requests from this config, and answers the popularity fallback from it.
    """

    name: str
    version: int
    path: Path
    manifest: dict[str, Any]
    loaded_at: float
    config: ModelConfig
    catalog: Catalog

    @property
    def popular(self) -> list[int]:
        return self.catalog.popular

    @property
    def max_history(self) -> int:
        return self.config.max_history

    @property
    def session_items(self) -> int:
        return self.config.session_items

    @property
    def semantic_id_shape(self) -> list[int]:
        return list(self.config.level_sizes)

    def item_index(self, item_id: str) -> int | None:
        return self.catalog.index(item_id)

    def item_id(self, index: int) -> str:
        return self.catalog.item_ids[index]


@dataclass
class ModelBundle(VersionInfo):
    """A version with its model and generator built: what an engine process serves."""

    model: OneRecModel = field(repr=False, default=None)  # type: ignore[assignment]
    generator: Generator = field(repr=False, default=None)  # type: ignore[assignment]

    def warmup(self, beam_width: int = 8) -> None:
        """Run both modes once so the first real request pays no lazy-initialisation cost."""
        history = self.popular[:3]
        self.generator.generate(
            [
                RecRequest(history=history, mode="items", beam_width=beam_width, num_items=min(5, beam_width)),
                RecRequest(history=history, mode="session", beam_width=beam_width, num_items=5),
            ]
        )


def save_bundle(
    store: Path, name: str, model: OneRecModel, catalog: Catalog, metadata: dict[str, Any]
) -> PublishedVersion:
    """Publish weights and catalogue as a new version (atomic: see ``model_store.publish_version``)."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    files = {WEIGHTS: save(state), CATALOG: catalog.to_json()}
    meta = {"model_config": model.cfg.to_dict(), "catalog_size": len(catalog.item_ids), **metadata}
    return publish_version(Path(store), name, files, meta)


def load_bundle(version_dir: Path, device: str = "cpu") -> ModelBundle:
    """Verify a version directory (checksums, shapes) and build the model, catalogue and generator."""
    return _build(verify_version(Path(version_dir)), device)


def load_newest_bundle(
    store: Path, name: str | None = None, pin: int | None = None, device: str = "cpu"
) -> tuple[ModelBundle, list[Rejection]]:
    """The newest valid version of a model (or the pinned one); corrupt versions are reported, not fatal.

    Without a name the store must hold exactly one model.
    """
    store = Path(store)
    if name is None:
        models = list_models(store)
        if len(models) != 1:
            raise NoValidVersionError(store, f"store holds models {models}: name the one to load")
        name = models[0]
    verified, rejected = load_newest_valid(store, name, pin=pin)
    return _build(verified, device), rejected


def load_newest_version_info(store: Path, name: str, pin: int | None = None) -> tuple[VersionInfo, list[Rejection]]:
    """The newest valid version's catalogue and config (or the pinned one's), without building the model."""
    verified, rejected = load_newest_valid(Path(store), name, pin=pin)
    return _version_info(verified), rejected


def _version_info(verified: VerifiedVersion) -> VersionInfo:
    # Bytes are read once and re-hashed (read_verified_file): a file swapped after verification is refused.
    config = ModelConfig.from_dict(verified.manifest["model_config"])
    catalog = Catalog.from_json(read_verified_file(verified, CATALOG))
    if catalog.level_sizes != config.level_sizes:
        raise ValueError(
            f"{verified.path}: catalogue level sizes {catalog.level_sizes} != model's {config.level_sizes}"
        )
    return VersionInfo(verified.name, verified.version, verified.path, verified.manifest, time.time(), config, catalog)


def _build(verified: VerifiedVersion, device: str) -> ModelBundle:
    info = _version_info(verified)
    model = OneRecModel(info.config)
    model.load_state_dict(load(read_verified_file(verified, WEIGHTS)), strict=True)
    generator = Generator(model, info.catalog.trie, device=device)
    return ModelBundle(**vars(info), model=model, generator=generator)
