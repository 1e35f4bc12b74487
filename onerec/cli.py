"""The ``onerec`` command line.

Offline commands (build, eval, recommend) live here. Other packages add theirs through the entry-point
group ``onerec.commands`` (pyproject: ``serve``/``features`` from ``service.cli``, ``replay``/``traffic``
from ``loadtest.cli``): each entry is a ``register(subparsers)`` function. So this package names
nothing above it, each package owns its commands, and a package that is not installed adds none.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the build pulls in torch: imported where a command runs, not at parse time
    from onerec.build import BuildConfig

COMMAND_GROUP = "onerec.commands"


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"onerec {args.command}: error: {exc}", file=sys.stderr)
        return 2


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onerec", description="OneRec generative recommender: build, evaluate, serve."
    )
    sub = parser.add_subparsers(dest="command")
    _add_build(sub)
    _add_eval(sub)
    _add_recommend(sub)
    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        entry.load()(sub)
    return parser


def _add_build(sub: Any) -> None:
    p = sub.add_parser("build", help="offline pipeline: data -> semantic IDs -> training -> eval -> model store")
    p.add_argument("--dataset", default="synthetic", help="'synthetic' or a sequence file (user item item ...)")
    p.add_argument("--out", required=True, type=Path, help="model store directory")
    p.add_argument("--name", default=None, help="model name in the store (default: demo / the file's stem)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--ipa-iterations", type=int, default=0)
    p.add_argument(
        "--ipa-reward", default=None,
        help="the reward IPA ranks beams by (default: cooccurrence, with the first-slot anchor in place of L_NTP; "
        "learned: the paper's reward model and loss)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--processes", type=int, default=None,
        help="data-parallel training processes on CPU, at most one per core (default: the recipe's, 1)",
    )  # fmt: skip
    p.add_argument("--eval-users", type=int, default=None, help="evaluate on at most this many users")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_build)


def _run_build(args: argparse.Namespace) -> int:
    from onerec.build import build, print_summary

    _, summary = build(build_config(args), args.out, progress=not args.quiet)
    print_summary(summary)
    print(json.dumps(summary, indent=2))
    return 0


def build_config(args: argparse.Namespace) -> BuildConfig:
    """The recipe ``onerec build`` runs: the demo's or the sequence file's, with the flags applied."""
    from onerec.build import demo_config, sequence_file_config
    from onerec.ipa import IpaConfig
    from onerec.reward import REWARDS

    if args.dataset == "synthetic":
        cfg = demo_config()
    elif Path(args.dataset).is_file():
        cfg = sequence_file_config(args.dataset)
    else:
        raise FileNotFoundError(f"--dataset {args.dataset}: no such file (or use 'synthetic')")
    cfg.name = args.name or cfg.name
    if args.epochs is not None:  # an explicit epoch count replaces the step target (and its time budget)
        cfg.train.epochs = args.epochs
        cfg.train_steps = None
        cfg.train.time_budget_s = None
    cfg.train.device = args.device
    if args.processes is not None:
        if args.processes < 1:
            raise ValueError(f"--processes {args.processes}: must be at least 1")
        cfg.train.processes = args.processes
    cfg.ipa_iterations = args.ipa_iterations
    if args.ipa_reward not in (None, *REWARDS):
        raise ValueError(f"--ipa-reward {args.ipa_reward}: want one of {', '.join(REWARDS)}")
    if args.ipa_reward == "learned":  # the paper's recipe: its reward model and its loss
        cfg.ipa_reward, cfg.ipa = "learned", IpaConfig()
    cfg.eval_users = args.eval_users
    return cfg


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="full-ranking Recall@K / NDCG@K of a model version (leave-one-out)")
    p.add_argument("--model", required=True, type=Path, help="a version directory STORE/NAME/VERSION")
    p.add_argument("--dataset", required=True, help="'synthetic' (regenerated from the manifest's seed) or a path")
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--k", type=int, nargs="+", default=[5, 10])
    p.add_argument("--beam", type=int, default=20)
    p.add_argument("--max-users", type=int, default=None)
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from onerec.bundle import load_bundle
    from onerec.data import SyntheticConfig, leave_one_out, load_sequence_file, make_synthetic
    from onerec.evaluate import evaluate_split

    bundle = load_bundle(args.model)
    if args.dataset == "synthetic":
        recorded = bundle.manifest.get("dataset", {}).get("synthetic_config")
        if recorded is None:
            raise ValueError(f"{args.model} was not built on the synthetic world; pass its sequence file")
        data = make_synthetic(SyntheticConfig(**recorded)).data
    else:
        data = load_sequence_file(args.dataset)
    split = leave_one_out(data)
    # The dataset's internal indices may differ from the model's: map through external ids.
    known = [bundle.item_index(item) for item in data.item_ids]
    model_index = np.array([-1 if i is None else i for i in known], dtype=np.int64)
    ranked = evaluate_split(
        bundle.generator,
        split.eval_set(args.split),
        data.user_ids,
        split.train_popularity(),
        ks=args.k,
        beam_width=args.beam,
        max_users=args.max_users,
        model_index=model_index,
    )
    out = {
        "model": {"name": bundle.name, "version": bundle.version},
        "split": args.split,
        "users": ranked.users,
        "beam": args.beam,
        "metrics": ranked.model,
        "most_popular": ranked.most_popular,
    }
    print(json.dumps(out, indent=2))
    return 0


def _add_recommend(sub: Any) -> None:
    p = sub.add_parser("recommend", help="one recommendation from the newest model, printed as the HTTP response JSON")
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--name", default=None)
    p.add_argument("--history", default="", help="comma-separated item ids, oldest first")
    p.add_argument("--user-id", default="cli")
    # no argparse choices: the modes live in onerec.generate (MODES), which imports torch; the
    # request is checked there and a bad mode is named before anything runs
    p.add_argument("--mode", default="session", help="session or items (onerec.generate.MODES)")
    p.add_argument("--beam-width", type=int, default=32)
    p.add_argument("--num-items", type=int, default=10)
    p.add_argument("--exclude", default="", help="comma-separated item ids never to return")
    p.add_argument("--repeat", type=int, default=1, help="run N times and report latency percentiles")
    p.set_defaults(func=_run_recommend)


def _run_recommend(args: argparse.Namespace) -> int:
    import time
    import uuid

    from onerec.bundle import load_newest_bundle
    from onerec.generate import MODES, RecRequest

    if args.mode not in MODES:
        print(f"onerec recommend: --mode must be one of {', '.join(MODES)}, got {args.mode!r}", file=sys.stderr)
        return 2
    bundle, _ = load_newest_bundle(args.store, args.name)
    ids = [s for s in args.history.split(",") if s.strip()]
    known = [bundle.item_index(s.strip()) for s in ids]
    excl = [bundle.item_index(s.strip()) for s in args.exclude.split(",") if s.strip()]
    req = RecRequest(
        history=[i for i in known if i is not None],
        num_items=args.num_items,
        mode=args.mode,
        beam_width=args.beam_width,
        exclude=[i for i in excl if i is not None],
        user_id=args.user_id,
    )
    bundle.warmup()
    latencies = []
    for _ in range(max(1, args.repeat)):
        t0 = time.perf_counter()
        results, _stats = bundle.generator.generate([req])
        latencies.append((time.perf_counter() - t0) * 1000)
    out: dict[str, Any] = {
        "request_id": str(uuid.uuid4()),
        "model": {"name": bundle.name, "version": str(bundle.version)},
        "items": [
            {"item_id": bundle.item_id(it.item), "score": round(it.score, 4), "semantic_id": list(it.semantic_id)}
            for it in results[0].items
        ],
        "degraded": False,
    }
    if args.repeat > 1:
        lat = sorted(latencies)
        out["latency_ms"] = {
            "p50": round(lat[len(lat) // 2], 2),
            "p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2),
            "runs": len(lat),
        }
    ignored = sum(1 for i in known if i is None)
    if ignored:
        print(f"onerec recommend: ignored {ignored} unknown history item ids", file=sys.stderr)
    print(json.dumps(out, indent=2))
    return 0
