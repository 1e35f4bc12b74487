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
    WEIGHTS,
    CatalogOverlay,
    NoValidVersionError,
    PublishedVersion,
    RefusalMemory,
    Rejection,
    Selected,
    VerifiedVersion,
    list_models,
    publish_version,
    read_verified_file,
    select_version,
    verify_version,
)
from onerec.generate import Generator, RecRequest
from onerec.model import ModelConfig, OneRecModel, candidate_score_features
from onerec.trie import TrieIndex

CATALOG = "catalog.json"

# Sane bounds of a model config: far above any model this service runs, low enough that a crafted
# config cannot make even the shape check (a model built on the meta device) expensive. Every bound
# is (lowest, highest), inclusive.
CONFIG_LIMITS: dict[str, tuple[int, int]] = {
    "session_items": (1, 64),
    "history_window": (1, 4096),
    "d_model": (1, 16384),
    "n_heads": (1, 256),
    "n_encoder_layers": (0, 64),
    "n_decoder_layers": (1, 64),
    "d_ff": (1, 65536),
    "n_experts": (1, 256),
    "experts_top_k": (1, 256),
    "user_buckets": (1, 1 << 24),
    "catalogue_items": (0, 1 << 24),  # float32 neighbour indices stay exact below 2**24
    "candidate_tokens": (0, 1024),
}
MAX_LEVELS = 16
MAX_LEVEL_SIZE = 1 << 20
WEIGHT_DTYPES = frozenset({"F32", "F16", "BF16"})  # what load_state_dict can take without surprises


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
    def history_window(self) -> int:
        return self.config.history_window

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
    # clone: tied tensors (``tie_code_embeddings``) share storage, which safetensors refuses to save
    state = {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in model.state_dict().items()}
    files = {WEIGHTS: save(state), CATALOG: catalog.to_json()}
    meta = {"model_config": model.cfg.to_dict(), "catalog_size": len(catalog.item_ids), **metadata}
    return publish_version(Path(store), name, files, meta)


def load_bundle(version_dir: Path, device: str = "cpu", kernel_backend: str | None = None) -> ModelBundle:
    """Verify a version directory (checksums, shapes, config) and build the model, catalogue and generator.

    ``kernel_backend`` ("torch", "triton", None = auto) is the generator's, see ``onerec.generate.Generator``.
    """
    return _build(verify_version(Path(version_dir)), device, kernel_backend)


def _only_model(store: Path, name: str | None) -> str:
    if name is not None:
        return name
    models = list_models(store)
    if len(models) != 1:
        raise NoValidVersionError(store, f"store holds models {models}: name the one to load")
    return models[0]


def load_newest_bundle(
    store: Path, name: str | None = None, pin: int | None = None, device: str = "cpu"
) -> tuple[ModelBundle, list[Rejection]]:
    """The newest version of a model that verifies *and builds* (or the pinned one); the rest are reported.

    A version whose model cannot be built (a config that does not fit its weights, a broken catalogue)
    is refused like a corrupt one and the next older version is tried. Without a name the store must
    hold exactly one model.
    """
    store = Path(store)
    selected = select_version(store, _only_model(store, name), lambda verified: _build(verified, device), pin=pin)
    return selected.value, selected.rejections


def select_version_info(
    store: Path, name: str, pin: int | None = None, memory: RefusalMemory | None = None
) -> Selected[VersionInfo]:
    """The newest version whose files verify and whose config and catalogue are sound, without weights.

    What the front end loads: a version refused here (or remembered in `memory` as refused with the
    same files) is never sent to the engines.
    """
    return select_version(Path(store), name, _version_info, pin=pin, memory=memory)


def load_newest_version_info(store: Path, name: str, pin: int | None = None) -> tuple[VersionInfo, list[Rejection]]:
    """The newest valid version's catalogue and config (or the pinned one's), without building the model."""
    selected = select_version_info(store, name, pin=pin)
    return selected.value, selected.rejections


def check_model_config(raw: Any, version: int) -> ModelConfig:
    """The manifest's ``model_config`` as a ModelConfig, refused (ValueError) unless every field is sane.

    Types and bounds (``CONFIG_LIMITS``) are checked before anything is built from the config, so an
    edit like ``user_buckets: 10**7`` costs nothing; whether it fits the weights is checked next.
    """
    where = f"version {version}: model_config"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} missing or not an object")
    config = ModelConfig.from_dict(raw)  # unknown keys are refused there
    for key, (low, high) in CONFIG_LIMITS.items():
        value = getattr(config, key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"{where}.{key} = {value!r}: want an integer in [{low}, {high}]")
    sizes = config.level_sizes
    if (
        not isinstance(sizes, list)
        or not 1 <= len(sizes) <= MAX_LEVELS
        or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_LEVEL_SIZE for v in sizes)
    ):
        raise ValueError(f"{where}.level_sizes = {sizes!r}: want 1..{MAX_LEVELS} integers in [1, {MAX_LEVEL_SIZE}]")
    for key in ("dropout", "embedding_dropout"):
        rate = getattr(config, key)
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate < 1:
            raise ValueError(f"{where}.{key} = {rate!r}: want a number in [0, 1)")
    if config.d_model % config.n_heads:
        raise ValueError(f"{where}: d_model {config.d_model} is not divisible by n_heads {config.n_heads}")
    if config.experts_top_k > config.n_experts:
        raise ValueError(f"{where}: experts_top_k {config.experts_top_k} > n_experts {config.n_experts}")
    if config.candidate_tokens and not config.catalogue_items:
        raise ValueError(f"{where}: candidate_tokens {config.candidate_tokens} needs catalogue_items > 0")
    for key in ("candidate_backward", "candidate_decay", "candidate_recency"):
        value = getattr(config, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
            raise ValueError(f"{where}.{key} = {value!r}: want a finite number >= 0")
    if conflict := config.option_conflict():
        raise ValueError(f"{where}: {conflict}")
    return config


def expected_tensors(config: ModelConfig) -> dict[str, list[int]]:
    """Name and shape of every tensor in the state dict of ``OneRecModel(config)``, computed, not built.

    Pure arithmetic, so checking a config costs nothing whatever it says (building the model on
    torch's meta device would also allocate nothing, but its first use imports torch._dynamo: seconds
    and tens of MB in every engine). It must follow onerec/model.py; tests/test_version_hardening.py
    compares it with real models' state dicts, so a change there that is not made here fails a test.
    """
    d, f, e = config.d_model, config.d_ff, config.n_experts
    shapes: dict[str, list[int]] = {}

    def attention(prefix: str) -> None:
        shapes[f"{prefix}.q.weight"] = [d, d]
        shapes[f"{prefix}.kv.weight"] = [2 * d, d]
        shapes[f"{prefix}.o.weight"] = [d, d]

    for level, size in enumerate(config.level_sizes):
        shapes[f"enc_codes.{level}.weight"] = [size, d]
    shapes["enc_pos.weight"] = [config.history_window + 1, d]
    shapes["user.weight"] = [config.user_buckets, d]
    if config.candidate_tokens:
        shapes["cand_rank.weight"] = [config.candidate_tokens, d]
        if config.item_vectors:
            shapes["item_vectors.weight"] = [config.catalogue_items, d]
        if config.node_bias:
            shapes["node_bias"] = [config.depth * config.catalogue_items]
        if config.candidate_scores:
            shapes["cand_score.weight"] = [d, candidate_score_features(config)]
        if config.copy_head:
            shapes["copy_query.weight"] = [d, d]
            shapes["copy_key.weight"] = [d, d]
            shapes["copy_gate.weight"] = [1, d]
            shapes["copy_gate.bias"] = [1]
        shapes["neighbour_items"] = [config.catalogue_items, config.candidate_tokens]
        shapes["neighbour_weights"] = [config.catalogue_items, config.candidate_tokens]
        for name in config.neighbour_parts():
            shapes[name] = [config.catalogue_items, config.candidate_tokens]
    for i in range(config.n_encoder_layers):
        layer = f"encoder.{i}"
        shapes[f"{layer}.n1.weight"] = [d]
        attention(f"{layer}.attn")
        shapes[f"{layer}.n2.weight"] = [d]
        shapes[f"{layer}.ffn.gate.weight"] = [f, d]
        shapes[f"{layer}.ffn.up.weight"] = [f, d]
        shapes[f"{layer}.ffn.down.weight"] = [d, f]
    shapes["enc_norm.weight"] = [d]
    for level, size in enumerate(config.level_sizes):
        shapes[f"dec_codes.{level}.weight"] = [size, d]
    shapes["dec_start"] = [d]
    shapes["dec_pos.weight"] = [config.session_positions, d]
    for i in range(config.n_decoder_layers):
        layer = f"decoder.{i}"
        shapes[f"{layer}.n1.weight"] = [d]
        attention(f"{layer}.self_attn")
        shapes[f"{layer}.n2.weight"] = [d]
        attention(f"{layer}.cross_attn")
        shapes[f"{layer}.n3.weight"] = [d]
        shapes[f"{layer}.moe.router"] = [e, d]
        shapes[f"{layer}.moe.w_gate"] = [e, d, f]
        shapes[f"{layer}.moe.w_up"] = [e, d, f]
        shapes[f"{layer}.moe.w_down"] = [e, f, d]
    shapes["dec_norm.weight"] = [d]
    for level, size in enumerate(config.level_sizes):
        shapes[f"heads.{level}.weight"] = [size, d]
        if config.head_bias:
            shapes[f"heads.{level}.bias"] = [size]
    return shapes


def check_weights_fit(config: ModelConfig, tensors: dict[str, Any], version: int) -> None:
    """Every tensor the config implies must be in the weights' header with exactly that shape (ValueError).

    ``tensors`` is the manifest's table, which verification has already matched to the safetensors
    header. Once this passes, building the model allocates what the weights file holds, no more.
    """
    where = f"version {version}: model_config does not fit the weights"
    expected = expected_tensors(config)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{where} (missing tensors {missing[:5]}, unexpected {extra[:5]})")
    for name, shape in expected.items():
        spec = tensors[name]
        if not isinstance(spec, dict) or spec.get("shape") != shape:
            found = spec.get("shape") if isinstance(spec, dict) else spec
            raise ValueError(f"{where}: tensor {name!r} is {found} in the weights, the config makes it {shape}")
        if spec.get("dtype") not in WEIGHT_DTYPES:
            raise ValueError(
                f"{where}: tensor {name!r} has dtype {spec.get('dtype')!r}, want one of {sorted(WEIGHT_DTYPES)}"
            )


def _read_catalog(verified: VerifiedVersion, config: ModelConfig) -> Catalog:
    """Parse and check catalog.json against the config before the trie is built from it."""
    where = f"version {verified.version}: {CATALOG}"
    # Bytes are read once and re-hashed (read_verified_file): a file swapped after verification is refused.
    doc = json.loads(read_verified_file(verified, CATALOG))
    if not isinstance(doc, dict):
        raise ValueError(f"{where} is not a JSON object")
    item_ids, codes, popular = doc.get("item_ids"), doc.get("codes"), doc.get("popular", [])
    if doc.get("level_sizes") != config.level_sizes:
        raise ValueError(f"{where}: level sizes {doc.get('level_sizes')!r} != the model's {config.level_sizes}")
    if not isinstance(item_ids, list) or not item_ids or not all(isinstance(i, (str, int)) for i in item_ids):
        raise ValueError(f"{where}: item_ids must be a non-empty list of ids")
    ids = [str(i) for i in item_ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: item ids are not unique")
    depth = config.depth
    if (
        not isinstance(codes, list)
        or len(codes) != len(ids)
        or not all(isinstance(row, list) and len(row) == depth for row in codes)
        or not all(type(c) is int for row in codes for c in row)
    ):
        raise ValueError(f"{where}: codes must be {len(ids)} lists of {depth} integers")
    n = len(ids)
    if not isinstance(popular, list) or not all(type(i) is int and 0 <= i < n for i in popular):
        raise ValueError(f"{where}: popular must list item indices in [0, {n})")
    if config.candidate_tokens and n != config.catalogue_items:
        raise ValueError(f"{where}: {n} items, but the model has neighbour lists for {config.catalogue_items}")
    return Catalog.from_codes(ids, np.asarray(codes, dtype=np.int64), list(config.level_sizes), list(popular))


def _version_info(verified: VerifiedVersion) -> VersionInfo:
    """Config, shape check and catalogue of a verified version: everything but the weights.

    The order matters: the config is checked against its bounds and the weights' shapes before
    anything is allocated from it, and the catalogue is checked against the config before its trie
    is built.
    """
    config = check_model_config(verified.manifest.get("model_config"), verified.version)
    check_weights_fit(config, verified.manifest["tensors"], verified.version)
    catalog = _read_catalog(verified, config)
    return VersionInfo(verified.name, verified.version, verified.path, verified.manifest, time.time(), config, catalog)


def _build(verified: VerifiedVersion, device: str, kernel_backend: str | None = None) -> ModelBundle:
    info = _version_info(verified)  # refuses a config that does not fit the weights before allocating
    state = load(read_verified_file(verified, WEIGHTS))
    model = OneRecModel(info.config)
    model.load_state_dict(state, strict=True)
    if info.config.candidate_tokens:  # the catalogue the weights were trained with (no overlay applied yet)
        model.check_neighbours()
        model.set_catalogue(info.catalog.trie.tensors.item_codes[: info.config.catalogue_items])
    generator = Generator(model, info.catalog.trie, device=device, kernel_backend=kernel_backend)
    return ModelBundle(**vars(info), model=model, generator=generator)
