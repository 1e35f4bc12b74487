"""Where a candidate model's hits come from: test targets among its co-occurrence candidates or not.

    python -m benchmarks.candidate_hits --model STORE/NAME/VERSION [--dataset SEQUENCES] [--users N]

For a model built with ``candidate_tokens`` (the default recipe), on a seeded sample of test rows
(leave-one-out, history excluded, items mode, beam 20, as ``onerec serve`` answers): the share of
targets among the K candidates the model computes, and Recall@10 of ours and of the co-occurrence kNN
split by that, plus how many of our top 10 are candidates. It says whether the model uses what its
inputs offer: the kNN ranks exactly those candidates, so where the target is one of them it sets the
bar, and where it is not, only the model can find it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.report import emit
from onerec.baselines import CooccurrenceKnn, rank_all
from onerec.bundle import load_bundle
from onerec.data import leave_one_out, load_sequence_file
from onerec.evaluate import ranked_items
from onerec.generate import RecRequest

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-beauty" / "sequences.txt"


def model_candidates(bundle: Any, histories: list[np.ndarray], users: list[str]) -> np.ndarray:
    """(N, K) catalogue rows (-1 = none) of each history's candidates, as the model computes them when
    serving: from the encoder inputs the generator builds for these requests."""
    generator = bundle.generator
    requests = [RecRequest(history=h.tolist(), user_id=u) for h, u in zip(histories, users)]
    codes, mask, _ = generator._encoder_inputs(requests, bundle.catalog.trie.tensors)
    with torch.no_grad():
        rows, _ = bundle.model.candidates(codes, mask)
    return rows.cpu().numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a version directory (STORE/NAME/VERSION)")
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--users", type=int, default=4000, help="test rows sampled (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)

    data = load_sequence_file(args.dataset)
    split = leave_one_out(data)
    bundle = load_bundle(args.model)
    if not bundle.model.cfg.candidate_tokens:
        raise SystemExit(f"{args.model}: the model has no candidate tokens")
    rng = np.random.default_rng(args.seed)
    rows = rng.choice(len(split.test.targets), min(args.users, len(split.test.targets)), replace=False)
    histories = [np.asarray(split.test.histories[i], dtype=np.int64) for i in rows]
    targets = np.asarray(split.test.targets, dtype=np.int64)[rows]
    users = [data.user_ids[split.test.users[i]] for i in rows]

    cand = model_candidates(bundle, histories, users)
    inside = (cand == targets[:, None]).any(1)
    knn = np.asarray(rank_all(CooccurrenceKnn(split.train, data.n_items).scores(histories), histories, 10))
    knn_hit = (knn == targets[:, None]).any(1)
    ours = ranked_items(bundle.generator, histories, users, top=10, beam_width=20, progress=False)
    ours_hit = np.array([t in r for t, r in zip(targets.tolist(), ours)])
    from_candidates = [len(set(r) & set(c[c >= 0].tolist())) for r, c in zip(ours, cand)]

    def share(hit: np.ndarray, where: np.ndarray) -> float:
        return round(float(hit[where].mean()), 4) if where.any() else float("nan")

    emit(
        {
            "benchmark": "candidate_hits",
            "model": str(args.model),
            "dataset": str(args.dataset),
            "test_rows": len(rows),
            "seed": args.seed,
            "candidate_tokens": int(bundle.model.cfg.candidate_tokens),
            "target_among_candidates": round(float(inside.mean()), 4),
            "recall@10": {"ours": share(ours_hit, np.ones_like(inside)), "knn": share(knn_hit, np.ones_like(inside))},
            "recall@10_target_among_candidates": {"ours": share(ours_hit, inside), "knn": share(knn_hit, inside)},
            "recall@10_target_not_among_candidates": {"ours": share(ours_hit, ~inside), "knn": share(knn_hit, ~inside)},
            "candidates_in_our_top10": round(float(np.mean(from_candidates)), 2),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
