"""Iterative Preference Alignment (DESIGN.md section 2): reward-ranked beams -> DPO + NTP fine-tuning.

Iteration t: for a share of users, beam-search N sessions with M_t (trie-constrained, session mode),
score them with R, take the best as *chosen* and the worst as *rejected*; M_{t+1} starts as a copy of
M_t and trains on L = L_NTP + lambda * L_DPO with a frozen copy of M_t as the DPO reference.

* L_DPO = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) over the summed teacher-forced
  log-probs of every code of the session (``session_log_prob``). With ``IpaConfig.constrained`` (the
  default) each position's softmax is renormalised over the codes the constrained search could pick
  there (trie children with a live item the request does not ban: its history, the session's earlier
  slots; ``allowed_codes``), so a session's log-prob is exactly the score its beam was ranked by. The
  plain softmax (as in training) differs from that score by 5-10 nats on the tests' tiny model: it counts
  mass on codes the search can never take, so DPO would partly push on paths nobody serves.
* L_NTP is the usual next-session loss on random batches of the real training samples of the users
  IPA may sample, which keeps M_{t+1} anchored to observed behaviour while DPO moves it towards
  what R prefers. ``IpaConfig.ntp`` weighs it (the paper's 1). On the demo world more NTP steps on
  data the model was already fitted to cost held-out Recall@10 by themselves; ``IpaConfig.anchor``
  (a KL to M_0 on the same batch) holds the model where pre-training left it without that cost.
* Fine-tuning runs with dropout off, so the policy's log-probs are the same ones the reference and
  the serving path compute.

The caller's model is never modified: ``run_ipa`` returns a new model. ``run_ipa(users=pool)`` samples
from a pool only; ``holdout_users``, ``measure_users`` and ``compare`` measure the result on users it
never sampled (``benchmarks/ipa.py``).
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
from onerec.reward import SessionReward, history_tensors
from onerec.train import SessionSamples
from onerec.trie import TrieIndex

Masks = list[torch.Tensor]  # per semantic-ID level, (B, m, V_l) bool: the codes a position may take


@dataclass
class IpaConfig:
    share: float = 0.01  # share of users sampled per iteration (paper: 1%)
    min_users: int = 32  # ... but at least this many on small worlds
    n_sessions: int = 16  # N beams per user (paper: 128)
    lam: float = 1.0  # weight of L_DPO
    ntp: float = 1.0  # weight of L_NTP (the paper's 1; 0 leaves ``anchor`` as the only pull towards M_0)
    beta: float = 0.1  # DPO temperature
    epochs: int = 2  # passes over the iteration's preference pairs
    batch_size: int = 32
    ntp_batch_size: int = 0  # real samples per step for L_NTP (0: as many as the step's pairs)
    lr: float = 1e-4  # 5e-4 moved every weight by ~lr per Adam step: recall fell even with lambda = 0
    chosen_nll: float = 0.0  # weight of -log pi(chosen) per code (RPO-style), 0 = the paper's loss
    dpo_first_slot: int = 0  # DPO log-probs sum the slots from this one on (0: the whole session)
    constrained: bool = True  # DPO log-probs renormalised over the trie's allowed codes, as beams are ranked
    # Weight of KL(M_0 || policy) over the first slot's codes on L_NTP's batch, M_0 = the model IPA started
    # from (0: off). Next-item answers read slot 1; this keeps it where pre-training put it.
    anchor: float = 0.0
    train_only: str = ""  # comma-separated parameter-name prefixes IPA updates ("": every parameter)
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
    sampled_users: list[int] = field(default_factory=list)  # indices of the users whose beams were paired


@dataclass
class IpaReport:
    iterations: list[IpaIteration] = field(default_factory=list)

    def sampled_users(self) -> set[int]:
        """Every user any iteration beam-searched and trained on."""
        return {u for it in self.iterations for u in it.sampled_users}

    def as_dict(self) -> list[dict[str, object]]:
        return [{k: getattr(it, k) for k in it.__dataclass_fields__} for it in self.iterations]


@dataclass
class PreferencePairs:
    """One iteration's training data: per user, the history and the chosen/rejected sessions.

    ``chosen_allowed`` / ``rejected_allowed`` hold, per level, the (P, m, V_l) masks of the codes the
    constrained search could pick at each position of that session (``allowed_codes``).
    """

    hist_codes: torch.Tensor  # (P, S, D)
    hist_mask: torch.Tensor  # (P, S)
    users: torch.Tensor  # (P,) hashed buckets
    chosen: torch.Tensor  # (P, m, D)
    rejected: torch.Tensor  # (P, m, D)
    reward_chosen: torch.Tensor  # (P,)
    reward_rejected: torch.Tensor  # (P,)
    chosen_items: torch.Tensor  # (P, m)
    rejected_items: torch.Tensor  # (P, m)
    chosen_allowed: Masks
    rejected_allowed: Masks
    user_index: torch.Tensor  # (P,) the user's index (``user_index`` of collect_pairs, else position)
    all_items: list[torch.Tensor] = field(default_factory=list)  # with keep_all: per pair, every valid beam (W', m)
    all_rewards: list[torch.Tensor] = field(default_factory=list)  # ... and R of each, (W',)

    def __len__(self) -> int:
        return len(self.users)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.hist_codes[idx], self.hist_mask[idx], self.users[idx], self.chosen[idx], self.rejected[idx])

    def masks(self, idx: torch.Tensor, constrained: bool) -> tuple[Masks | None, Masks | None]:
        """The chosen and rejected sessions' allowed-code masks for ``idx`` (None, None: plain softmax)."""
        if not constrained:
            return None, None
        return [m[idx] for m in self.chosen_allowed], [m[idx] for m in self.rejected_allowed]


def allowed_codes(
    item_codes: torch.Tensor,
    available: torch.Tensor,
    session_items: torch.Tensor,
    level_sizes: Sequence[int],
) -> list[torch.Tensor]:
    """The codes the constrained beam search could pick at every position of each given session.

    item_codes (I, D): every item's code path; available (B, I): live items the request does not ban
    (its history and exclusions); session_items (B, m): the session, slot by slot. Position (slot j,
    level l) allows code v iff some available item, not already in slots < j, has the session's own
    prefix at levels < l and code v at level l: exactly the trie children ``trie_topk`` keeps (a child
    is banned when every live item below it is). Returns per level a (B, m, V_l) bool mask.

    The masks depend on the catalogue and the session only, never on the model, so IPA computes them
    once per preference pair.
    """
    b, m = session_items.shape
    earlier = torch.zeros(b, m, item_codes.shape[0], dtype=torch.bool)
    for j in range(1, m):  # slot j may not repeat any of slots < j
        earlier[:, j] = earlier[:, j - 1]
        earlier[torch.arange(b), j, session_items[:, j - 1]] = True
    free = available[:, None, :] & ~earlier  # (B, m, I)
    sess = item_codes[session_items]  # (B, m, D)
    prefix_ok = torch.ones_like(free)
    masks = []
    for lvl, size in enumerate(level_sizes):
        onehot = F.one_hot(item_codes[:, lvl], size).float()  # (I, V_l)
        reach = (free & prefix_ok).float() @ onehot  # (B, m, V_l): available items under each child
        masks.append(reach > 0)
        prefix_ok = prefix_ok & (item_codes[None, None, :, lvl] == sess[:, :, None, lvl])
    return masks


def session_log_prob(
    model: OneRecModel,
    hist_codes: torch.Tensor,
    hist_mask: torch.Tensor,
    user: torch.Tensor,
    session_codes: torch.Tensor,
    allowed: Sequence[torch.Tensor] | None = None,
    first_slot: int = 0,
) -> torch.Tensor:
    """Teacher-forced sum of log p(code) over every code of each session: (B,). Same path as forward().

    With ``allowed`` (per level a (B, m, V_l) bool mask from ``allowed_codes``) each position's
    log-softmax is renormalised over the allowed codes only, as the constrained beam search scores a
    path: the sum is then the beam's own score. Without it, the plain softmax of training.
    """
    log_probs, _ = model.position_log_probs(hist_codes, hist_mask, user, session_codes)  # per level (B, m, V_lvl)
    depth = model.cfg.depth
    flat = session_codes.reshape(session_codes.shape[0], -1)  # (B, T)
    total = flat.new_zeros(flat.shape[0], dtype=torch.float32)
    for lvl, logp in enumerate(log_probs):
        if allowed is not None:
            logp = torch.log_softmax(logp.masked_fill(~allowed[lvl], float("-inf")), dim=-1)
        total = total + logp.gather(-1, flat[:, lvl::depth, None]).squeeze(-1)[:, first_slot:].sum(1)
    return total


def dpo_loss(
    pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float
) -> torch.Tensor:
    return -F.logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).mean()


def collect_pairs(
    model: OneRecModel,
    reward: SessionReward,
    trie: TrieIndex,
    histories: Sequence[np.ndarray],
    user_ids: Sequence[str],
    codes: torch.Tensor,
    n_sessions: int,
    batch_size: int = 32,
    user_index: Sequence[int] | None = None,
    keep_all: bool = False,
) -> PreferencePairs:
    """Beam-search N sessions per user with ``model``; chosen = best by R, rejected = worst by R.

    ``user_index[j]`` (default j) is recorded for user j's pair; ``keep_all`` also keeps every beam and
    its reward (for diagnostics).
    """
    generator = Generator(model, trie, device=str(next(model.parameters()).device))
    snap = trie.tensors
    m, cap = model.cfg.session_items, model.cfg.history_window
    n_items = snap.item_codes.shape[0]
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("hist", "mask", "user", "c", "r", "rc", "rr", "ci", "ri")}
    avail: list[torch.Tensor] = []
    index: list[int] = []
    all_items: list[torch.Tensor] = []
    all_rewards: list[torch.Tensor] = []
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
        pad = cap - hist_codes.shape[1]  # every batch to the full width, so pairs of all batches stack
        hist_codes, hist_mask = F.pad(hist_codes, (0, 0, 0, pad)), F.pad(hist_mask, (0, pad))
        r_codes, r_mask = history_tensors(newest_first, codes, reward.cfg.history_window)  # what R reads
        for q, req in enumerate(reqs):
            ok = torch.isfinite(beams.scores[q]) & (beams.items[q] >= 0).all(1)  # (W,)
            if int(ok.sum()) < 2:
                continue
            items = beams.items[q][ok]  # (W', m)
            sessions = codes[items]  # (W', m, D)
            w = len(sessions)
            r = reward.score(r_codes[q : q + 1].expand(w, -1, -1), r_mask[q : q + 1].expand(w, -1), sessions)
            best, worst = int(r.argmax()), int(r.argmin())
            free = snap.item_live.clone()  # what the search may pick for this request (generator's bans)
            banned = [i for i in req.history if 0 <= i < n_items] if req.exclude_history else []
            free[torch.tensor(banned + list(req.exclude), dtype=torch.int64)] = False
            out["hist"].append(hist_codes[q])
            out["mask"].append(hist_mask[q])
            out["user"].append(torch.tensor(hash_user(uids[q], model.cfg.user_buckets)))
            out["c"].append(sessions[best])
            out["r"].append(sessions[worst])
            out["rc"].append(r[best])
            out["rr"].append(r[worst])
            out["ci"].append(items[best])
            out["ri"].append(items[worst])
            avail.append(free)
            index.append(start + q if user_index is None else int(user_index[start + q]))
            if keep_all:
                all_items.append(items)
                all_rewards.append(r)
    if not out["user"]:
        raise ValueError("IPA found no user with at least two valid beams")
    st = {k: torch.stack(v) for k, v in out.items()}
    available = torch.stack(avail)
    levels = list(model.cfg.level_sizes)
    return PreferencePairs(
        st["hist"],
        st["mask"],
        st["user"],
        st["c"],
        st["r"],
        st["rc"],
        st["rr"],
        st["ci"],
        st["ri"],
        allowed_codes(snap.item_codes, available, st["ci"], levels),
        allowed_codes(snap.item_codes, available, st["ri"], levels),
        torch.tensor(index, dtype=torch.int64),
        all_items,
        all_rewards,
    )


def pair_log_probs(
    model: OneRecModel, pairs: PreferencePairs, idx: torch.Tensor, constrained: bool, first_slot: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(chosen) and log pi(rejected) of the pairs ``idx``, trie-renormalised when ``constrained``."""
    h, mk, u, c, r = pairs.take(idx)
    mc, mr = pairs.masks(idx, constrained)
    return (
        session_log_prob(model, h, mk, u, c, mc, first_slot),
        session_log_prob(model, h, mk, u, r, mr, first_slot),
    )


@torch.no_grad()
def log_prob_margin(
    policy: OneRecModel, reference: OneRecModel, pairs: PreferencePairs, constrained: bool = True
) -> float:
    """Mean of (pi_c - pi_r) - (ref_c - ref_r): how much more the policy prefers chosen than the reference does."""
    policy.eval()
    idx = torch.arange(len(pairs))
    pi_c, pi_r = pair_log_probs(policy, pairs, idx, constrained)
    ref_c, ref_r = pair_log_probs(reference, pairs, idx, constrained)
    return float(((pi_c - pi_r) - (ref_c - ref_r)).mean())


def first_slot_kl(base: OneRecModel, policy: OneRecModel, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """KL(base || policy) of the teacher-forced code distributions at slot 1, mean per code."""
    with torch.no_grad():
        ref, _ = base.position_log_probs(*batch[:4])  # per level (B, m', V_l)
    pol, _ = policy.position_log_probs(*batch[:4])
    kl = [(r[:, 0].exp() * (r[:, 0] - p[:, 0])).sum(-1).mean() for r, p in zip(ref, pol)]
    return torch.stack(kl).mean()


def train_iteration(
    reference: OneRecModel,
    pairs: PreferencePairs,
    samples: SessionSamples,
    cfg: IpaConfig,
    rng: np.random.Generator,
    progress: bool = True,
    base: OneRecModel | None = None,
) -> tuple[OneRecModel, IpaIteration]:
    """M_{t+1} = copy of M_t trained on L_NTP + lambda * L_DPO; ``reference`` (M_t) stays frozen.

    ``base`` is M_0, the model ``cfg.anchor`` holds the first slot to (default: ``reference``).
    """
    policy = copy.deepcopy(reference)
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    prefixes = tuple(x for x in cfg.train_only.split(",") if x)
    for name, p in policy.named_parameters():
        p.requires_grad_(not prefixes or name.startswith(prefixes))
    n = len(pairs)
    with torch.no_grad():
        ref_c, ref_r = pair_log_probs(reference, pairs, torch.arange(n), cfg.constrained, cfg.dpo_first_slot)
    it = IpaIteration(
        users=n,
        pairs=n,
        reward_chosen=float(pairs.reward_chosen.mean()),
        reward_rejected=float(pairs.reward_rejected.mean()),
        margin_before=log_prob_margin(policy, reference, pairs, cfg.constrained),
    )
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    steps = math.ceil(n / cfg.batch_size)
    bar = tqdm(total=steps * cfg.epochs, desc="ipa", unit="step", disable=not progress, leave=False)
    policy.eval()  # dropout off: see the module docstring
    for _ in range(cfg.epochs):
        perm = torch.from_numpy(rng.permutation(n))
        dpo_sum = ntp_sum = 0.0
        for start in range(0, n, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            pi_c, pi_r = pair_log_probs(policy, pairs, idx, cfg.constrained, cfg.dpo_first_slot)
            l_dpo = dpo_loss(pi_c, pi_r, ref_c[idx], ref_r[idx], cfg.beta)
            ntp_idx = rng.integers(0, len(samples), size=cfg.ntp_batch_size or len(idx))
            batch = samples.batch(ntp_idx)
            l_ntp, _ = policy(*batch)
            opt.zero_grad(set_to_none=True)
            loss = cfg.ntp * l_ntp + cfg.lam * l_dpo
            if cfg.anchor > 0:
                loss = loss + cfg.anchor * first_slot_kl(base or reference, policy, batch)
            if cfg.chosen_nll > 0:
                loss = loss - cfg.chosen_nll * pi_c.mean() / policy.cfg.session_positions
            loss.backward()
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
    it.margin_after = log_prob_margin(policy, reference, pairs, cfg.constrained)
    return policy, it


def run_ipa(
    model: OneRecModel,
    reward: SessionReward,
    trie: TrieIndex,
    sequences: Sequence[np.ndarray],
    user_ids: Sequence[str],
    codes: np.ndarray,
    iterations: int,
    cfg: IpaConfig | None = None,
    progress: bool = True,
    users: Sequence[int] | np.ndarray | None = None,
    ntp_users: Sequence[int] | np.ndarray | None = None,
) -> tuple[OneRecModel, IpaReport]:
    """Run ``iterations`` rounds of IPA; returns the final model and the per-iteration report.

    ``users`` (indices into ``sequences``) is the pool IPA samples from each iteration (default: every
    user with a history). An honest evaluation keeps its users out of it; the report lists whom each
    iteration sampled. L_NTP's batches come from the same pool unless ``ntp_users`` names others: the
    training sequences the model was pre-trained on, say, which beam search and DPO never read.
    """
    cfg = cfg or IpaConfig()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    code_t = torch.from_numpy(np.asarray(codes, dtype=np.int64))
    pool = np.arange(len(sequences)) if users is None else np.asarray(users, dtype=np.int64)
    eligible = np.array([u for u in pool.tolist() if len(sequences[u]) >= 1], dtype=np.int64)
    if len(eligible) == 0:
        raise ValueError("IPA has no user with a history to sample")
    n_users = min(len(eligible), max(cfg.min_users, math.ceil(cfg.share * len(eligible))))
    ntp = eligible if ntp_users is None else np.asarray(ntp_users, dtype=np.int64)
    samples = SessionSamples([sequences[u] for u in ntp], [user_ids[u] for u in ntp], codes, model.cfg)
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
            user_index=chosen_users.tolist(),
        )
        current, it = train_iteration(current, pairs, samples, cfg, rng, progress, base=model)
        it.users = n_users
        it.sampled_users = sorted(int(u) for u in chosen_users)
        it.seconds = time.perf_counter() - t0
        report.iterations.append(it)
    for p in model.parameters():  # collect_pairs/train_iteration froze it as the reference
        p.requires_grad_(True)
    return current, report


@torch.no_grad()
def top_sessions(
    model: OneRecModel,
    trie: TrieIndex,
    histories: Sequence[np.ndarray],
    user_ids: Sequence[str],
    beam_width: int = 16,
    batch_size: int = 64,
) -> np.ndarray:
    """The items of each user's top (beam 0) session, as the service's session mode ranks them: (Q, m), -1 = none."""
    generator = Generator(model, trie, device=str(next(model.parameters()).device))
    out = []
    for start in range(0, len(histories), batch_size):
        reqs = [
            RecRequest(history=[int(i) for i in h], mode="session", beam_width=beam_width, user_id=u)
            for h, u in zip(histories[start : start + batch_size], user_ids[start : start + batch_size])
        ]
        beams = generator.search(reqs, trie.tensors, slots=model.cfg.session_items)
        out.append(beams.items[:, 0].numpy())  # sorted by score: beam 0 is the best
    return np.concatenate(out)


def session_affinity(affinity: np.ndarray, sessions: np.ndarray) -> np.ndarray:
    """Per row j: sum of affinity[j, i] over the valid items i of sessions[j]."""
    return np.array([affinity[j, row[row >= 0]].sum() for j, row in enumerate(sessions)], dtype=np.float64)


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
    top = top_sessions(model, trie, histories, user_ids, beam_width)
    return float(session_affinity(affinity, top).mean())


# --------------------------------------------------------------------------------------------------
# Honest evaluation: users IPA never sampled, judged by the synthetic world's true affinity
# --------------------------------------------------------------------------------------------------


def holdout_users(n_users: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(IPA pool, held-out users) with ``share`` of the users held out: see ``held_out_partition``."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"held-out share must lie in (0, 1), got {share}")
    return held_out_partition(n_users, int(round(share * n_users)), seed)


def held_out_partition(n_users: int, n_held_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(IPA pool, held-out users): a seeded random partition with ``n_held_out`` users held out (at
    least one, and at least one left in the pool).

    The reward model trains on the pool's sequences and ``run_ipa(users=pool)`` samples only the pool,
    so everything measured on the held-out users is measured on users alignment never saw (the
    build's true-affinity check and ``benchmarks/ipa.py`` both measure that way).
    """
    if n_users < 2:
        raise ValueError(f"holding users out of IPA needs at least 2 users, got {n_users}")
    perm = np.random.default_rng(10_000 + seed).permutation(n_users)
    n_out = min(n_users - 1, max(1, n_held_out))
    return np.sort(perm[n_out:]), np.sort(perm[:n_out])


@dataclass
class UserMeasures:
    """One model on a set of users, per user: what alignment is judged by."""

    affinity: np.ndarray  # true affinity summed over the items of the top session (session mode)
    hit10: np.ndarray  # 1 when the test item is in the items-mode top 10
    ndcg10: np.ndarray

    def summary(self) -> dict[str, float]:
        return {
            "true_affinity": float(self.affinity.mean()),
            "recall@10": float(self.hit10.mean()),
            "ndcg@10": float(self.ndcg10.mean()),
        }


@torch.no_grad()
def measure_users(
    model: OneRecModel,
    trie: TrieIndex,
    affinity: np.ndarray,
    session_histories: Sequence[np.ndarray],
    test_histories: Sequence[np.ndarray],
    test_targets: Sequence[int],
    user_ids: Sequence[str],
    session_beam: int = 16,
    ranking_beam: int = 20,
    batch_size: int = 64,
) -> UserMeasures:
    """Per user j: true affinity (row j of ``affinity``) of the top session the model generates from
    ``session_histories[j]``, and the rank of ``test_targets[j]`` in the items-mode top 10 from
    ``test_histories[j]`` (history not excluded, as ``onerec.evaluate`` ranks)."""
    top = top_sessions(model, trie, session_histories, user_ids, session_beam, batch_size)
    generator = Generator(model, trie, device=str(next(model.parameters()).device))
    hit, gain = [], []
    for start in range(0, len(test_targets), batch_size):
        reqs = [
            RecRequest(
                history=[int(i) for i in h][-model.cfg.history_window :],
                num_items=10,
                mode="items",
                beam_width=ranking_beam,
                exclude_history=False,
                user_id=u,
            )
            for h, u in zip(test_histories[start : start + batch_size], user_ids[start : start + batch_size])
        ]
        results, _ = generator.generate(reqs)
        for res, target in zip(results, test_targets[start : start + batch_size]):
            ranked = [it.item for it in res.items][:10]
            pos = ranked.index(int(target)) if int(target) in ranked else -1
            hit.append(float(pos >= 0))
            gain.append(1.0 / math.log2(pos + 2) if pos >= 0 else 0.0)
    return UserMeasures(session_affinity(affinity, top), np.asarray(hit), np.asarray(gain))


def compare(before: UserMeasures, after: UserMeasures) -> dict[str, dict[str, float]]:
    """Before/after on the same users: means, the relative affinity gain and paired differences."""
    n = len(before.affinity)
    d_aff = after.affinity - before.affinity
    d_hit = after.hit10 - before.hit10
    stderr = float(d_hit.std(ddof=1) / math.sqrt(len(d_hit))) if len(d_hit) > 1 else 0.0
    return {
        "true_affinity": {
            "before": float(before.affinity.mean()),
            "after": float(after.affinity.mean()),
            "relative_gain": float(after.affinity.mean() / before.affinity.mean() - 1.0),
            "users_better": float((d_aff > 1e-12).sum() / n),
            "users_worse": float((d_aff < -1e-12).sum() / n),
        },
        "recall@10": {
            "before": float(before.hit10.mean()),
            "after": float(after.hit10.mean()),
            "difference": float(d_hit.mean()),
            "difference_stderr": stderr,
        },
        "ndcg@10": {"before": float(before.ndcg10.mean()), "after": float(after.ndcg10.mean())},
    }


@torch.no_grad()
def reward_truth_agreement(
    model: OneRecModel,
    reward: SessionReward,
    trie: TrieIndex,
    affinity: np.ndarray,
    histories: Sequence[np.ndarray],
    user_ids: Sequence[str],
    codes: np.ndarray,
    n_sessions: int,
) -> dict[str, float]:
    """How R ranks ``model``'s N beams against the truth, per user (row j of ``affinity``).

    ``beam_pair_agreement``: share of beam pairs (with different true affinity) that R orders as the
    truth does (0.5 = chance); then the mean true affinity of the beam R would choose, the one it would
    reject, beam 0 (what the model serves) and the truly best beam (what a perfect R could choose).
    """
    pairs = collect_pairs(model, reward, trie, histories, user_ids, torch.from_numpy(codes), n_sessions, keep_all=True)
    agree = total = 0.0
    chosen, rejected, first, best = [], [], [], []
    for j, (items, r) in enumerate(zip(pairs.all_items, pairs.all_rewards)):
        truth = affinity[int(pairs.user_index[j])][items.numpy()].sum(1)
        r = r.numpy()
        dr, dt = np.sign(r[:, None] - r[None, :]), np.sign(truth[:, None] - truth[None, :])
        upper = np.triu(np.ones(dr.shape, dtype=bool), 1) & (dt != 0)
        agree += float((dr[upper] == dt[upper]).sum())
        total += float(upper.sum())
        chosen.append(truth[r.argmax()])
        rejected.append(truth[r.argmin()])
        first.append(truth[0])
        best.append(truth.max())
    return {
        "beam_pair_agreement": agree / max(total, 1.0),
        "true_affinity_chosen": float(np.mean(chosen)),
        "true_affinity_rejected": float(np.mean(rejected)),
        "true_affinity_beam0": float(np.mean(first)),
        "true_affinity_best_beam": float(np.mean(best)),
    }
