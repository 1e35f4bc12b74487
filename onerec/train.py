"""Next-token-prediction training over sessions: (history prefix -> the next m items).

Every position p of a user's training sequence is a sample: the encoder reads the items before p
(newest first, at most ``history_window``), the decoder is taught the codes of items p .. p+m-1. The
loss is the mean cross-entropy per code plus the MoE load-balancing term; AdamW with warm-up and
cosine decay; the weights of the epoch with the best selection loss are kept (with
``average_epochs``, the moving average of the weights at that epoch).

Selection. Given validation rows (each user's next item after the training sequence), the best
epoch is the one whose next-item loss on them is lowest, and every training sample trains. Without
them, a random ``holdout_share`` of the samples is kept out instead; those samples share users and
items with training (the target of one is in the history of the next), so that loss keeps falling
while the next item after the sequence gets worse: it picks late, overfitted epochs.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from onerec.data import EvalSet
from onerec.data_parallel import GradientGroup, usable_processes
from onerec.model import (
    CANDIDATE_RECENCY,
    CANDIDATE_WINDOW,
    ModelConfig,
    NextItemTargets,
    OneRecModel,
    hash_user,
    part_counts,
)
from onerec.reward import history_tensors
from onerec.tokenizer import cooccurrence


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
    # Weight of the auxiliary item-level softmax (OneRecModel.next_item_logits) added to the loss; 0: off.
    next_item_weight: float = 0.0
    # Average the weights over about this many epochs (an exponential moving average, see
    # WeightAverage; None: off). Selection and the published model then read the averaged weights.
    average_epochs: float | None = None
    # Wall-clock budget of the training loop (None: none). The learning-rate schedule follows
    # progress = max(steps done / planned steps, seconds spent / budget) and training stops at 1, so
    # a slow machine trains fewer steps but still warms up, decays and finishes on time.
    time_budget_s: float | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    # Data-parallel processes on CPU (onerec.data_parallel), at most one per usable core: each takes
    # its share of every batch, so a step of the same batch takes about 1/processes of the time.
    processes: int = 1
    # Batches cut from chunks of this many batches' samples sorted by history length (0: plain random
    # batches). Why: a batch pads every history to its longest, and nearly every random batch of a
    # Beauty-sized file holds one full window, so the encoder ran on padding (length_sorted_batches).
    # It pays with a wide window, where random batches pad to it nearly always: on Beauty it lost at a
    # window of 20 and won at 50 (the figures: sequence_file_config and README rounds 21 and 42).
    sorted_chunk_batches: int = 0
    # Each sample's loss weighs exp(-age / sample_decay), age = items after its target in the user's
    # training sequence (0: every sample weighs 1). Why: the newest samples are the closest in time to the
    # evaluation rows and to what the service will be asked, as with the candidates' faded count
    # (ModelConfig.candidate_decay). The recipe's scale: 2 mean training sequences (BuildConfig.sample_decay_length).
    sample_decay: float = 0.0
    # Each sample's loss is also divided by (its user's number of samples) ** user_balance (0: off; 1: every
    # user weighs the same in total). Why: the metrics count each user once, while the loss counts each
    # sample, so the 5% of Beauty's users with 20 or more items hold a quarter of the samples.
    user_balance: float = 0.0


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
    processes: int = 1  # data-parallel processes that trained (TrainConfig.processes, where usable)

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class WeightAverage:
    """An exponential moving average of a model's parameters.

    Why: on a Beauty-sized file the validation loss turns up while the learning rate is still high,
    so the kept epoch is a single noisy point of the trajectory, and the average over the last epoch
    or so is a smoother one. On the first copy-head recipe it lowered the validation loss but moved no
    ranking metric beyond run-to-run noise (quality_beauty_cpu_levers5.json); on the recipe of round 33
    it lowered the validation loss on every seed and raised test R@10 / N@10 on average (levers40.json,
    levers41.json), so the recipe averages over one epoch. The decay follows the number of steps it
    should span, and starts low (``(1 + n) / (10 + n)``) so the random initial weights fade out quickly.
    """

    def __init__(self, model: torch.nn.Module, span_steps: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = 1.0 - 1.0 / max(1.0, span_steps)
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)
        self.updates += 1

    @torch.no_grad()
    def load_into_model(self) -> None:
        """The model's parameters become the averaged ones."""
        torch._foreach_copy_(self.params, self.shadow)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own ones again after."""
        own = [p.detach().clone() for p in self.params]
        self.load_into_model()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, own)


class SessionSamples:
    """All (user, position) samples of the training sequences, materialised as batches on demand."""

    def __init__(self, sequences: Sequence[np.ndarray], user_ids: Sequence[str], codes: np.ndarray, cfg: ModelConfig):
        self.sequences = [np.asarray(s, dtype=np.int64) for s in sequences]
        self.codes = torch.from_numpy(np.asarray(codes, dtype=np.int64))  # (I, D)
        self.cfg = cfg
        self.user_bucket = np.array([hash_user(u, cfg.user_buckets) for u in user_ids], dtype=np.int64)
        pairs = [(u, p) for u, seq in enumerate(self.sequences) for p in range(1, len(seq))]
        self.pairs = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        lengths = np.array([len(s) for s in self.sequences], dtype=np.int64)
        self.ages = (lengths[self.pairs[:, 0]] - 1 - self.pairs[:, 1]).astype(np.float64)  # items after each target
        self.user_samples = (lengths[self.pairs[:, 0]] - 1).astype(np.float64)  # each sample's user's sample count
        self.candidates = (
            leave_user_out_candidates(self.sequences, self.pairs, cfg.history_window, cfg.catalogue_items,
                                      cfg.candidate_tokens, cfg.candidate_backward, cfg.candidate_sources,
                                      cfg.candidate_transitions, cfg.candidate_directions, cfg.candidate_decay,
                                      cfg.candidate_recency)
            if cfg.candidate_tokens
            else None
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.pairs)

    def history_lengths(self) -> np.ndarray:
        """(N,) how many history items each sample's encoder reads (its position, cut to the window)."""
        return np.minimum(self.pairs[:, 1], self.cfg.history_window)

    def histories(self, histories: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Histories (oldest first) as the encoder reads them: codes (B, S, D) newest first, mask (B, S)."""
        newest_first = [np.asarray(h, dtype=np.int64)[::-1] for h in histories]
        return history_tensors(newest_first, self.codes, self.cfg.history_window)

    def next_item_batch(self, rows: EvalSet, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Evaluation rows `idx` as a batch of one-slot targets: history -> the row's next item."""
        target = torch.from_numpy(np.asarray(rows.targets, dtype=np.int64)[idx])[:, None]  # (B, 1)
        return (
            *self.histories([rows.histories[i] for i in idx]),
            torch.from_numpy(self.user_bucket[np.asarray(rows.users, dtype=np.int64)[idx]]),
            self.codes[target],  # (B, 1, D)
            torch.ones(len(idx), 1, dtype=torch.bool),
        )

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        m = self.cfg.session_items
        target = np.zeros((len(idx), m), dtype=np.int64)
        target_mask = np.zeros((len(idx), m), dtype=bool)
        for j, (u, p) in enumerate(self.pairs[idx]):
            t = self.sequences[u][p : p + m]
            target[j, : len(t)], target_mask[j, : len(t)] = t, True
        return (
            *self.histories([self.sequences[u][:p] for u, p in self.pairs[idx]]),
            torch.from_numpy(self.user_bucket[self.pairs[idx, 0]]),
            self.codes[torch.from_numpy(target)],  # (B, m, D)
            torch.from_numpy(target_mask),
        )

    def next_items(self, idx: np.ndarray, weight: float, device: torch.device) -> NextItemTargets | None:
        """The samples' next items (their first slot) as targets of the item-level softmax over every
        item; None when its weight is 0."""
        if weight <= 0:
            return None
        targets = np.array([self.sequences[u][p] for u, p in self.pairs[idx]], dtype=np.int64)
        return NextItemTargets(self.codes.to(device), torch.from_numpy(targets).to(device), weight)

    def sample_weights(
        self, idx: np.ndarray, decay: float, device: torch.device, user_balance: float = 0.0
    ) -> torch.Tensor | None:
        """(B,) each sample's loss weight, exp(-(items after its target) / decay) / (its user's samples) **
        user_balance; None when both are 0."""
        if decay <= 0 and user_balance <= 0:
            return None
        weight = np.exp(-self.ages[idx] / decay) if decay > 0 else np.ones(len(idx))
        if user_balance > 0:
            weight = weight / self.user_samples[idx] ** user_balance
        return torch.from_numpy(weight).float().to(device)

    def batch_candidates(self, idx: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The samples' candidates computed without their own user's sequence: (B, K) rows and (B, K)
        scores, or (B, K, R) per-source shares, on `device`; None for a model without candidates."""
        if self.candidates is None:
            return None
        rows, scores = self.candidates
        return torch.from_numpy(rows[idx].astype(np.int64)).to(device), torch.from_numpy(scores[idx]).to(device)


def train_model(
    model: OneRecModel,
    sequences: Sequence[np.ndarray],
    user_ids: Sequence[str],
    codes: np.ndarray,
    tcfg: TrainConfig,
    progress: bool = True,
    selection: EvalSet | None = None,
) -> TrainReport:
    """Train in place and leave the best epoch's weights loaded (best on `selection` when given,
    else on a random holdout of the samples; see the module docstring)."""
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    torch.manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)
    samples = SessionSamples(sequences, user_ids, codes, model.cfg)
    if len(samples) == 0:
        raise ValueError("no training samples: every training sequence has fewer than 2 items")
    order = rng.permutation(len(samples))
    share = 0.0 if selection is not None else tcfg.holdout_share
    n_hold = min(len(samples) // 2, max(1, int(len(samples) * share))) if share > 0 else 0
    hold, train_idx = order[:n_hold], order[n_hold:]
    device = torch.device(tcfg.device)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(train_idx) / tcfg.batch_size)
    lengths = samples.history_lengths()
    total = max(1, steps_per_epoch * tcfg.epochs)
    t0 = time.perf_counter()
    report = TrainReport(epochs=tcfg.epochs, steps=0, samples=len(samples), seconds=0.0)
    report.processes = usable_processes(tcfg.processes, tcfg.device)
    group = GradientGroup.fork(report.processes, tcfg.seed) if report.processes > 1 else None
    rank = group.rank if group is not None else 0
    clock = 0.0  # rank 0's share of the budget spent, as of the last step (what every process follows)

    def budget_spent() -> float:  # this process's share of the time budget spent (0 without one)
        return 0.0 if tcfg.time_budget_s is None else (time.perf_counter() - t0) / max(tcfg.time_budget_s, 1e-9)

    def done() -> float:  # training progress in [0, 1]: by steps, or by the clock when that is ahead
        return max(report.steps / total, budget_spent() if group is None else clock)

    warmup = min(tcfg.warmup_steps, max(1, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup, total, done()))
    next_item_only = [1.0] + [0.0] * (model.cfg.session_items - 1)  # holdout: the loss that ranking reads
    best_loss, best_state = float("inf"), None
    average = WeightAverage(model, tcfg.average_epochs * steps_per_epoch) if tcfg.average_epochs else None
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress or rank != 0, leave=False)
    try:
        for epoch in range(tcfg.epochs):
            if done() >= 1.0:
                break
            model.train()
            batches = length_sorted_batches(
                rng.permutation(train_idx), lengths, tcfg.batch_size, tcfg.sorted_chunk_batches, rng
            )
            running, ran = 0.0, 0
            for idx in batches:
                if done() >= 1.0:
                    break
                mine = own_share(group, idx)
                opt.zero_grad(set_to_none=True)
                value = 0.0
                if len(mine):
                    loss, balance = model(
                        *[t.to(device) for t in samples.batch(mine)],
                        slot_weights=tcfg.slot_weights,
                        label_smoothing=tcfg.label_smoothing,
                        candidates=samples.batch_candidates(mine, device),
                        next_items=samples.next_items(mine, tcfg.next_item_weight, device),
                        sample_weights=samples.sample_weights(mine, tcfg.sample_decay, device, tcfg.user_balance),
                    )
                    (loss + tcfg.balance_weight * balance).backward()
                    value = loss.item()
                if group is not None:
                    totals = group.sum_gradients(params, len(mine), value, budget_spent())
                    value, clock = totals.loss, totals.clock
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                if average is not None:
                    average.update()
                running += value
                ran += 1
                report.steps += 1
                bar.update(1)
                postfix = {"epoch": epoch + 1, "loss": f"{value:.3f}"}
                if tcfg.time_budget_s is not None:
                    postfix["budget_left"] = f"{max(0.0, 1.0 - budget_spent()) * tcfg.time_budget_s / 60:.1f}min"
                bar.set_postfix(postfix)
            report.train_loss.append(running / max(ran, 1))
            report.epochs_run = epoch + 1
            with average.applied() if average is not None else nullcontext():
                if selection is not None:
                    rows = own_share(group, np.arange(len(selection)))
                    held = selection_loss(model, samples, selection, tcfg.batch_size, device, rows)
                elif n_hold > 0:
                    rows = own_share(group, hold)
                    held = holdout_loss(model, samples, rows, tcfg.batch_size, device, next_item_only)
                else:
                    continue
                if group is not None:  # every process scored its share of the rows
                    held = group.mean(held, len(rows))
                if rank != 0:  # rank 0 keeps the best weights (every process holds the same ones)
                    continue
                report.holdout_loss.append(held)
                if held < best_loss:
                    best_loss, report.best_epoch = held, epoch + 1
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if progress:
                what = "validation next-item" if selection is not None else "holdout slot-1"
                bar.write(
                    f"[train] epoch {epoch + 1}: train loss {report.train_loss[-1]:.4f}, {what} loss {held:.4f}"
                    f" (best {best_loss:.4f}, epoch {report.best_epoch})",
                    file=sys.stderr,
                )
    except BaseException:
        if group is not None:
            group.abort()
        raise
    if group is not None:
        group.close()  # a peer exits here
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        report.best_epoch = report.epochs_run
        if average is not None:  # nothing to select on: publish the averaged weights
            average.load_into_model()
    model.eval()
    report.seconds = time.perf_counter() - t0
    return report


def length_sorted_batches(
    perm: np.ndarray, lengths: np.ndarray, batch_size: int, chunk_batches: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """An epoch's batches from a random permutation of sample indices.

    With ``chunk_batches`` > 0 the permutation is cut into chunks of that many batches, each chunk is
    sorted by history length (stably, so equal lengths stay in random order) and cut into batches,
    and the batches of every chunk are shuffled together. A batch then pads to a length close to its
    samples' own, every sample still trains once per epoch, and a chunk of many batches keeps the
    samples that meet in a batch random among those of similar length. ``lengths`` is indexed by
    sample. Every batch has ``batch_size`` samples except one per chunk (the chunk's last).
    """
    if chunk_batches <= 0:
        return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    chunk = batch_size * chunk_batches
    batches: list[np.ndarray] = []
    for start in range(0, len(perm), chunk):
        part = perm[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def own_share(group: GradientGroup | None, rows: np.ndarray) -> np.ndarray:
    """The rows (of a batch, or of the epoch's selection rows) this process takes: all of them when it
    trains alone."""
    return rows if group is None else group.shard(rows)


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
        loss, _ = model(
            *[t.to(device) for t in samples.batch(chunk)],
            slot_weights=slot_weights,
            candidates=samples.batch_candidates(chunk, device),
        )
        total += float(loss) * len(chunk)
        n += len(chunk)
    return total / max(n, 1)


@torch.no_grad()
def selection_loss(
    model: OneRecModel,
    samples: SessionSamples,
    rows: EvalSet,
    batch_size: int,
    device: torch.device,
    subset: np.ndarray | None = None,
) -> float:
    """Mean next-item loss (per code) on evaluation rows (or the rows `subset` of them): what picks
    the best epoch. The rows go by history length, so that a batch pads little (the mean does not
    depend on the order)."""
    model.eval()
    order = np.arange(len(rows)) if subset is None else np.asarray(subset)
    window = samples.cfg.history_window
    order = order[np.argsort([min(len(rows.histories[i]), window) for i in order], kind="stable")]
    total = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        loss, _ = model(*[t.to(device) for t in samples.next_item_batch(rows, idx)])
        total += float(loss) * len(idx)
    return total / max(len(order), 1)


def leave_user_out_candidates(
    sequences: Sequence[np.ndarray],
    pairs: np.ndarray,
    history_window: int,
    n_items: int,
    k: int,
    backward: float = 1.0,
    sources: bool = False,
    transitions: bool = False,
    directions: bool = False,
    decay: float = 0.0,
    recency: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's K co-occurrence candidates as the model computes them at serving time, but from
    neighbour lists built without the sample's own user: (N, K) int32 rows (-1 = none) and (N, K)
    float32 scores (0 = none), or with ``sources`` (N, K, R) each of the newest R = 3 history items'
    share of the score (``ModelConfig.candidate_sources``), with ``transitions`` followed by each share
    over its source's neighbour mass (``ModelConfig.candidate_transitions``), with ``directions`` then by
    the fraction of each share counted after its source (``ModelConfig.candidate_directions``), with
    ``recency`` > 0 then by the fraction left when the count fades at that scale (``candidate_recency``).

    At serving time the user's next item has never co-occurred with their history in training data;
    with their own sequence counted, a training sample's target would always be a candidate, and the
    model would learn to trust candidates more than they deserve. Same scoring as
    ``OneRecModel.candidates``: per history item its K strongest neighbours, the newest three summed
    with weights 1, 0.5, 0.25, history items dropped, the K best kept; ``backward`` and ``decay`` as in
    ``onerec.tokenizer.cooccurrence`` (the user's own pairs fade by their age in the user's own sequence,
    exactly as they were counted into the global lists).
    """
    rows, cols, weights = cooccurrence(sequences, n_items, CANDIDATE_WINDOW, backward, decay)
    indptr = np.searchsorted(rows, np.arange(n_items + 1))
    part_settings = part_counts(backward, decay, directions, recency)  # each part of the weights: its count
    parts = []
    for part_backward, part_decay in part_settings:
        prows, pcols, pweights = cooccurrence(sequences, n_items, CANDIDATE_WINDOW, part_backward, part_decay)
        parts.append((pcols, pweights, np.searchsorted(prows, np.arange(n_items + 1))))
    out = np.full((len(pairs), k), -1, dtype=np.int32)
    out_scores = np.zeros((len(pairs), k), dtype=np.float32)
    r = len(CANDIDATE_RECENCY)
    out_shares = np.zeros((len(pairs), k, r * (1 + transitions + len(parts))) if sources else (0, k, 0), np.float32)
    shares = np.zeros((r, n_items))
    part_shares = np.zeros((len(parts), r, n_items))  # each part of the shares
    masses = np.zeros(r)
    own_user = -1
    for n, (u, p) in enumerate(pairs):
        if u != own_user:  # pairs are grouped by user: their own co-occurrence, once per user
            own_rows, own_cols, own_weights = cooccurrence([sequences[u]], n_items, CANDIDATE_WINDOW, backward, decay)
            own_parts = [cooccurrence([sequences[u]], n_items, CANDIDATE_WINDOW, *ps) for ps in part_settings]
            own_user = u
        hist = sequences[u][max(0, p - history_window) : p]
        touched = []
        for recency, weight in enumerate(CANDIDATE_RECENCY[: len(hist)]):
            h = hist[-1 - recency]
            nb, val = cols[indptr[h] : indptr[h + 1]], weights[indptr[h] : indptr[h + 1]].copy()
            mine = own_rows == h  # the user's own pairs are in the global row: take them out
            val[np.searchsorted(nb, own_cols[mine])] -= own_weights[mine]
            order = np.lexsort((nb, -val))[:k]
            order = order[val[order] > 1e-9]
            shares[recency, nb[order]] += weight * val[order]
            masses[recency] = weight * val[order].sum()
            for j, ((pcols, pweights, pindptr), (own_prows, own_pcols, own_pweights)) in enumerate(
                zip(parts, own_parts, strict=True)
            ):  # a part's pairs are a subset of the count's
                pnb, pval = pcols[pindptr[h] : pindptr[h + 1]], pweights[pindptr[h] : pindptr[h + 1]].copy()
                pmine = own_prows == h
                pval[np.searchsorted(pnb, own_pcols[pmine])] -= own_pweights[pmine]
                part = np.zeros(len(nb))
                part[np.searchsorted(nb, pnb)] = pval
                part_shares[j, recency, nb[order]] += weight * part[order]
            touched.append(nb[order])
        if not touched:
            continue
        cand = np.unique(np.concatenate(touched))
        shares[:, hist] = 0.0
        score = shares[:, cand].sum(0)
        best = np.argsort(-score, kind="stable")[:k]
        best = best[score[best] > 1e-9]
        out[n, : len(best)] = cand[best]
        out_scores[n, : len(best)] = score[best]
        if sources:
            share = shares[:, cand[best]].T  # (kept, R)
            out_shares[n, : len(best), :r] = share
            if transitions:
                out_shares[n, : len(best), r : 2 * r] = share / np.maximum(masses, 1e-6)
            for j in range(len(parts)):
                part_share = part_shares[j][:, cand[best]].T
                fraction = np.where(share > 0, part_share / np.maximum(share, 1e-9), 0.0).clip(0.0, 1.0)
                at = r * (1 + transitions + j)
                out_shares[n, : len(best), at : at + r] = fraction
        shares[:, cand] = 0.0
        part_shares[:, :, cand] = 0.0
        masses[:] = 0.0
    return out, (out_shares if sources else out_scores)


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
