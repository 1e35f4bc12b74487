"""Quality benchmark: full-ranking Recall/NDCG on a real sequence file, ours beside strong simple baselines.

    python -m benchmarks.quality [--dataset ../shared/data/amazon-beauty/sequences.txt]
                                 [--store DIR] [--epochs N] [--device cpu|cuda] [--reuse]
                                 [--baselines-from REPORT.json] [--no-sasrec] [--out FILE]

Runs the default offline pipeline (``onerec.build.sequence_file_config``, exactly what
``onerec build --dataset PATH`` runs) and prints one JSON report. Every row is measured on the same
leave-one-out split, the same users (all of them) and the same full-ranking metrics, and, as the
service answers, no row ever returns an item of the user's own history:
- ours: the generative model's trie-constrained beam search in items mode (what ``onerec serve``
  answers), as recorded in the version's manifest;
- most popular;
- the co-occurrence item-kNN (window 3, 1/distance, last 3 history items weighted 1, .5, .25,
  popularity fill: ``onerec.baselines.CooccurrenceKnn``), symmetric (the issue's recipe) and directed
  with the backward weight the build chooses for the model's candidates, and directed and faded
  (each pair weighed down by its age in its sequence, the scale chosen as the build chooses it);
- SASRec trained with the full softmax cross-entropy (``onerec.baselines``), best validation epoch;
- TIGER's published figures on this data and protocol, and DESIGN.md's goal.
``--reuse`` skips training and reads the newest published version of ``--store``;
``--baselines-from`` copies the measured baselines from an earlier report of the same dataset;
``--baselines-only`` measures the baselines alone (``--sasrec-seed`` picks SASRec's seed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import emit
from model_store.store import list_models, load_newest_valid
from onerec.baselines import (
    CooccurrenceKnn,
    SASRecConfig,
    evaluate_scorer,
    most_popular_scores,
    sasrec_scores,
    train_sasrec,
)
from onerec.build import (
    CANDIDATE_DECAY_LENGTHS,
    build,
    choose_candidate_backward,
    choose_candidate_decay,
    sequence_file_config,
)
from onerec.data import leave_one_out, load_sequence_file

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATASET = REPO_ROOT.parent / "shared" / "data" / "amazon-beauty" / "sequences.txt"
METRICS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
# Published on Amazon Beauty, leave-one-out, full ranking (../shared/data/amazon-beauty/README.md).
REFERENCES = {
    "TIGER (Rajput et al. 2023)": {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384},
    "TIGER + UniSID (as quoted)": {"recall@5": 0.0482, "ndcg@5": 0.0323, "recall@10": 0.0741, "ndcg@10": 0.0406},
}
GOAL = {"recall@10": 0.085, "ndcg@10": 0.050}  # DESIGN.md section 9
# The kNN on the count the model's candidates use, with its backward weight chosen as the build chooses it.
DIRECTED_KNN = "co-occurrence item-kNN, directed (the candidates' count)"
# The same with each pair faded by its age, the scale chosen among the build's choices (choose_candidate_decay).
FADED_KNN = "co-occurrence item-kNN, directed and faded"


def manifest_of_newest(store: Path) -> dict[str, Any]:
    models = list_models(store)
    if len(models) != 1:
        raise SystemExit(f"--reuse: {store} holds models {models}; expected exactly one")
    verified, _ = load_newest_valid(store, models[0])
    return {"name": models[0], "version": verified.version, **verified.manifest}


def measure_baselines(
    dataset: Path, sasrec: bool, progress: bool, sasrec_minutes: float | None = None, sasrec_seed: int = 0
) -> dict[str, Any]:
    """Most popular, the co-occurrence kNN and (optionally) SASRec on the test rows of `dataset`."""
    data = load_sequence_file(dataset)
    split = leave_one_out(data)
    hist, targets = split.test.histories, split.test.targets
    out: dict[str, Any] = {}
    started = time.perf_counter()
    popularity = most_popular_scores(split.train, data.n_items)
    out["most popular"] = {
        **evaluate_scorer(lambda h: np.tile(popularity, (len(h), 1)), hist, targets),
        "seconds": round(time.perf_counter() - started, 1),
    }
    started = time.perf_counter()
    knn = CooccurrenceKnn(split.train, data.n_items)
    out["co-occurrence item-kNN"] = {
        **evaluate_scorer(knn.scores, hist, targets),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"[quality] kNN: {json.dumps(out['co-occurrence item-kNN'])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    recipe = sequence_file_config(str(dataset))
    backward, recall = choose_candidate_backward(
        split.train, split.valid, data.n_items, recipe.model.candidate_tokens, recipe.candidate_backward_choices
    )
    directed = CooccurrenceKnn(split.train, data.n_items, backward=backward)
    out[DIRECTED_KNN] = {
        **evaluate_scorer(directed.scores, hist, targets),
        "backward": backward,
        "valid_candidate_recall_by_backward": recall,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"[quality] directed kNN: {json.dumps(out[DIRECTED_KNN])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    decay, ndcg = choose_candidate_decay(
        split.train, split.valid, data.n_items, recipe.model.candidate_tokens, backward, CANDIDATE_DECAY_LENGTHS
    )
    faded = CooccurrenceKnn(split.train, data.n_items, backward=backward, decay=decay)
    out[FADED_KNN] = {
        **evaluate_scorer(faded.scores, hist, targets),
        "backward": backward,
        "decay": decay,
        "valid_candidate_ndcg_by_decay": ndcg,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"[quality] faded kNN: {json.dumps(out[FADED_KNN])}", file=sys.stderr, flush=True)
    if sasrec:
        started = time.perf_counter()
        cfg = SASRecConfig(time_budget_s=None if sasrec_minutes is None else 60.0 * sasrec_minutes, seed=sasrec_seed)
        model, rep = train_sasrec(
            split.train, data.n_items, cfg, split.valid.histories, split.valid.targets, progress=progress
        )
        out["SASRec (full softmax CE)"] = {
            **evaluate_scorer(lambda h: sasrec_scores(model, h), hist, targets),
            "seconds": round(time.perf_counter() - started, 1),
            "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
            "train": rep.as_dict(),
        }
        print(f"[quality] SASRec: {json.dumps(out['SASRec (full softmax CE)'])}", file=sys.stderr, flush=True)
    return out


def report(manifest: dict[str, Any], seconds: float | None, baselines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Our recorded test metrics beside the measured baselines, the published references and the goal."""
    metrics = manifest["metrics"]
    ours = {k: metrics["test"][k] for k in METRICS}
    rows: dict[str, dict[str, float]] = {"ours": ours}
    if baselines:
        rows.update(metric_rows(baselines))
    else:
        rows["most popular (same run)"] = {k: metrics["test_most_popular"][k] for k in METRICS}
    measured = [name for name in rows if name != "ours"]
    dataset = str(manifest.get("dataset", {}).get("path", manifest.get("dataset", {}).get("kind")))
    on_beauty = "amazon-beauty" in dataset  # the published figures and the goal are for Beauty only
    if on_beauty:
        rows.update(REFERENCES)
    tiger = REFERENCES["TIGER (Rajput et al. 2023)"]
    train = manifest.get("train", {})
    beats = {name: {k: ours[k] > rows[name][k] for k in ("recall@10", "ndcg@10")} for name in rows if name != "ours"}
    return {
        "benchmark": "quality",
        "dataset": dataset,
        "model": {"name": manifest["name"], "version": manifest["version"], "config": manifest.get("model_config")},
        "protocol": "leave-one-out, full ranking over the catalogue, all users, no item of the user's history; "
        "ours: items mode, constrained beam search, history <= the model's history_window",
        "train": {k: train.get(k) for k in ("epochs", "steps", "samples", "seconds", "best_epoch")},
        "test": rows,
        "valid": {k: metrics["valid"][k] for k in METRICS},
        "session_mode": {k: metrics[k] for k in ("valid_session", "test_session") if k in metrics},
        "baselines": baselines,
        "beats": beats,
        "beats_every_measured_baseline": all(all(beats[name].values()) for name in measured),
        "ratio_to_tiger": {k: round(ours[k] / tiger[k], 3) for k in METRICS} if on_beauty else None,
        "goal": GOAL if on_beauty else None,
        "meets_goal": all(ours[k] >= v for k, v in GOAL.items()) if on_beauty else None,
        "legality_unconstrained": metrics.get("legality_unconstrained"),
        "legality_constrained": metrics.get("legality_constrained"),
        "build_seconds": manifest.get("build_seconds"),
        "seconds": seconds,
    }


def metric_rows(measured: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each measured row's four test metrics, without its timings and training details."""
    return {name: {k: row[k] for k in METRICS} for name, row in measured.items()}


def metric_lines(rows: dict[str, dict[str, float]]) -> list[str]:
    width = max([30, *(len(name) for name in rows)])
    return [f"{'test':<{width}} " + " ".join(f"{k:>10}" for k in METRICS)] + [
        f"{name:<{width}} " + " ".join(f"{row[k]:>10.4f}" for k in METRICS) for name, row in rows.items()
    ]


def table(rep: dict[str, Any]) -> str:
    lines = metric_lines(rep["test"])
    lines.append(f"ours beats every measured baseline on R@10 and N@10: {rep['beats_every_measured_baseline']}")
    if rep["goal"] is not None:
        lines.append(f"goal R@10 >= {GOAL['recall@10']}, N@10 >= {GOAL['ndcg@10']}: met = {rep['meets_goal']}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--store", type=Path, default=Path("/tmp/onerec-quality-store"))
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--reuse", action="store_true", help="report the newest version already in --store")
    p.add_argument("--baselines-from", type=Path, default=None, help="take the measured baselines from this report")
    p.add_argument("--no-baselines", action="store_true", help="only most popular, from the manifest")
    p.add_argument("--no-sasrec", action="store_true", help="skip SASRec (minutes of training)")
    p.add_argument("--sasrec-minutes", type=float, default=None, help="cap SASRec's training time (default: none)")
    p.add_argument(
        "--sasrec-seed", type=int, default=0, help="SASRec's seed (its spread over seeds is part of the bar)"
    )
    p.add_argument("--baselines-only", action="store_true", help="measure the baselines on --dataset, build nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not args.reuse and not args.dataset.exists():
        raise SystemExit(f"--dataset {args.dataset} does not exist (the shared data sits beside the checkout)")

    if args.baselines_only:
        started = time.perf_counter()
        measured = measure_baselines(
            args.dataset, not args.no_sasrec, not args.quiet, args.sasrec_minutes, args.sasrec_seed
        )
        rows = metric_rows(measured)
        print("\n".join(metric_lines(rows)), file=sys.stderr)
        out = {"benchmark": "quality baselines", "dataset": str(args.dataset), "test": rows, "baselines": measured}
        emit({**out, "seconds": round(time.perf_counter() - started, 1)}, args.out)
        return
    seconds = None
    if args.reuse:
        manifest = manifest_of_newest(args.store)
    else:
        cfg = sequence_file_config(str(args.dataset))
        cfg.train.device = args.device
        if args.epochs is not None:  # replaces the recipe's step target and time budget
            cfg.train.epochs = args.epochs
            cfg.train_steps = None
            cfg.train.time_budget_s = None
        started = time.perf_counter()
        published, _ = build(cfg, args.store, progress=not args.quiet)
        seconds = round(time.perf_counter() - started, 1)
        manifest = manifest_of_newest(args.store)
        assert manifest["version"] == published.version
    baselines = None
    if args.baselines_from is not None:
        baselines = json.loads(args.baselines_from.read_text(encoding="utf-8"))["baselines"]
    elif not args.no_baselines and "path" in manifest.get("dataset", {}):  # a sequence file, not synthetic
        dataset = Path(manifest["dataset"]["path"])
        baselines = measure_baselines(
            dataset, not args.no_sasrec, not args.quiet, args.sasrec_minutes, args.sasrec_seed
        )
    rep = report(manifest, seconds, baselines)
    print(table(rep), file=sys.stderr)
    emit(rep, args.out)


if __name__ == "__main__":
    main()
