"""Random-weight models bigger than the demo, published into a store (the serving benchmark's ``--random-model``).

Only speed is measured with them: the catalogue is a random bijection onto semantic-ID paths and
the weights are untrained, published through onerec's own bundle API so the service loads them like
any trained version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Bigger shapes than the demo, with random weights (speed only): published through onerec's own
# bundle API so the service loads them like any trained version.
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "medium": {
        "items": 20000,
        "model": {"level_sizes": [256, 256, 256], "session_items": 5, "history_window": 50, "d_model": 256,
                  "n_heads": 8, "n_encoder_layers": 4, "n_decoder_layers": 4, "d_ff": 512, "n_experts": 8,
                  "experts_top_k": 2, "user_buckets": 10000, "dropout": 0.0},
    },
    "large": {
        "items": 100000,
        "model": {"level_sizes": [1024, 1024, 1024], "session_items": 5, "history_window": 100, "d_model": 512,
                  "n_heads": 8, "n_encoder_layers": 6, "n_decoder_layers": 6, "d_ff": 1024, "n_experts": 16,
                  "experts_top_k": 2, "user_buckets": 10000, "dropout": 0.0},
    },
}  # fmt: skip


def make_random_store(root: Path, preset: str, seed: int = 0) -> Path:
    """Publish a random-weight model of a preset size with a random bijective catalogue; returns the store."""
    import numpy as np
    import torch

    from onerec.bundle import Catalog, save_bundle
    from onerec.model import ModelConfig, OneRecModel

    shape = RANDOM_PRESETS[preset]
    cfg = ModelConfig(**shape["model"])
    torch.manual_seed(seed)
    model = OneRecModel(cfg)
    rng = np.random.default_rng(seed)
    total = int(np.prod(cfg.level_sizes))
    flat = rng.choice(total, size=shape["items"], replace=False)
    codes = np.stack(np.unravel_index(flat, cfg.level_sizes), axis=1).astype(np.int64)
    item_ids = [str(i) for i in range(shape["items"])]
    catalog = Catalog.from_codes(item_ids, codes, list(cfg.level_sizes), list(range(200)))
    save_bundle(
        root,
        f"random-{preset}",
        model,
        catalog,
        {"dataset": {"kind": "random"}, "seed": seed, "note": "random weights: for speed benchmarks"},
    )
    return root
