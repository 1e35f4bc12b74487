"""Next-token-prediction training over sessions: (history prefix -> the next m items).

Every position p of a user's training sequence is a sample: the encoder reads the items before p
(newest first, at most ``history_window``), the decoder is taught the codes of items p .. p+m-1. The
loss is the mean cross-entropy per code plus the MoE load-balancing term; AdamW with warm-up and
cosine decay; the weights with the best held-out loss are kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from onerec.model import ModelConfig, OneRecModel, hash_user


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    balance_weight: float = 0.01
    holdout_share: float = 0.05  # share of samples kept out to pick the best epoch (0: train on all, keep the last)
    slot_weights: list[float] | None = None  # per-slot loss weights (None: every slot weighs 1)
    label_smoothing: float = 0.0
    # Wall-clock budget of the training loop (None: none). The learning-rate schedule follows
    # progress = max(steps done / planned steps, seconds spent / budget) and training stops at 1, so
    # a slow machine trains fewer steps but still warms up, decays and finishes on time.
    time_budget_s: float | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None


@dataclass
class TrainReport:
    epochs: int
    steps: int
    samples: int
    seconds: float
    train_loss: list[float] = field(default_factory=list)
    holdout_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0
    epochs_run: int = 0  # fewer than `epochs` when the time budget ran out

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class SessionSamples:
    """All (user, position) samples of the training sequences, materialised as batches on demand."""

    def __init__(self, sequences: Sequence[np.ndarray], user_ids: Sequence[str], codes: np.ndarray, cfg: ModelConfig):
        self.sequences = [np.asarray(s, dtype=np.int64) for s in sequences]
        self.codes = torch.from_numpy(np.asarray(codes, dtype=np.int64))  # (I, D)
        self.cfg = cfg
        self.user_bucket = np.array([hash_user(u, cfg.user_buckets) for u in user_ids], dtype=np.int64)
        pairs = [(u, p) for u, seq in enumerate(self.sequences) for p in range(1, len(seq))]
        self.pairs = np.array(pairs, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        cfg = self.cfg
        m, s_max = cfg.session_items, cfg.history_window
        hist = np.zeros((len(idx), s_max), dtype=np.int64)
        hist_mask = np.zeros((len(idx), s_max), dtype=bool)
        target = np.zeros((len(idx), m), dtype=np.int64)
        target_mask = np.zeros((len(idx), m), dtype=bool)
        for j, (u, p) in enumerate(self.pairs[idx]):
            seq = self.sequences[u]
            h = seq[max(0, p - s_max) : p][::-1]  # newest first
            hist[j, : len(h)], hist_mask[j, : len(h)] = h, True
            t = seq[p : p + m]
            target[j, : len(t)], target_mask[j, : len(t)] = t, True
        width = max(1, int(hist_mask.sum(1).max()))
        hist_codes = self.codes[torch.from_numpy(hist[:, :width])]  # (B, S, D)
        users = torch.from_numpy(self.user_bucket[self.pairs[idx, 0]])
        return (
            hist_codes,
            torch.from_numpy(hist_mask[:, :width]),
            users,
            self.codes[torch.from_numpy(target)],  # (B, m, D)
            torch.from_numpy(target_mask),
        )


def train_model(
    model: OneRecModel,
    sequences: Sequence[np.ndarray],
    user_ids: Sequence[str],
    codes: np.ndarray,
    tcfg: TrainConfig,
    progress: bool = True,
) -> TrainReport:
    """Train in place and leave the best-holdout weights loaded."""
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    torch.manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)
    samples = SessionSamples(sequences, user_ids, codes, model.cfg)
    if len(samples) == 0:
        raise ValueError("no training samples: every training sequence has fewer than 2 items")
    order = rng.permutation(len(samples))
    n_hold = min(len(samples) // 2, max(1, int(len(samples) * tcfg.holdout_share))) if tcfg.holdout_share > 0 else 0
    hold, train_idx = order[:n_hold], order[n_hold:]
    device = torch.device(tcfg.device)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(train_idx) / tcfg.batch_size)
    total = max(1, steps_per_epoch * tcfg.epochs)
    t0 = time.perf_counter()

    def done() -> float:  # training progress in [0, 1]: by steps, or by the clock when that is ahead
        by_steps = report.steps / total
        if tcfg.time_budget_s is None:
            return by_steps
        return max(by_steps, (time.perf_counter() - t0) / max(tcfg.time_budget_s, 1e-9))

    report = TrainReport(epochs=tcfg.epochs, steps=0, samples=len(samples), seconds=0.0)
    warmup = min(tcfg.warmup_steps, max(1, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup, total, done()))
    next_item_only = [1.0] + [0.0] * (model.cfg.session_items - 1)  # holdout: the loss that ranking reads
    best_loss, best_state = float("inf"), None
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress, leave=False)
    for epoch in range(tcfg.epochs):
        if done() >= 1.0:
            break
        model.train()
        perm = rng.permutation(train_idx)
        running, ran = 0.0, 0
        for start in range(0, len(perm), tcfg.batch_size):
            if done() >= 1.0:
                break
            batch = [t.to(device) for t in samples.batch(perm[start : start + tcfg.batch_size])]
            loss, balance = model(*batch, slot_weights=tcfg.slot_weights, label_smoothing=tcfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            (loss + tcfg.balance_weight * balance).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            value = loss.item()
            running += value
            ran += 1
            report.steps += 1
            bar.update(1)
            postfix = {"epoch": epoch + 1, "loss": f"{value:.3f}"}
            if tcfg.time_budget_s is not None:
                postfix["budget_left"] = f"{max(0.0, tcfg.time_budget_s - (time.perf_counter() - t0)) / 60:.1f}min"
            bar.set_postfix(postfix)
        report.train_loss.append(running / max(ran, 1))
        report.epochs_run = epoch + 1
        if n_hold == 0:
            continue
        held = holdout_loss(model, samples, hold, tcfg.batch_size, device, next_item_only)
        report.holdout_loss.append(held)
        if held < best_loss:
            best_loss, report.best_epoch = held, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    elif n_hold == 0:
        report.best_epoch = report.epochs_run
    model.eval()
    report.seconds = time.perf_counter() - t0
    return report


@torch.no_grad()
def holdout_loss(
    model: OneRecModel,
    samples: SessionSamples,
    idx: np.ndarray,
    batch_size: int,
    device: torch.device,
    slot_weights: Sequence[float] | None = None,
) -> float:
    model.eval()
    total, n = 0.0, 0
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        loss, _ = model(*[t.to(device) for t in samples.batch(chunk)], slot_weights=slot_weights)
        total += float(loss) * len(chunk)
        n += len(chunk)
    return total / max(n, 1)


def _lr_factor(step: int, warmup: int, total: int, done: float | None = None) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 5% as training progresses.

    Progress after warm-up is by steps, or `done` (the share of the run finished, e.g. by the clock)
    where that is further along.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if done is not None:
        progress = max(progress, done)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
