"""IPA benchmark: what preference alignment buys on the synthetic world, judged by the TRUE affinity.

    python -m benchmarks.ipa [--quick] [--seeds 0 1 2] [--iterations N] [--set KEY=VALUE ...] [--out FILE]
                             [--cache DIR]
                             [--reward learned|popularity-oracle|training-frequency|cooccurrence|category]

For each seed: generate the demo synthetic world (``onerec.build.demo_config``, world seed = seed),
build the demo generator on every user's training sequence, then split the users in two:

* the **IPA pool** (two thirds): the reward model trains on these users' training sequences only,
  and IPA samples its users (beam search, preference pairs, L_NTP batches) from them only;
* the **evaluation users** (one third): never seen by the reward model or by IPA. Every figure
  below is measured on them, and the run fails if any of them was sampled.

Reported per seed and as mean +- std over seeds (one JSON document on stdout):

* ``true_affinity``: mean over evaluation users of sum_i true_affinity[u, i] over the items of the
  model's top (beam 0) session in session mode, before and after IPA, and the relative gain; the
  reward never saw this quantity.
* ``recall@10`` / ``ndcg@10``: leave-one-out full-ranking metrics (items mode, beam 20) on the
  evaluation users' test rows, before and after, with the paired difference and its standard error,
  so a gain in affinity is not bought by forgetting what users actually do next.
* ``reward``: AUC of R on the evaluation users (their real next sessions against the sampled
  negatives R is trained to reject), and how R's ranking of the base model's beams agrees with the
  truth on those users (``beam_pair_agreement``: share of beam pairs R orders as the true affinity
  does; the true affinity of R's chosen and rejected beams and of beam 0).

``--quick`` trains the generator for fewer epochs and runs one seed and 2 iterations (a few minutes
on one core); ``--set`` overrides an ``IpaConfig`` field (e.g. ``--set lam=0`` for the NTP-only
control, ``--set constrained=false`` for the plain-softmax DPO log-probs); ``--cache`` keeps the
trained base generators (safetensors) for reruns; ``--reward popularity-oracle`` runs IPA with a
diagnostic reward read from the world's hidden popularity (``PopularityOracle``);
``--reward training-frequency`` with a count prior from the IPA pool's sequences (``FrequencyReward``),
``cooccurrence`` and ``category`` with two personal count estimates from the same sequences
(``CooccurrenceReward``, ``CategoryReward``). ``--set anchor=1`` adds IPA's first-slot KL to the model it
started from (``IpaConfig.anchor``); ``--set train_only=decoder.1,dec_norm,heads`` lets IPA update those weights only;
``--set ntp=0`` drops L_NTP.
The summary's ``goal`` reads the issue's goal off the seeds: mean gain >= 5%, and the mean paired Recall@10
difference no lower than 1.96 standard errors (over seeds) below zero.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from benchmarks.report import emit
from onerec.build import BuildConfig, demo_config
from onerec.bundle import Catalog
from onerec.data import Split, SyntheticWorld, leave_one_out, make_synthetic
from onerec.evaluate import popularity_ranking
from onerec.ipa import (
    IpaConfig,
    UserMeasures,
    compare,
    holdout_users,
    measure_users,
    reward_truth_agreement,
    run_ipa,
)
from onerec.model import OneRecModel
from onerec.reward import CodeReward, CooccurrenceReward, RewardConfig, RewardModel, heldout_auc, train_reward
from onerec.tokenizer import SemanticIds, item_embeddings, residual_semantic_ids
from onerec.train import train_model

HELD_OUT_SHARE = 1 / 3  # users kept out of the reward model and IPA; every figure is measured on them


def ipa_defaults(quick: bool) -> IpaConfig:
    """The benchmark's IPA settings: the library's, with half the pool (200 users) sampled per iteration."""
    return IpaConfig(share=0.5, min_users=32, n_sessions=16, epochs=2)


@dataclass
class Setup:
    """One seed's world, base generator, user partition and reward model."""

    seed: int
    world: SyntheticWorld
    split: Split
    sids: SemanticIds
    catalog: Catalog
    base: OneRecModel
    pool: np.ndarray
    held_out: np.ndarray
    reward: RewardModel
    reward_info: dict[str, Any]
    timings: dict[str, float]

    def measure(self, model: OneRecModel) -> UserMeasures:
        users = self.held_out
        row_of = {int(u): j for j, u in enumerate(self.split.test.users)}
        if any(int(u) not in row_of for u in users):
            raise ValueError("every held-out user needs a test row (sequences of at least 3 items)")
        rows = [row_of[int(u)] for u in users]
        return measure_users(
            model,
            self.catalog.trie,
            self.world.true_affinity(users),
            [self.split.train[u] for u in users],
            [self.split.test.histories[j] for j in rows],
            self.split.test.targets[rows].tolist(),
            [self.world.data.user_ids[u] for u in users],
        )

    def agreement(self, reward: Any, n_sessions: int) -> dict[str, float]:
        """How ``reward`` ranks the base model's beams against the true affinity, on the held-out users."""
        users = self.held_out
        return reward_truth_agreement(
            self.base,
            reward,
            self.catalog.trie,
            self.world.true_affinity(users),
            [self.split.train[u] for u in users],
            [self.world.data.user_ids[u] for u in users],
            self.sids.codes,
            n_sessions,
        )


Base = tuple[SyntheticWorld, Split, SemanticIds, Catalog, OneRecModel]


def base_generator(cfg: BuildConfig, seed: int, cache: Path | None) -> Base:
    """World, split, semantic IDs, catalogue and the trained base generator of one seed."""
    world = make_synthetic(replace(cfg.synthetic, seed=seed))
    data = world.data
    split = leave_one_out(data)
    emb = item_embeddings(split.train, data.n_items, cfg.embedding_dim, seed=seed)
    sids = residual_semantic_ids(emb, cfg.levels, cfg.codes_per_level, seed=seed)
    level_sizes = list(sids.level_sizes)
    catalog = Catalog.from_codes(
        data.item_ids, sids.codes, level_sizes, popularity_ranking(split.train_popularity(), 10)
    )
    torch.manual_seed(seed)
    model = OneRecModel(replace(cfg.model, level_sizes=level_sizes))
    path = None if cache is None else cache / f"base-seed{seed}-epochs{cfg.train.epochs}.safetensors"
    if path is not None and path.exists():
        model.load_state_dict(load_file(str(path)))
        model.eval()
    else:
        train_model(model, split.train, data.user_ids, sids.codes, replace(cfg.train, seed=seed), progress=False)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return world, split, sids, catalog, model


def setup(cfg: BuildConfig, seed: int, n_sessions: int, cache: Path | None = None) -> Setup:
    timings: dict[str, float] = {}
    t = time.perf_counter()
    world, split, sids, catalog, base = base_generator(cfg, seed, cache)
    timings["generator"] = time.perf_counter() - t
    pool, held_out = holdout_users(world.data.n_users, HELD_OUT_SHARE, seed)
    t = time.perf_counter()
    rcfg = replace(
        cfg.reward, session_items=cfg.model.session_items, history_window=cfg.model.history_window, seed=seed
    )
    level_sizes = list(sids.level_sizes)
    reward, report = train_reward([split.train[u] for u in pool], sids.codes, level_sizes, rcfg, progress=False)
    timings["reward_train"] = time.perf_counter() - t
    t = time.perf_counter()
    value, sessions = heldout_auc(reward, [split.train[u] for u in held_out], sids.codes)
    info: dict[str, Any] = {"auc_heldout_users": value, "heldout_sessions": sessions}
    s = Setup(seed, world, split, sids, catalog, base, pool, held_out, reward, info, timings)
    info.update(s.agreement(reward, n_sessions))
    info.update(train_users=len(pool), train_loss=report.train_loss)
    timings["reward_quality"] = time.perf_counter() - t
    return s


class ItemValueReward(CodeReward):
    """R(u, S) = the sum of a fixed value per item of S. Not personal: the generator's beams carry the user;
    these rewards only say which of them to prefer."""

    def __init__(self, codes: np.ndarray, values: np.ndarray, history_window: int):
        super().__init__(codes, RewardConfig(history_window=history_window))
        self.value = np.asarray(values, dtype=np.float64)

    def score(self, hist_codes: torch.Tensor, hist_mask: torch.Tensor, session_codes: torch.Tensor) -> torch.Tensor:
        return torch.tensor([float(self.value[self.items(row)].sum()) for row in session_codes.tolist()])


class PopularityOracle(ItemValueReward):
    """DIAGNOSTIC reward (``--reward popularity-oracle``): the log in-topic popularity of each item, read
    from the world's hidden parameters. It ranks the base model's beams as the true affinity does 0.89 of
    the time (the learned R: about 0.54), so it shows what IPA's machinery (pairs, DPO, NTP, the held-out
    evaluation) makes of a good reward. Never a recipe: it sees the ground truth."""

    def __init__(self, codes: np.ndarray, popularity: np.ndarray, history_window: int):
        super().__init__(codes, np.log(popularity), history_window)


class FrequencyReward(ItemValueReward):
    """A count prior (``--reward training-frequency``): log(1 + training count) of each item, counted on
    the IPA pool's training sequences only (observed data, no hidden parameter). It asks whether the
    popularity half of the world's taste, estimated from the data, is a reward IPA can use."""

    def __init__(self, codes: np.ndarray, sequences: list[np.ndarray], n_items: int, history_window: int):
        super().__init__(codes, np.log1p(np.bincount(np.concatenate(sequences), minlength=n_items)), history_window)


class CategoryReward(CodeReward):
    """A category prior (``--reward category``): R(u, S) = the sum over the items i of S of
    log P(c(i) | u's history) + log P(i | c(i)), c = the item's first semantic-ID code. The first term is
    the share of the user's history in the item's category (smoothed towards the category's share of all
    interactions), the second the item's share of its category's interactions, both counted on the IPA
    pool's training sequences. Taste as category interest times popularity within the category."""

    def __init__(self, codes: np.ndarray, sequences: list[np.ndarray], n_items: int, history_window: int):
        super().__init__(codes, RewardConfig(history_window=history_window))
        self.category = np.asarray(codes)[:, 0]
        n_cat = int(self.category.max()) + 1
        count = np.bincount(np.concatenate(sequences), minlength=n_items).astype(np.float64) + 1.0
        per_cat = np.bincount(self.category, weights=count, minlength=n_cat)
        self.in_category = np.log(count / per_cat[self.category])  # log P(i | c(i))
        self.cat_share = per_cat / per_cat.sum()

    def score(self, hist_codes: torch.Tensor, hist_mask: torch.Tensor, session_codes: torch.Tensor) -> torch.Tensor:
        out = []
        for h_codes, h_mask, s_codes in zip(hist_codes.tolist(), hist_mask.tolist(), session_codes.tolist()):
            hist = [c[0] for c, m in zip(h_codes, h_mask) if m]
            share = (np.bincount(hist, minlength=len(self.cat_share)) + self.cat_share) / (len(hist) + 1.0)
            items = self.items(s_codes)
            out.append(float((np.log(share[self.category[items]]) + self.in_category[items]).sum()))
        return torch.tensor(out)


def cooccurrence_reward(
    codes: np.ndarray, sequences: list[np.ndarray], n_items: int, history_window: int
) -> CodeReward:
    """The library's count reward (``onerec.reward.CooccurrenceReward``, what ``onerec build`` uses)."""
    return CooccurrenceReward(sequences, codes, RewardConfig(history_window=history_window))


# Rewards counted on the IPA pool's training sequences, by their --reward name:
# (codes, the pool's sequences, n_items, history window) -> the reward.
COUNT_REWARDS: dict[str, Callable[[np.ndarray, list[np.ndarray], int, int], CodeReward]] = {
    "training-frequency": FrequencyReward,
    "cooccurrence": cooccurrence_reward,
    "category": CategoryReward,
}


def align(
    s: Setup, ipa_cfg: IpaConfig, iterations: int, ntp_everyone: bool = False
) -> tuple[OneRecModel, dict[str, Any]]:
    """IPA on the pool only; fails if it sampled a held-out user."""
    data = s.world.data
    ntp_users = np.arange(len(s.split.train)) if ntp_everyone else None  # None: the pool
    aligned, report = run_ipa(
        s.base,
        s.reward,
        s.catalog.trie,
        s.split.train,
        data.user_ids,
        s.sids.codes,
        iterations,
        replace(ipa_cfg, seed=s.seed),
        progress=False,
        users=s.pool,
        ntp_users=ntp_users,
    )
    sampled = report.sampled_users()
    leaked = sampled & set(s.held_out.tolist())
    if leaked:
        raise RuntimeError(f"IPA sampled {len(leaked)} held-out users")
    users = {
        "ipa_pool": len(s.pool),
        "ipa_sampled": len(sampled),
        "evaluated": len(s.held_out),
        "evaluated_sampled_by_ipa": len(leaked),
        "ntp_users": len(s.pool if ntp_users is None else ntp_users),
    }
    iters = [{k: v for k, v in it.items() if k != "sampled_users"} for it in report.as_dict()]
    return aligned, {"users": users, "per_iteration": iters}


def run_seed(
    cfg: BuildConfig,
    seed: int,
    ipa_cfg: IpaConfig,
    iterations: int,
    cache: Path | None,
    reward: str = "learned",
    ntp_everyone: bool = False,
) -> dict[str, Any]:
    s = setup(cfg, seed, ipa_cfg.n_sessions, cache)
    # the learned R is still trained and measured (reward_info); IPA uses the one asked for
    if reward == "popularity-oracle":
        s.reward = PopularityOracle(s.sids.codes, s.world.item_popularity, cfg.model.history_window)  # type: ignore[assignment]
    elif reward in COUNT_REWARDS:
        pool = [s.split.train[u] for u in s.pool]
        s.reward = COUNT_REWARDS[reward](s.sids.codes, pool, s.world.data.n_items, cfg.model.history_window)  # type: ignore[assignment]
    if reward != "learned":
        s.reward_info["used_by_ipa"] = s.agreement(s.reward, ipa_cfg.n_sessions)
    t = time.perf_counter()
    before = s.measure(s.base)
    s.timings["evaluate_before"] = time.perf_counter() - t
    t = time.perf_counter()
    aligned, info = align(s, ipa_cfg, iterations, ntp_everyone)
    s.timings["ipa"] = time.perf_counter() - t
    t = time.perf_counter()
    after = s.measure(aligned)
    s.timings["evaluate_after"] = time.perf_counter() - t
    return {
        "seed": seed,
        **compare(before, after),
        "reward": s.reward_info,
        **info,
        "timings_seconds": {k: round(v, 2) for k, v in s.timings.items()},
    }


GOAL_AFFINITY_GAIN = 0.05  # the goal: +5% true affinity of the top session ...
NOISE_Z = 1.96  # ... with Recall@10 not lower beyond noise: the mean paired drop within 1.96 standard errors


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean, std and the standard error of the mean over seeds (what "beyond noise" is judged by)."""
    std = float(statistics.stdev(values)) if len(values) > 1 else 0.0
    return {"mean": float(statistics.fmean(values)), "std": std, "stderr": std / math.sqrt(len(values))}


def goal_verdict(summary: dict[str, Any], seeds: int) -> dict[str, Any]:
    """The goal read from a summary over seeds; with one seed there is no spread to judge noise by."""
    gain = summary["true_affinity_relative_gain"]["mean"]
    recall = summary["recall@10_difference"]
    upper = recall["mean"] + NOISE_Z * recall["stderr"]  # the highest difference noise allows
    affinity_met = gain >= GOAL_AFFINITY_GAIN
    recall_met = seeds > 1 and upper >= 0.0
    return {
        "rule": f"mean true-affinity gain >= {GOAL_AFFINITY_GAIN:.0%} and mean paired Recall@10 difference "
        f"+ {NOISE_Z} standard errors (over seeds) >= 0",
        "seeds": seeds,
        "affinity_gain": gain,
        "recall@10_difference_upper": upper,
        "affinity_met": affinity_met,
        "recall_met": recall_met,
        "met": affinity_met and recall_met,
    }


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    pick = {
        "true_affinity_before": ("true_affinity", "before"),
        "true_affinity_after": ("true_affinity", "after"),
        "true_affinity_relative_gain": ("true_affinity", "relative_gain"),
        "recall@10_before": ("recall@10", "before"),
        "recall@10_after": ("recall@10", "after"),
        "recall@10_difference": ("recall@10", "difference"),
        "ndcg@10_before": ("ndcg@10", "before"),
        "ndcg@10_after": ("ndcg@10", "after"),
        "reward_auc_heldout_users": ("reward", "auc_heldout_users"),
        "reward_beam_pair_agreement": ("reward", "beam_pair_agreement"),
    }
    out = {name: mean_std([float(r[a][b]) for r in per_seed]) for name, (a, b) in pick.items()}
    if all("used_by_ipa" in r["reward"] for r in per_seed):  # a reward other than the learned one drove IPA
        agreement = [float(r["reward"]["used_by_ipa"]["beam_pair_agreement"]) for r in per_seed]
        out["ipa_reward_beam_pair_agreement"] = mean_std(agreement)
    out["goal"] = goal_verdict(out, len(per_seed))
    return out


def parse_override(cfg: IpaConfig, items: list[str]) -> IpaConfig:
    kinds = {f.name: f.type for f in fields(cfg)}
    changes: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        if key not in kinds:
            raise SystemExit(f"--set: IpaConfig has no field {key!r}")
        current = getattr(cfg, key)
        if isinstance(current, bool):
            changes[key] = raw.lower() in ("1", "true", "yes")
        else:
            changes[key] = type(current)(raw)
    return replace(cfg, **changes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--cache", type=Path, default=None, help="keep trained base generators here (safetensors)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--reward",
        choices=("learned", "popularity-oracle", *COUNT_REWARDS),
        default="learned",
        help="popularity-oracle: a diagnostic R read from the world's hidden popularity (PopularityOracle); "
        "training-frequency: a count prior from the IPA pool's sequences (FrequencyReward); "
        "cooccurrence / category: personal count estimates from them (CooccurrenceReward, CategoryReward)",
    )
    p.add_argument(
        "--ntp-everyone",
        action="store_true",
        help="L_NTP's batches from every user's training sequence (the generator's own training data), not the "
        "pool's only; beam search and DPO still read the pool only",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = demo_config()
    if args.quick:
        cfg.train = replace(cfg.train, epochs=3)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    iterations = args.iterations or (2 if args.quick else 4)
    ipa_cfg = parse_override(ipa_defaults(args.quick), args.overrides)
    t0 = time.perf_counter()
    per_seed = []
    for seed in seeds:
        row = run_seed(cfg, seed, ipa_cfg, iterations, args.cache, reward=args.reward, ntp_everyone=args.ntp_everyone)
        per_seed.append(row)
        ta, rc = row["true_affinity"], row["recall@10"]
        print(
            f"seed {seed}: true affinity {ta['before']:.4f} -> {ta['after']:.4f} ({100 * ta['relative_gain']:+.1f}%), "
            f"recall@10 {rc['before']:.3f} -> {rc['after']:.3f}, reward AUC {row['reward']['auc_heldout_users']:.3f}",
            file=sys.stderr,
            flush=True,
        )
    result = {
        "benchmark": "ipa",
        "quick": args.quick,
        "seeds": seeds,
        "world": cfg.synthetic.as_dict(),
        "generator_train_epochs": cfg.train.epochs,
        "base_generator_cache": None if args.cache is None else str(args.cache),  # weights reused from an earlier run
        "iterations": iterations,
        "reward_used_by_ipa": args.reward,
        "ntp_everyone": args.ntp_everyone,
        "ipa_config": {k: getattr(ipa_cfg, k) for k in ipa_cfg.__dataclass_fields__},
        "evaluation": "users held out of the reward model and of IPA (pool and evaluation users disjoint)",
        "summary": summarise(per_seed),
        "per_seed": per_seed,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    goal = result["summary"]["goal"]
    print(
        f"goal ({goal['rule']}): affinity {100 * goal['affinity_gain']:+.1f}% "
        f"({'met' if goal['affinity_met'] else 'not met'}), Recall@10 difference + noise "
        f"{goal['recall@10_difference_upper']:+.4f} ({'met' if goal['recall_met'] else 'not met'})",
        file=sys.stderr,
    )
    emit(result, args.out)


if __name__ == "__main__":
    main()
