"""Versioned model artifacts: atomic publish, verification and newest-valid selection (files only).

Layout: STORE/NAME/VERSION/{manifest.json, model.safetensors, catalog.*}. No torch and no onerec
imports, so the service can verify a version before any framework touches its bytes.
"""

from model_store.overlay import OVERLAY, CatalogOverlay, OverlayError, overlay_path, read_overlay, write_overlay
from model_store.safetensors_header import HeaderError, parse_header, read_header, tensor_specs
from model_store.store import (
    MANIFEST,
    SCHEMA_VERSION,
    WEIGHTS,
    CorruptVersionError,
    NoValidVersionError,
    PublishedVersion,
    RefusalMemory,
    Rejection,
    Selected,
    VerifiedVersion,
    list_models,
    list_versions,
    load_newest_valid,
    publish_version,
    read_verified_file,
    select_version,
    verify_version,
    version_fingerprint,
)

__all__ = [
    "OVERLAY",
    "CatalogOverlay",
    "OverlayError",
    "overlay_path",
    "read_overlay",
    "write_overlay",
    "MANIFEST",
    "SCHEMA_VERSION",
    "WEIGHTS",
    "CorruptVersionError",
    "HeaderError",
    "NoValidVersionError",
    "PublishedVersion",
    "Rejection",
    "RefusalMemory",
    "Selected",
    "VerifiedVersion",
    "list_models",
    "list_versions",
    "load_newest_valid",
    "parse_header",
    "publish_version",
    "read_header",
    "read_verified_file",
    "select_version",
    "tensor_specs",
    "verify_version",
    "version_fingerprint",
]
