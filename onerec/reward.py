"""The reward model R(u, S) of IPA (DESIGN.md section 2), small enough to train in seconds.

Each session item attends over the user's history (target-aware attention; a learned "null" key
is always present so an empty history still has something to attend to), the session's items then
attend to each other, and two sigmoid towers read the result:

* ``click`` (per item): the user engages with the item at some later point;
* ``session`` (pooled): the session is the user's real next session rather than a sampled one.

Why these two: they are the only engagement signals the observed sequences support (no watch time,
likes, ...). Training uses OBSERVED data only (training sequences). The session tower: the real
next ``m`` items after a history prefix against sampled sessions (``swap_share`` of them another
user's real session, the rest random items). The click tower (``interest``): the user's later items
against items they never touched. Its positives are, by default, only the later items reached by a
*jump* (a transition no other user made, ``interest_jumps``): steps along well-trodden paths say what
follows the previous item, jumps say what this user likes. Trained on next sessions instead, R learns
sequential plausibility, which every beam of the generator already has, and ranked the beams at
chance against the true affinity (benchmarks/results/ipa_reward_v0_lr5e-4.json). ``score="click"``:
R is the mean click probability. The synthetic world's true affinity is never seen here; it is what
IPA is judged against.

Items are embedded from their semantic-ID codes (sum of per-level code embeddings, like the generator's
encoder, plus hashed embeddings of every code prefix, ``prefix_buckets``), so the reward needs no
item table.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

TOWERS = ("click", "session")
REWARDS = ("cooccurrence", "learned")  # what ``make_reward`` builds (the build's ``ipa_reward``)


@dataclass
class RewardConfig:
    d_model: int = 32
    n_heads: int = 2
    history_window: int = 20
    session_items: int = 5
    epochs: int = 10
    batch_size: int = 256
    lr: float = 3e-3
    swap_share: float = 0.0  # share of negatives that are another user's real session (the rest: random items)
    popularity_feature: bool = False  # the towers also read each item's log training frequency
    stat_buckets: int = 1 << 16  # rows of the hashed path -> frequency table
    prefix_buckets: int = 4096  # > 0: also embed every code prefix (hashed into this many rows)
    click_next_session: bool = False  # the click tower also learns the next-session positives and negatives
    interest_jumps: bool = True  # interest positives: only later items reached by a jump (see _jumps)
    jump_max_count: int = 1  # a transition made by at most this many users is a jump
    interest: bool = True  # also train the click tower on the user's later items vs never-seen ones
    score: str = "click"  # R(u, S): "click" (the click tower) or "mean" (click and session towers)
    seed: int = 0


@dataclass
class RewardReport:
    samples: int
    epochs: int
    seconds: float
    train_loss: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class RewardModel(nn.Module):
    def __init__(self, level_sizes: Sequence[int], cfg: RewardConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.codes = nn.ModuleList(nn.Embedding(v, d) for v in level_sizes)
        self.level_sizes = list(level_sizes)
        self.prefixes = nn.Embedding(cfg.prefix_buckets, d) if cfg.prefix_buckets > 0 else None
        self.hist_pos = nn.Embedding(cfg.history_window, d)  # recency, 0 = newest
        self.null_key = nn.Parameter(torch.zeros(1, 1, d))
        self.target_attn = nn.MultiheadAttention(d, cfg.n_heads, batch_first=True)
        self.session_attn = nn.MultiheadAttention(d, cfg.n_heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        width = 2 * d + (1 if cfg.popularity_feature else 0)
        self.click_tower = nn.Sequential(nn.Linear(width, d), nn.ReLU(), nn.Linear(d, 1))
        self.session_tower = nn.Sequential(nn.Linear(width, d), nn.ReLU(), nn.Linear(d, 1))
        # log(1 + training frequency) of each item path, hashed, scaled to [0, 1] (set by set_popularity)
        self.register_buffer("path_popularity", torch.zeros(cfg.stat_buckets if cfg.popularity_feature else 1))

    def path_key(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., D) -> (...,) a hash of the whole path (mixed radix over the level sizes)."""
        key = torch.zeros_like(codes[..., 0])
        for lvl, size in enumerate(self.level_sizes):
            key = (key * size + codes[..., lvl] + 1) % 2_147_483_647
        return key

    def set_popularity(self, item_codes: torch.Tensor, counts: np.ndarray) -> None:
        """Store each item's training frequency under its path's hash (observed data only)."""
        table = torch.zeros_like(self.path_popularity)
        value = torch.log1p(torch.as_tensor(np.asarray(counts), dtype=torch.float32))
        table.index_add_(0, self.path_key(item_codes) % len(table), value)
        self.path_popularity.copy_(table / table.max().clamp(min=1e-6))

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., D) -> (..., d): sum of per-level code embeddings, plus (with ``prefix_buckets``) an
        embedding of every prefix c_1..c_l. Per-level codes alone are additive across levels, so they
        cannot tell two items with the same codes at different places apart (16+16+16 numbers cannot
        hold 400 items' popularity); prefixes can, and a new item still needs no table row."""
        out = sum(emb(codes[..., lvl]) for lvl, emb in enumerate(self.codes))
        if self.prefixes is not None:
            key = torch.zeros_like(codes[..., 0])
            for lvl, size in enumerate(self.level_sizes):
                key = (key * size + codes[..., lvl] + 1) % 2_147_483_647  # mixed radix, kept in int64 range
                out = out + self.prefixes((key * 40_503 + lvl) % self.prefixes.num_embeddings)
        return out  # type: ignore[return-value]

    def forward(
        self, hist_codes: torch.Tensor, hist_mask: torch.Tensor, session_codes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hist_codes (B,S,D) newest first, hist_mask (B,S), session_codes (B,m,D) -> logits (B,m), (B,)."""
        b, s, _ = hist_codes.shape
        hist = self.embed(hist_codes) + self.hist_pos(torch.arange(s, device=hist_codes.device))[None]
        keys = torch.cat([self.null_key.expand(b, 1, -1), hist], dim=1)  # (B, S+1, d)
        pad = torch.cat([torch.zeros_like(hist_mask[:, :1]), ~hist_mask], dim=1)  # True = ignore
        items = self.embed(session_codes)  # (B, m, d)
        interest, _ = self.target_attn(items, keys, keys, key_padding_mask=pad, need_weights=False)
        x = self.norm1(items + interest)
        ctx, _ = self.session_attn(x, x, x, need_weights=False)
        x = self.norm2(x + ctx)
        per_item = torch.cat([x, interest], dim=-1)  # (B, m, 2d)
        if self.cfg.popularity_feature:
            pop = self.path_popularity[self.path_key(session_codes) % len(self.path_popularity)]
            per_item = torch.cat([per_item, pop[..., None]], dim=-1)  # (B, m, 2d+1)
        click = self.click_tower(per_item).squeeze(-1)  # (B, m)
        session = self.session_tower(per_item.mean(1)).squeeze(-1)  # (B,)
        return click, session

    @torch.no_grad()
    def score(self, hist_codes: torch.Tensor, hist_mask: torch.Tensor, session_codes: torch.Tensor) -> torch.Tensor:
        """R(u, S) in [0, 1], (B,): the mean click probability of the session's items (``score="click"``),
        or its mean with the session tower's probability (``score="mean"``)."""
        was_training = self.training
        self.eval()
        click, session = self(hist_codes, hist_mask, session_codes)
        self.train(was_training)
        clicks = torch.sigmoid(click).mean(1)
        if self.cfg.score == "click":
            return clicks
        if self.cfg.score == "mean":
            return 0.5 * (clicks + torch.sigmoid(session))
        raise ValueError(f"unknown reward score {self.cfg.score!r}: want 'click' or 'mean'")


class RewardSamples:
    """(history prefix, real next session) pairs of the training sequences, plus sampled negatives."""

    def __init__(self, sequences: Sequence[np.ndarray], codes: np.ndarray, cfg: RewardConfig):
        self.sequences = [np.asarray(s, dtype=np.int64) for s in sequences]
        self.codes = torch.from_numpy(np.asarray(codes, dtype=np.int64))  # (I, D)
        self.cfg = cfg
        m = cfg.session_items
        pairs = [(u, p) for u, seq in enumerate(self.sequences) for p in range(1, len(seq) - m + 1)]
        self.pairs = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        self.jumps = self._jumps() if cfg.interest_jumps else None

    def _jumps(self) -> list[np.ndarray]:
        """Per sequence, True where the item does not follow its predecessor along a transition other
        users also made: a jump (a new session, chosen by the user's own taste) rather than a step
        along a well-trodden path (chosen by the previous item). The first item counts as a jump."""
        n = len(self.codes)
        pairs = np.concatenate([s[:-1] * n + s[1:] for s in self.sequences if len(s) > 1] or [np.zeros(0, np.int64)])
        keys, counts = np.unique(pairs, return_counts=True)
        out = []
        for seq in self.sequences:
            flag = np.ones(len(seq), dtype=bool)
            if len(seq) > 1:
                pos = np.searchsorted(keys, seq[:-1] * n + seq[1:])
                flag[1:] = counts[pos] <= self.cfg.jump_max_count
            out.append(flag)
        return out

    def __len__(self) -> int:
        return len(self.pairs)

    def history(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        hists = [self.sequences[u][max(0, p - self.cfg.history_window) : p][::-1] for u, p in self.pairs[idx]]
        return history_tensors(hists, self.codes, self.cfg.history_window)

    def batch(self, idx: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """Positives then negatives: hist (2B,S,D), mask, sessions (2B,m,D), click labels (2B,m), session labels."""
        m, n_items = self.cfg.session_items, len(self.codes)
        pos = np.stack([self.sequences[u][p : p + m] for u, p in self.pairs[idx]])  # (B, m)
        other = rng.integers(0, len(self.pairs), size=len(idx))
        swapped = np.stack([self.sequences[u][p : p + m] for u, p in self.pairs[other]])
        random = rng.integers(0, n_items, size=(len(idx), m))
        use_random = rng.random(len(idx)) >= self.cfg.swap_share
        neg = np.where(use_random[:, None], random, swapped)
        futures = [set(self.sequences[u][p:].tolist()) for u, p in self.pairs[idx]]
        neg_click = np.array([[i in fut for i in row] for row, fut in zip(neg, futures)], dtype=np.float32)
        hist_codes, hist_mask = self.history(idx)
        sessions = self.codes[torch.from_numpy(np.concatenate([pos, neg]))]
        click = torch.from_numpy(np.concatenate([np.ones_like(neg_click), neg_click]))
        session = torch.cat([torch.ones(len(idx)), torch.zeros(len(idx))])
        return hist_codes.repeat(2, 1, 1), hist_mask.repeat(2, 1), sessions, click, session

    def interest_batch(self, idx: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """Long-term interest for the click tower: hist (B,S,D), mask, candidates (B,m,D), labels (B,m).

        Each candidate is, with even odds, one of the user's later items (anywhere after the prefix,
        not only the next session) labelled 1, or a uniformly drawn item the user never interacted
        with, labelled 0. Next-session positives alone teach "what follows the last item"; these teach
        which items a user engages with at all (their topics, the popular items in them).
        """
        m, n_items = self.cfg.session_items, len(self.codes)
        cand = np.zeros((len(idx), m), dtype=np.int64)
        label = rng.random((len(idx), m)) < 0.5
        for j, (u, p) in enumerate(self.pairs[idx]):
            seq = self.sequences[u]
            later = seq[p + m :] if len(seq) > p + m else seq[p:]  # beyond the next session when there is any
            if self.jumps is not None:
                jumped = seq[p:][self.jumps[u][p:]]
                later = jumped if len(jumped) else later
            cand[j] = rng.choice(later, size=m)
            neg = label[j] == 0
            draws = rng.integers(0, n_items, size=4 * m)
            draws = draws[~np.isin(draws, seq)]
            if len(draws) < int(neg.sum()):  # the user saw nearly everything: keep the positives only
                label[j] = True
                continue
            cand[j, neg] = draws[: int(neg.sum())]
        hist_codes, hist_mask = self.history(idx)
        return hist_codes, hist_mask, self.codes[torch.from_numpy(cand)], torch.from_numpy(label.astype(np.float32))


def history_tensors(
    hists: Sequence[np.ndarray], codes: torch.Tensor, history_window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Histories already newest first -> (codes (B,S,D), mask (B,S)), S = the longest (at least 1)."""
    hists = [np.asarray(h, dtype=np.int64)[:history_window] for h in hists]
    width = max(1, max(len(h) for h in hists))
    idx = np.zeros((len(hists), width), dtype=np.int64)
    mask = np.zeros((len(hists), width), dtype=bool)
    for j, h in enumerate(hists):
        idx[j, : len(h)], mask[j, : len(h)] = h, True
    return codes[torch.from_numpy(idx)], torch.from_numpy(mask)


def train_reward(
    sequences: Sequence[np.ndarray],
    codes: np.ndarray,
    level_sizes: Sequence[int],
    cfg: RewardConfig,
    progress: bool = True,
) -> tuple[RewardModel, RewardReport]:
    """Fit R with BCE on both towers over observed sessions and sampled negatives."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    samples = RewardSamples(sequences, codes, cfg)
    if len(samples) == 0:
        raise ValueError(f"no reward samples: no training sequence has more than {cfg.session_items} items")
    model = RewardModel(level_sizes, cfg)
    if cfg.popularity_feature:
        counts = np.bincount(np.concatenate(samples.sequences), minlength=len(samples.codes))
        model.set_popularity(samples.codes, counts)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = math.ceil(len(samples) / cfg.batch_size)
    report = RewardReport(samples=len(samples), epochs=cfg.epochs, seconds=0.0)
    t0 = time.perf_counter()
    bar = tqdm(total=steps * cfg.epochs, desc="reward", unit="step", disable=not progress, leave=False)
    model.train()
    for _ in range(cfg.epochs):
        perm = rng.permutation(len(samples))
        running = 0.0
        for start in range(0, len(perm), cfg.batch_size):
            hist, mask, sessions, click_y, session_y = samples.batch(perm[start : start + cfg.batch_size], rng)
            click, session = model(hist, mask, sessions)
            loss = F.binary_cross_entropy_with_logits(session, session_y)
            if cfg.click_next_session:
                loss = loss + F.binary_cross_entropy_with_logits(click, click_y)
            if cfg.interest:
                hist, mask, cand, cand_y = samples.interest_batch(perm[start : start + cfg.batch_size], rng)
                cand_click, _ = model(hist, mask, cand)
                loss = loss + F.binary_cross_entropy_with_logits(cand_click, cand_y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            bar.update(1)
        report.train_loss.append(running / steps)
    bar.close()
    model.eval()
    report.seconds = time.perf_counter() - t0
    return model, report


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties counting half."""
    pos, neg = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / max(pos.size * neg.size, 1))


@torch.no_grad()
def heldout_auc(
    reward: SessionReward, sequences: Sequence[np.ndarray], codes: np.ndarray, seed: int = 7
) -> tuple[float, int]:
    """R's AUC on ``sequences`` (users it did not train on): every real next session of a history prefix
    against one sampled negative each (the negatives R is trained to reject). Returns (AUC, sessions)."""
    held = RewardSamples(sequences, codes, reward.cfg)
    if len(held) == 0:
        raise ValueError(f"no held-out session: no sequence has more than {reward.cfg.session_items} items")
    hist, mask, sessions, _, label = held.batch(np.arange(len(held)), np.random.default_rng(seed))
    scores = reward.score(hist, mask, sessions).numpy()
    real = label.numpy() == 1
    return auc(scores[real], scores[~real]), int(real.sum())


class SessionReward(Protocol):
    """What IPA asks of a reward: R(u, S) for a batch of (history, session) pairs, read through their codes
    (hist_codes (B,S,D) newest first, hist_mask (B,S), session_codes (B,m,D) -> (B,)), and the history
    window it reads (``cfg.history_window``)."""

    cfg: RewardConfig

    def score(self, hist_codes: torch.Tensor, hist_mask: torch.Tensor, session_codes: torch.Tensor) -> torch.Tensor:
        """Higher = preferred."""
        ...


class CodeReward:
    """A reward over items looked up by their code path (what the count rewards share): ``cfg`` gives
    the history window IPA feeds it."""

    def __init__(self, codes: np.ndarray, cfg: RewardConfig):
        self.cfg = cfg
        self.n_items = len(codes)
        self.item_of = {tuple(c): i for i, c in enumerate(np.asarray(codes).tolist())}

    def items(self, code_rows: list[list[int]]) -> list[int]:
        """Item indices of code paths (every path must be an item's)."""
        return [self.item_of[tuple(c)] for c in code_rows]


class CooccurrenceReward(CodeReward):
    """A reward counted from the data, not trained: R(u, S) = the sum over the items i of S of
    log(1e-3 + the mean over u's history items h of P(a user has i | they have h)), counted on the
    sequences given (the IPA pool's training sequences).

    Why: on the demo world this reward ranks beams closer to the true taste than the learned R, and with
    the first-slot anchor in place of L_NTP it is the setting that meets the IPA goal (+6.9% true affinity
    over 24 seeds, Recall@10 within noise: benchmarks/results/ipa_round3.json). Users who share an item
    share interests, so it reads both the user's interests and the items' popularity within them.

    Each P(. | h) row is counted when first needed, from an item -> users index, and a bounded number of
    rows are kept: no items x items matrix, so it scales with the catalogue.
    """

    def __init__(self, sequences: Sequence[np.ndarray], codes: np.ndarray, cfg: RewardConfig, cache_rows: int = 1024):
        super().__init__(codes, cfg)
        self.user_items = [np.unique(np.asarray(seq, dtype=np.int64)) for seq in sequences]
        lengths = np.array([len(items) for items in self.user_items], dtype=np.int64)
        items = np.concatenate(self.user_items) if len(self.user_items) else np.zeros(0, dtype=np.int64)
        if len(items) and (items.min() < 0 or items.max() >= self.n_items):
            raise ValueError(f"sequences: item indices must lie in [0, {self.n_items}) (the rows of codes)")
        order = np.argsort(items, kind="stable")
        self.holders = np.repeat(np.arange(len(lengths)), lengths)[order]  # users, grouped by item
        self.start = np.searchsorted(items[order], np.arange(self.n_items + 1))  # item h: holders[start[h]:start[h+1]]
        self.cache_rows = cache_rows
        self._rows: OrderedDict[int, np.ndarray] = OrderedDict()

    def given(self, h: int) -> np.ndarray:
        """P(i | h) for every item i, (n_items,) float32, 0 at i = h."""
        row = self._rows.get(h)
        if row is not None:
            self._rows.move_to_end(h)
            return row
        users = self.holders[self.start[h] : self.start[h + 1]]
        counts = np.zeros(self.n_items, dtype=np.float32)
        if len(users):
            counts += np.bincount(np.concatenate([self.user_items[u] for u in users]), minlength=self.n_items)
        counts[h] = 0.0
        row = counts / np.float32(max(len(users), 1))
        self._rows[h] = row
        if len(self._rows) > self.cache_rows:
            self._rows.popitem(last=False)
        return row

    @torch.no_grad()
    def score(self, hist_codes: torch.Tensor, hist_mask: torch.Tensor, session_codes: torch.Tensor) -> torch.Tensor:
        """(B,) float32; 0 for an empty history."""
        out = []
        for h_codes, h_mask, s_codes in zip(hist_codes.tolist(), hist_mask.tolist(), session_codes.tolist()):
            hist = self.items([c for c, m in zip(h_codes, h_mask) if m])
            if not hist:
                out.append(0.0)
                continue
            est = np.stack([self.given(h) for h in hist]).mean(axis=0)
            out.append(float(np.log(1e-3 + est[self.items(s_codes)]).sum()))
        return torch.tensor(out)


def make_reward(
    kind: str,
    sequences: Sequence[np.ndarray],
    codes: np.ndarray,
    level_sizes: Sequence[int],
    cfg: RewardConfig,
    progress: bool = True,
) -> tuple[SessionReward, dict[str, object]]:
    """The reward IPA ranks beams by (``kind`` in ``REWARDS``), fitted or counted on ``sequences``, and
    what the manifest records of it."""
    check_reward_kind(kind)
    if kind == "learned":
        model, report = train_reward(sequences, codes, level_sizes, cfg, progress=progress)
        return model, {"kind": kind, **report.as_dict()}
    t0 = time.perf_counter()
    reward = CooccurrenceReward(sequences, codes, cfg)
    return reward, {"kind": kind, "users": len(sequences), "seconds": time.perf_counter() - t0}


def check_reward_kind(kind: str) -> None:
    """Refuse a reward ``make_reward`` cannot build (the build calls this before it trains anything)."""
    if kind not in REWARDS:
        raise ValueError(f"ipa_reward {kind!r}: want one of {', '.join(REWARDS)}")
