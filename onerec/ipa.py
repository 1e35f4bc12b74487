"""Iterative Preference Alignment (DESIGN.md section 2): reward-ranked beams -> DPO + NTP fine-tuning.

Iteration t: for a share of users, beam-search N sessions with M_t (trie-constrained, session mode),
score them with R, take the best as *chosen* and the worst as *rejected*; M_{t+1} starts as a copy of
M_t and trains on L = L_NTP + lambda * L_DPO with a frozen copy of M_t as the DPO reference.

* L_DPO = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) over the summed teacher-forced
  log-probs of every code of the session (``session_log_prob``; unconstrained softmax, as in training).
* L_NTP is the usual next-session loss on random batches of the real training samples, which keeps
  M_{t+1} anchored to observed behaviour while DPO moves it towards what R prefers.
* Fine-tuning runs with dropout off, so the policy's log-probs are the same ones the reference and
  the serving path compute.

The caller's model is never modified: ``run_ipa`` returns a new model.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from onerec.generate import Generator, RecRequest
from onerec.model import OneRecModel, hash_user
from onerec.reward import RewardModel, history_tensors
from onerec.train import SessionSamples
from onerec.trie import TrieIndex


@dataclass
class IpaConfig:
    share: float = 0.01  # share of users sampled per iteration (paper: 1%)
    min_users: int = 32  # ... but at least this many on small worlds
    n_sessions: int = 16  # N beams per user (paper: 128)
    lam: float = 1.0  # weight of L_DPO
    beta: float = 0.1  # DPO temperature
    epochs: int = 2  # passes over the iteration's preference pairs
    batch_size: int = 32
    lr: float = 5e-4
    seed: int = 0


@dataclass
class IpaIteration:
    users: int
    pairs: int
    reward_chosen: float
    reward_rejected: float
    dpo_loss: list[float] = field(default_factory=list)  # per epoch
    ntp_loss: list[float] = field(default_factory=list)  # per epoch
    margin_before: float = 0.0  # mean (pi_c - pi_r) - (ref_c - ref_r) before training (0 at start)
    margin_after: float = 0.0
    seconds: float = 0.0


@dataclass
class IpaReport:
    iterations: list[IpaIteration] = field(default_factory=list)

    def as_dict(self) -> list[dict[str, object]]:
        return [{k: getattr(it, k) for k in it.__dataclass_fields__} for it in self.iterations]


@dataclass
class PreferencePairs:
    """One iteration's training data: per user, the history and the chosen/rejected sessions' codes."""

    hist_codes: torch.Tensor  # (P, S, D)
    hist_mask: torch.Tensor  # (P, S)
    users: torch.Tensor  # (P,) hashed buckets
    chosen: torch.Tensor  # (P, m, D)
    rejected: torch.Tensor  # (P, m, D)
    reward_chosen: torch.Tensor  # (P,)
    reward_rejected: torch.Tensor  # (P,)

    def __len__(self) -> int:
        return len(self.users)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.hist_codes[idx], self.hist_mask[idx], self.users[idx], self.chosen[idx], self.rejected[idx])


def session_log_prob(
    model: OneRecModel,
    hist_codes: torch.Tensor,
    hist_mask: torch.Tensor,
    user: torch.Tensor,
    session_codes: torch.Tensor,
) -> torch.Tensor:
    """Teacher-forced sum of log p(code) over every code of each session: (B,). Same path as forward()."""
    memory = model.encode(hist_codes, hist_mask, user)
    mem_mask = model.memory_mask(hist_mask)
    x = model.decoder_inputs(session_codes)
    for layer in model.decoder:
        x = layer(x, memory, mem_mask)
    x = model.dec_norm(x)  # (B, T, d)
    depth = model.cfg.depth
    flat = session_codes.reshape(session_codes.shape[0], -1)  # (B, T)
    total = x.new_zeros(flat.shape[0], dtype=torch.float32)
    for lvl, head in enumerate(model.heads):
        logp = torch.log_softmax(head(x[:, lvl::depth]).float(), dim=-1)  # (B, m, V_lvl)
        total = total + logp.gather(-1, flat[:, lvl::depth, None]).squeeze(-1).sum(1)
    return total


def dpo_loss(
    pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float
) -> torch.Tensor:
    return -F.logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).mean()


def collect_pairs(
    model: OneRecModel,
    reward: RewardModel,
    trie: TrieIndex,
    histories: Sequence[np.ndarray],
    user_ids: Sequence[str],
    codes: torch.Tensor,
    n_sessions: int,
    batch_size: int = 32,
) -> PreferencePairs:
    """Beam-search N sessions per user with ``model``; chosen = best by R, rejected = worst by R."""
    generator = Generator(model, trie, device=str(next(model.parameters()).device))
    snap = trie.tensors
    m, cap = model.cfg.session_items, model.cfg.max_history
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("hist", "mask", "user", "c", "r", "rc", "rr")}
    for start in range(0, len(histories), batch_size):
        hists = histories[start : start + batch_size]
        uids = user_ids[start : start + batch_size]
        reqs = [
            RecRequest(history=[int(i) for i in h], mode="session", beam_width=n_sessions, user_id=u)
            for h, u in zip(hists, uids)
        ]
        beams = generator.search(reqs, snap, slots=m)
        newest_first = [np.asarray(h)[::-1] for h in hists]
        hist_codes, hist_mask = history_tensors(newest_first, codes, cap)  # what the policy reads
        r_codes, r_mask = history_tensors(newest_first, codes, reward.cfg.max_history)  # what R reads
        for q in range(len(reqs)):
            ok = torch.isfinite(beams.scores[q]) & (beams.items[q] >= 0).all(1)  # (W,)
            if int(ok.sum()) < 2:
                continue
            sessions = codes[beams.items[q][ok]]  # (W', m, D)
            w = len(sessions)
            r = reward.score(r_codes[q : q + 1].expand(w, -1, -1), r_mask[q : q + 1].expand(w, -1), sessions)
            best, worst = int(r.argmax()), int(r.argmin())
            out["hist"].append(hist_codes[q])
            out["mask"].append(hist_mask[q])
            out["user"].append(torch.tensor(hash_user(uids[q], model.cfg.user_buckets)))
            out["c"].append(sessions[best])
            out["r"].append(sessions[worst])
            out["rc"].append(r[best])
            out["rr"].append(r[worst])
    if not out["user"]:
        raise ValueError("IPA found no user with at least two valid beams")
    return PreferencePairs(
        torch.stack(out["hist"]),
        torch.stack(out["mask"]),
        torch.stack(out["user"]),
        torch.stack(out["c"]),
        torch.stack(out["r"]),
        torch.stack(out["rc"]),
        torch.stack(out["rr"]),
    )


@torch.no_grad()
def log_prob_margin(policy: OneRecModel, reference: OneRecModel, pairs: PreferencePairs) -> float:
    """Mean of (pi_c - pi_r) - (ref_c - ref_r): how much more the policy prefers chosen than the reference does."""
    policy.eval()
    h, mk, u, c, r = pairs.take(torch.arange(len(pairs)))
    pi = session_log_prob(policy, h, mk, u, c) - session_log_prob(policy, h, mk, u, r)
    ref = session_log_prob(reference, h, mk, u, c) - session_log_prob(reference, h, mk, u, r)
    return float((pi - ref).mean())


def train_iteration(
    reference: OneRecModel,
    pairs: PreferencePairs,
    samples: SessionSamples,
    cfg: IpaConfig,
    rng: np.random.Generator,
    progress: bool = True,
) -> tuple[OneRecModel, IpaIteration]:
    """M_{t+1} = copy of M_t trained on L_NTP + lambda * L_DPO; ``reference`` (M_t) stays frozen."""
    policy = copy.deepcopy(reference)
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    for p in policy.parameters():
        p.requires_grad_(True)
    n = len(pairs)
    all_idx = torch.arange(n)
    with torch.no_grad():
        h, mk, u, c, r = pairs.take(all_idx)
        ref_c, ref_r = session_log_prob(reference, h, mk, u, c), session_log_prob(reference, h, mk, u, r)
    it = IpaIteration(
        users=n,
        pairs=n,
        reward_chosen=float(pairs.reward_chosen.mean()),
        reward_rejected=float(pairs.reward_rejected.mean()),
        margin_before=log_prob_margin(policy, reference, pairs),
    )
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    steps = math.ceil(n / cfg.batch_size)
    bar = tqdm(total=steps * cfg.epochs, desc="ipa", unit="step", disable=not progress, leave=False)
    policy.eval()  # dropout off: see the module docstring
    for _ in range(cfg.epochs):
        perm = torch.from_numpy(rng.permutation(n))
        dpo_sum = ntp_sum = 0.0
        for start in range(0, n, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            h, mk, u, c, r = pairs.take(idx)
            pi_c, pi_r = session_log_prob(policy, h, mk, u, c), session_log_prob(policy, h, mk, u, r)
            l_dpo = dpo_loss(pi_c, pi_r, ref_c[idx], ref_r[idx], cfg.beta)
            ntp_idx = rng.integers(0, len(samples), size=len(idx))
            l_ntp, _ = policy(*samples.batch(ntp_idx))
            opt.zero_grad(set_to_none=True)
            (l_ntp + cfg.lam * l_dpo).backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            dpo_sum += l_dpo.item() * len(idx)
            ntp_sum += l_ntp.item() * len(idx)
            bar.update(1)
            bar.set_postfix(dpo=f"{l_dpo.item():.4f}")
        it.dpo_loss.append(dpo_sum / n)
        it.ntp_loss.append(ntp_sum / n)
    bar.close()
    for p in policy.parameters():
        p.requires_grad_(False)
    it.margin_after = log_prob_margin(policy, reference, pairs)
    return policy, it


def run_ipa(
    model: OneRecModel,
    reward: RewardModel,
    trie: TrieIndex,
    sequences: Sequence[np.ndarray],
    user_ids: Sequence[str],
    codes: np.ndarray,
    iterations: int,
    cfg: IpaConfig | None = None,
    progress: bool = True,
) -> tuple[OneRecModel, IpaReport]:
    """Run ``iterations`` rounds of IPA; returns the final model and the per-iteration report."""
    cfg = cfg or IpaConfig()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    code_t = torch.from_numpy(np.asarray(codes, dtype=np.int64))
    samples = SessionSamples(sequences, user_ids, codes, model.cfg)
    eligible = np.array([u for u, s in enumerate(sequences) if len(s) >= 1], dtype=np.int64)
    n_users = min(len(eligible), max(cfg.min_users, math.ceil(cfg.share * len(eligible))))
    report = IpaReport()
    current = model
    for _ in range(iterations):
        t0 = time.perf_counter()
        chosen_users = rng.choice(eligible, size=n_users, replace=False)
        pairs = collect_pairs(
            current,
            reward,
            trie,
            [sequences[u] for u in chosen_users],
            [user_ids[u] for u in chosen_users],
            code_t,
            cfg.n_sessions,
        )
        current, it = train_iteration(current, pairs, samples, cfg, rng, progress)
        it.users = n_users
        it.seconds = time.perf_counter() - t0
        report.iterations.append(it)
    for p in model.parameters():  # collect_pairs/train_iteration froze it as the reference
        p.requires_grad_(True)
    return current, report


@torch.no_grad()
def true_session_affinity(
    model: OneRecModel,
    trie: TrieIndex,
    affinity: np.ndarray,
    histories: Sequence[np.ndarray],
    user_ids: Sequence[str],
    beam_width: int = 16,
) -> float:
    """Mean over users of sum_i true_affinity[u, i] over the items of the model's top session.

    ``affinity`` is (len(histories), n_items), row j for user j (synthetic world only).
    """
    generator = Generator(model, trie, device=str(next(model.parameters()).device))
    reqs = [
        RecRequest(history=[int(i) for i in h], mode="session", beam_width=beam_width, user_id=u)
        for h, u in zip(histories, user_ids)
    ]
    beams = generator.search(reqs, trie.tensors, slots=model.cfg.session_items)
    top = beams.items[:, 0].numpy()  # (Q, m), sorted by score so beam 0 is the best
    values = [affinity[j, row[row >= 0]].sum() for j, row in enumerate(top)]
    return float(np.mean(values))
