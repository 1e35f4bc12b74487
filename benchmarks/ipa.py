"""IPA benchmark: what preference alignment buys on the synthetic world, judged by the TRUE affinity.

    python benchmarks/ipa.py [--quick] [--iterations N] [--out FILE]

Builds the demo generator (``onerec.build.demo_config``) on the default synthetic world, trains the
reward model on the observed training sequences only, runs IPA, and prints one JSON report:

* ``true_affinity``: mean over fixed evaluation users of sum_i true_affinity[u, i] over the items of
  the model's top (beam 0) session, before and after IPA; the reward never saw this quantity.
* ``recall@10`` / ``ndcg@10``: leave-one-out full-ranking metrics (items mode) on the test split,
  before and after, so a gain in affinity is not bought by forgetting what users actually do next.

``--quick`` trains fewer epochs and evaluates on fewer users (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

# Run as a script, Python puts benchmarks/ first on sys.path, where benchmarks/kernels.py would shadow
# the kernels package: drop it and put the repository root first.
BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
sys.path.insert(0, str(BENCH_DIR.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from onerec.build import demo_config  # noqa: E402
from onerec.bundle import Catalog  # noqa: E402
from onerec.data import leave_one_out, make_synthetic  # noqa: E402
from onerec.evaluate import evaluate_generator, popularity_ranking  # noqa: E402
from onerec.generate import Generator  # noqa: E402
from onerec.ipa import IpaConfig, run_ipa, true_session_affinity  # noqa: E402
from onerec.model import OneRecModel  # noqa: E402
from onerec.reward import train_reward  # noqa: E402
from onerec.tokenizer import item_embeddings, residual_semantic_ids  # noqa: E402
from onerec.train import train_model  # noqa: E402


def ranking(model: OneRecModel, catalog: Catalog, split: Any, user_ids: list[str], users: int) -> dict[str, float]:
    rows = split.test
    hist = rows.truncated(model.cfg.max_history)[:users]
    ids = [user_ids[u] for u in rows.users[:users]]
    gen = Generator(model, catalog.trie)
    return evaluate_generator(gen, hist, rows.targets[:users], ids, ks=(10,), beam_width=20, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = demo_config()
    if args.quick:
        cfg.train = replace(cfg.train, epochs=3)
    iterations = args.iterations or (1 if args.quick else 2)
    eval_users = 200 if args.quick else None
    ipa_cfg = IpaConfig(share=0.05 if args.quick else 0.1, min_users=32, n_sessions=16, epochs=2)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    world = make_synthetic(cfg.synthetic)
    data = world.data
    split = leave_one_out(data)
    emb = item_embeddings(split.train, data.n_items, cfg.embedding_dim, seed=0)
    sids = residual_semantic_ids(emb, cfg.levels, cfg.codes_per_level, seed=0)
    level_sizes = list(sids.level_sizes)
    catalog = Catalog.from_codes(
        data.item_ids, sids.codes, level_sizes, popularity_ranking(split.train_popularity(), 10)
    )
    model = OneRecModel(replace(cfg.model, level_sizes=level_sizes))
    train_model(model, split.train, data.user_ids, sids.codes, cfg.train, progress=False)
    timings["generator_train"] = time.perf_counter() - t

    n_eval = len(split.test) if eval_users is None else min(eval_users, len(split.test))
    aff_users = np.arange(min(128, data.n_users))
    aff_hist = [split.train[u] for u in aff_users]
    aff_ids = [data.user_ids[u] for u in aff_users]
    affinity = world.true_affinity(aff_users)

    def measure(m: OneRecModel) -> dict[str, float]:
        out = ranking(m, catalog, split, data.user_ids, n_eval)
        out["true_affinity"] = true_session_affinity(m, catalog.trie, affinity, aff_hist, aff_ids)
        return out

    before = measure(model)
    t = time.perf_counter()
    rcfg = replace(cfg.reward, session_items=cfg.model.session_items, max_history=cfg.model.max_history)
    reward, reward_report = train_reward(split.train, sids.codes, level_sizes, rcfg, progress=False)
    timings["reward_train"] = time.perf_counter() - t
    t = time.perf_counter()
    aligned, report = run_ipa(
        model, reward, catalog.trie, split.train, data.user_ids, sids.codes, iterations, ipa_cfg, progress=False
    )
    timings["ipa"] = time.perf_counter() - t
    after = measure(aligned)

    result = {
        "benchmark": "ipa",
        "quick": args.quick,
        "world": cfg.synthetic.as_dict(),
        "iterations": iterations,
        "ipa_config": {k: getattr(ipa_cfg, k) for k in ipa_cfg.__dataclass_fields__},
        "eval_users": {"ranking": n_eval, "true_affinity": len(aff_users)},
        "true_affinity": {
            "before": before["true_affinity"],
            "after": after["true_affinity"],
            "gain": after["true_affinity"] - before["true_affinity"],
            "relative_gain": after["true_affinity"] / before["true_affinity"] - 1.0,
        },
        "recall@10": {"before": before["recall@10"], "after": after["recall@10"]},
        "ndcg@10": {"before": before["ndcg@10"], "after": after["ndcg@10"]},
        "reward_train_loss": reward_report.train_loss,
        "per_iteration": report.as_dict(),
        "timings_seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print(f"true affinity {before['true_affinity']:.4f} -> {after['true_affinity']:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
