"""Quality benchmark: full-ranking Recall/NDCG on a real sequence file against published baselines.

    python benchmarks/quality.py [--dataset ../shared/data/amazon-beauty/sequences.txt]
                                 [--store DIR] [--epochs N] [--device cpu|cuda] [--reuse] [--out FILE]

Runs the offline pipeline (``onerec.build.sequence_file_config``: semantic IDs from the training
interactions, the MoE encoder-decoder, leave-one-out evaluation over every user with beam 20 in items
mode) and prints one JSON report: our test metrics next to most-popular (computed in the same run),
TIGER's published figures on the same data and protocol, and DESIGN.md's goal, with the ratio to
TIGER and whether the goal is met. ``--reuse`` skips training and reads the metrics that the newest
published version of ``--store`` recorded in its manifest when it was built.

The training is the slow part: about 5 min per epoch on 2 CPU cores for Beauty (488 steps of
256 samples); use ``--device cuda`` where there is a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]  # benchmarks/kernels.py shadows kernels
sys.path.insert(0, str(BENCH_DIR.parent))

from model_store.store import list_models, load_newest_valid  # noqa: E402
from onerec.build import build, sequence_file_config  # noqa: E402

DEFAULT_DATASET = BENCH_DIR.parent.parent / "shared" / "data" / "amazon-beauty" / "sequences.txt"
METRICS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
# Published on Amazon Beauty, leave-one-out, full ranking (../shared/data/amazon-beauty/README.md).
REFERENCES = {
    "TIGER (Rajput et al. 2023)": {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384},
    "TIGER + UniSID (as quoted)": {"recall@5": 0.0482, "ndcg@5": 0.0323, "recall@10": 0.0741, "ndcg@10": 0.0406},
}
GOAL = {"recall@10": 0.075, "ndcg@10": 0.042}  # DESIGN.md section 9


def manifest_of_newest(store: Path) -> dict[str, Any]:
    models = list_models(store)
    if len(models) != 1:
        raise SystemExit(f"--reuse: {store} holds models {models}; expected exactly one")
    verified, _ = load_newest_valid(store, models[0])
    return {"name": models[0], "version": verified.version, **verified.manifest}


def report(manifest: dict[str, Any], seconds: float | None) -> dict[str, Any]:
    """The model's recorded test metrics beside most-popular, the published references and the goal."""
    metrics = manifest["metrics"]
    ours = {k: metrics["test"][k] for k in METRICS}
    rows = {"ours": ours, "most popular (same run)": {k: metrics["test_most_popular"][k] for k in METRICS}}
    dataset = str(manifest.get("dataset", {}).get("path", manifest.get("dataset", {}).get("kind")))
    on_beauty = "amazon-beauty" in dataset  # the published figures and the goal are for Beauty only
    if on_beauty:
        rows.update(REFERENCES)
    tiger = REFERENCES["TIGER (Rajput et al. 2023)"]
    train = manifest.get("train", {})
    return {
        "benchmark": "quality",
        "dataset": dataset,
        "model": {"name": manifest["name"], "version": manifest["version"], "config": manifest.get("model_config")},
        "protocol": "leave-one-out, full ranking over the catalogue, items mode, beam 20, history <= 20, all users",
        "train": {k: train.get(k) for k in ("epochs", "steps", "samples", "seconds", "best_epoch")},
        "test": rows,
        "valid": {k: metrics["valid"][k] for k in METRICS},
        "ratio_to_tiger": {k: round(ours[k] / tiger[k], 3) for k in METRICS} if on_beauty else None,
        "goal": GOAL if on_beauty else None,
        "meets_goal": all(ours[k] >= v for k, v in GOAL.items()) if on_beauty else None,
        "legality_unconstrained": metrics.get("legality_unconstrained"),
        "seconds": seconds,
    }


def table(rep: dict[str, Any]) -> str:
    lines = [f"{'test':<30} " + " ".join(f"{k:>10}" for k in METRICS)]
    for name, row in rep["test"].items():
        lines.append(f"{name:<30} " + " ".join(f"{row[k]:>10.4f}" for k in METRICS))
    if rep["goal"] is not None:
        lines.append(f"goal R@10 >= {GOAL['recall@10']}, N@10 >= {GOAL['ndcg@10']}: met = {rep['meets_goal']}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--store", type=Path, default=Path("/tmp/onerec-quality-store"))
    p.add_argument("--epochs", type=int, default=None, help="default: the config's 30")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--reuse", action="store_true", help="report the newest version already in --store")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not args.reuse and not args.dataset.exists():
        raise SystemExit(f"--dataset {args.dataset} does not exist (the shared data sits beside the checkout)")

    seconds = None
    if args.reuse:
        manifest = manifest_of_newest(args.store)
    else:
        cfg = sequence_file_config(str(args.dataset))
        cfg.train.device = args.device
        if args.epochs is not None:
            cfg.train.epochs = args.epochs
        started = time.perf_counter()
        published, _ = build(cfg, args.store, progress=not args.quiet)
        seconds = round(time.perf_counter() - started, 1)
        manifest = manifest_of_newest(args.store)
        assert manifest["version"] == published.version
    rep = report(manifest, seconds)
    print(table(rep), file=sys.stderr)
    text = json.dumps(rep, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
