"""Strong simple baselines for the quality benchmark, on the same split and full-ranking metrics.

- ``most_popular``: training interaction counts.
- ``CooccurrenceKnn``: symmetric co-occurrence within a window of 3 positions of the training
  sequences, weighted 1/distance; a user's score is the neighbours of the last 3 history items
  weighted 1, 0.5, 0.25; popularity breaks ties and fills the rest of the list. With ``backward`` < 1
  it is directed: a neighbour seen before an item weighs ``backward`` times one seen after it (the
  count the model's candidates use, ``ModelConfig.candidate_backward``). With ``decay`` > 0 each pair
  also fades with its age in its sequence (``ModelConfig.candidate_decay``).
- ``SASRec`` (Kang & McAuley, 2018): a causal transformer over item ids trained with the full
  softmax cross-entropy over the catalogue at every position (the variant that later work found
  to beat its original sampled BCE), plain torch.

Every baseline ranks the whole catalogue and, like the service, never returns an item of the
user's own history; ``rank_all`` turns per-user score rows into top-k lists under that rule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from onerec.evaluate import ranking_metrics
from onerec.model import CANDIDATE_RECENCY, CANDIDATE_WINDOW

__all__ = [
    "CooccurrenceKnn",
    "SASRec",
    "SASRecConfig",
    "evaluate_scorer",
    "most_popular_scores",
    "rank_all",
    "train_sasrec",
]


def most_popular_scores(train: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """Training interaction count per item, float64 (n_items,)."""
    if not train:
        return np.zeros(n_items)
    return np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in train]), minlength=n_items).astype(
        np.float64
    )


def rank_all(scores: np.ndarray, histories: Sequence[np.ndarray], k: int) -> list[list[int]]:
    """Top-k item indices of each score row (B, n_items), never an item of that row's history.

    Ties go to the lower item index (a stable sort), so results are deterministic.
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    for row, hist in enumerate(histories):
        if len(hist):
            scores[row, np.asarray(hist, dtype=np.int64)] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[int(i) for i in row] for row in top]


def evaluate_scorer(
    score_fn: Callable[[list[np.ndarray]], np.ndarray],
    histories: Sequence[np.ndarray],
    targets: Sequence[int],
    ks: Sequence[int] = (5, 10),
    batch_size: int = 1024,
) -> dict[str, float]:
    """Full-ranking Recall/NDCG@k of `score_fn` (a batch of histories -> (B, n_items) scores)."""
    ranked: list[list[int]] = []
    top = max(ks)
    for start in range(0, len(histories), batch_size):
        chunk = [np.asarray(h, dtype=np.int64) for h in histories[start : start + batch_size]]
        ranked.extend(rank_all(score_fn(chunk), chunk, top))
    return ranking_metrics(ranked, [int(t) for t in targets], ks)


class CooccurrenceKnn:
    """Item-kNN on windowed co-occurrence; see the module docstring for the exact recipe."""

    def __init__(
        self,
        train: Sequence[np.ndarray],
        n_items: int,
        window: int = CANDIDATE_WINDOW,
        recent_weights: Sequence[float] = CANDIDATE_RECENCY,
        backward: float = 1.0,
        decay: float = 0.0,
    ) -> None:
        from onerec.tokenizer import cooccurrence

        self.n_items = n_items
        self.recent_weights = [float(w) for w in recent_weights]
        rows, cols, weights = cooccurrence(train, n_items, window, backward, decay)
        self._rows, self._cols, self._weights = rows, cols, weights
        self._indptr = np.zeros(n_items + 1, dtype=np.int64)
        self._indptr[1:] = np.cumsum(np.bincount(rows, minlength=n_items))
        popularity = most_popular_scores(train, n_items)
        # Popularity only orders what the neighbours leave tied (or unscored): scaled far below any
        # difference of co-occurrence scores.
        self.fill = 1e-9 * popularity / max(float(popularity.max()), 1.0)

    def neighbours(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """(items, co-occurrence weights) of one item."""
        lo, hi = self._indptr[item], self._indptr[item + 1]
        return self._cols[lo:hi], self._weights[lo:hi]

    def scores(self, histories: list[np.ndarray]) -> np.ndarray:
        out = np.tile(self.fill, (len(histories), 1))
        for row, hist in enumerate(histories):
            recent = np.asarray(hist, dtype=np.int64)[::-1][: len(self.recent_weights)]
            for weight, item in zip(self.recent_weights, recent):
                items, values = self.neighbours(int(item))
                np.add.at(out[row], items, weight * values)
        return out


# --------------------------------------------------------------------------------------------------
# SASRec with full softmax cross-entropy
# --------------------------------------------------------------------------------------------------


@dataclass
class SASRecConfig:
    max_len: int = 50
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    dropout: float = 0.5
    lr: float = 1e-3
    batch_size: int = 128
    max_epochs: int = 200
    eval_every: int = 5  # epochs between validation checks
    patience: int = 3  # validation checks without improvement before stopping
    time_budget_s: float | None = None  # stop after the epoch that crosses this (best checkpoint kept)
    seed: int = 0
    threads: int | None = None


@dataclass
class SASRecReport:
    epochs: int = 0
    best_epoch: int = 0
    seconds: float = 0.0
    valid_ndcg10: list[float] = field(default_factory=list)
    stopped_by_time: bool = False

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class SASRec(nn.Module):
    """Item embedding (index 0 = padding, item i -> i + 1) + learned positions, causal pre-norm
    transformer blocks; the next item's logits are the dot products with the shared item table."""

    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = nn.Embedding(n_items + 1, cfg.d_model, padding_idx=0)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model,
            cfg.n_heads,
            dim_feedforward=cfg.d_model,
            dropout=cfg.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.items.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def hidden(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs: (B, L <= max_len) shifted item ids, left-padded with 0 -> (B, L, d)."""
        length = seqs.shape[1]
        # Right-aligned positions: the newest item is always position max_len - 1, however many
        # all-padding columns a training batch dropped on the left.
        positions = torch.arange(self.cfg.max_len - length, self.cfg.max_len, device=seqs.device)
        x = self.items(seqs) * math.sqrt(self.cfg.d_model) + self.pos(positions)[None]
        x = self.drop(x) * (seqs > 0).unsqueeze(-1)
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=seqs.device), 1)
        x = self.blocks(x, mask=causal)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.items.weight[1:].t()  # (..., n_items)


def _left_padded(histories: Sequence[np.ndarray], max_len: int) -> np.ndarray:
    """Newest max_len items of each history, shifted by 1 (0 = padding), right-aligned."""
    out = np.zeros((len(histories), max_len), dtype=np.int64)
    for row, hist in enumerate(histories):
        tail = np.asarray(hist, dtype=np.int64)[-max_len:]
        if len(tail):
            out[row, max_len - len(tail) :] = tail + 1
    return out


@torch.no_grad()
def sasrec_scores(model: SASRec, histories: list[np.ndarray]) -> np.ndarray:
    model.eval()
    seqs = torch.from_numpy(_left_padded(histories, model.cfg.max_len))
    return model.logits(model.hidden(seqs)[:, -1]).numpy().astype(np.float64)


def train_sasrec(
    train: Sequence[np.ndarray],
    n_items: int,
    cfg: SASRecConfig,
    valid_histories: Sequence[np.ndarray] | None = None,
    valid_targets: Sequence[int] | None = None,
    progress: bool = True,
) -> tuple[SASRec, SASRecReport]:
    """Train on every position of the training sequences (input seq[:-1], target seq[1:]).

    With validation rows given, NDCG@10 is checked every `eval_every` epochs; training stops after
    `patience` checks without improvement and the best weights are kept.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    usable = [np.asarray(s, dtype=np.int64) for s in train if len(s) >= 2]
    if not usable:
        raise ValueError("SASRec needs training sequences of at least 2 items")
    width = cfg.max_len + 1
    padded = _left_padded(usable, width)  # (U, L + 1): inputs [:, :-1], targets [:, 1:]
    model = SASRec(n_items, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    report = SASRecReport()
    best, best_state, stale = -1.0, None, 0
    t0 = time.perf_counter()
    steps = math.ceil(len(usable) / cfg.batch_size)
    bar = tqdm(total=cfg.max_epochs * steps, desc="sasrec", unit="step", disable=not progress, leave=False)
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        order = rng.permutation(len(usable))
        for start in range(0, len(order), cfg.batch_size):
            rows = padded[order[start : start + cfg.batch_size]]
            first = int((rows != 0).argmax(axis=1).min())  # columns before it are padding in every row
            keep = min(first, cfg.max_len - 1)
            batch = torch.from_numpy(rows)
            inputs, targets = batch[:, keep:-1], batch[:, keep + 1 :]
            real = targets > 0
            h = model.hidden(inputs)[real]  # only positions with a next item: (P, d)
            loss = F.cross_entropy(model.logits(h), targets[real] - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        report.epochs = epoch
        out_of_time = cfg.time_budget_s is not None and time.perf_counter() - t0 > cfg.time_budget_s
        if valid_histories is None or valid_targets is None or (epoch % cfg.eval_every and not out_of_time):
            if out_of_time:
                break
            continue
        ndcg = evaluate_scorer(lambda h: sasrec_scores(model, h), valid_histories, valid_targets)["ndcg@10"]
        report.valid_ndcg10.append(ndcg)
        if ndcg > best:
            best, report.best_epoch, stale = ndcg, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                break
        if out_of_time:
            report.stopped_by_time = True
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        report.best_epoch = report.epochs
    model.eval()
    report.seconds = time.perf_counter() - t0
    return model, report
