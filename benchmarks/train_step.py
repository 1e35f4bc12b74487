"""Time per training step of the default recipe's model on a real sequence file: random batches
against length-sorted ones (``TrainConfig.sorted_chunk_batches``).

Why: a batch pads every history to its longest, and on a Beauty-sized file nearly every random batch
holds one history of the full window, so most of the encoder's work was padding. The benchmark takes
the recipe's model (``onerec.build.sequence_file_config``) with the catalogue's real sizes, random
distinct code paths (a step's cost does not depend on which codes an item has), the file's training
samples and their leave-user-out candidates, and runs both batch orders in alternating rounds of
``--steps`` optimizer steps on one thread, so both see the same load. It prints JSON: per order, the
median and min milliseconds per step over the rounds, samples per second at the median, and the mean
padded history width of the batches timed; and the speed-up (median over median).

    .venv/bin/python -m benchmarks.train_step --dataset ../shared/data/amazon-beauty/sequences.txt
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from onerec.build import sequence_file_config
from onerec.data import leave_one_out, load_sequence_file
from onerec.model import OneRecModel
from onerec.tokenizer import codebook_size
from onerec.train import SessionSamples, TrainConfig, length_sorted_batches


def random_paths(n_items: int, level_sizes: list[int], seed: int) -> np.ndarray:
    """(n_items, D) distinct code paths drawn at random from the codebook."""
    rng = np.random.default_rng(seed)
    flat = rng.choice(int(np.prod(level_sizes)), n_items, replace=False)
    return np.stack(np.unravel_index(flat, level_sizes), 1).astype(np.int64)


def time_steps(
    model: OneRecModel,
    opt: torch.optim.Optimizer,
    samples: SessionSamples,
    batches: list[np.ndarray],
    tcfg: TrainConfig,
) -> tuple[float, float]:
    """Seconds per step over these batches and their mean padded history width."""
    widths = []
    t0 = time.perf_counter()
    for idx in batches:
        hist, mask, user, target, target_mask = samples.batch(idx)
        widths.append(hist.shape[1])
        loss, balance = model(
            hist, mask, user, target, target_mask,
            slot_weights=tcfg.slot_weights, candidates=samples.batch_candidates(idx, torch.device("cpu")),
        )  # fmt: skip
        opt.zero_grad(set_to_none=True)
        (loss + tcfg.balance_weight * balance).backward()
        opt.step()
    return (time.perf_counter() - t0) / len(batches), float(np.mean(widths))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="a sequence file (one user per line: user item item ...)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per round and order")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--chunk-batches", type=int, default=50, help="batches per length-sorted chunk (> 0)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    recipe = sequence_file_config(args.dataset)
    chunks = args.chunk_batches
    if chunks <= 0:
        raise SystemExit(f"--chunk-batches must be > 0, got {chunks}")
    data = load_sequence_file(args.dataset)
    split = leave_one_out(data)
    k = codebook_size(data.n_items, recipe.levels)
    level_sizes = [k] * recipe.levels + [32]  # the extra level: room for a group of colliding items
    codes = random_paths(data.n_items, level_sizes, args.seed)
    cfg = replace(recipe.model, level_sizes=level_sizes, catalogue_items=data.n_items, candidate_backward=0.25)
    model = OneRecModel(cfg)
    model.set_catalogue(torch.from_numpy(codes))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.train.lr)
    samples = SessionSamples(split.train, data.user_ids, codes, cfg)
    lengths = samples.history_lengths()
    rng = np.random.default_rng(args.seed)
    batch = recipe.train.batch_size
    orders = {"random": 0, "length_sorted": chunks}
    runs: dict[str, list[float]] = {name: [] for name in orders}
    widths: dict[str, list[float]] = {name: [] for name in orders}
    for c in orders.values():  # warm-up, untimed
        time_steps(
            model,
            opt,
            samples,
            length_sorted_batches(rng.permutation(len(samples)), lengths, batch, c, rng)[:3],
            recipe.train,
        )
    for _ in range(args.rounds):
        for name, c in orders.items():
            batches = length_sorted_batches(rng.permutation(len(samples)), lengths, batch, c, rng)[: args.steps]
            seconds, width = time_steps(model, opt, samples, batches, recipe.train)
            runs[name].append(seconds)
            widths[name].append(width)
    report: dict[str, Any] = {
        "dataset": args.dataset,
        "samples": len(samples),
        "history_window": cfg.history_window,
        "mean_history_length": float(lengths.mean()),
        "batch_size": batch,
        "chunk_batches": chunks,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": 1,
    }
    for name in orders:
        med = statistics.median(runs[name])
        report[name] = {
            "ms_per_step_median": med * 1e3,
            "ms_per_step_min": min(runs[name]) * 1e3,
            "samples_per_s_median": batch / med,
            "mean_padded_width": float(np.mean(widths[name])),
        }
    report["speedup_median"] = statistics.median(runs["random"]) / statistics.median(runs["length_sorted"])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
