"""Reward model and Iterative Preference Alignment on a tiny synthetic world (no demo fixtures)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.ipa import (
    HELD_OUT_SHARE,
    CategoryReward,
    FrequencyReward,
    PopularityOracle,
    base_generator,
    summarise,
)
from onerec.build import BuildConfig, build, demo_config
from onerec.bundle import Catalog
from onerec.cli import build_config, make_parser
from onerec.data import SyntheticConfig, SyntheticWorld, leave_one_out, make_synthetic
from onerec.generate import Generator, RecRequest
from onerec.ipa import (
    IpaConfig,
    IpaReport,
    allowed_codes,
    collect_pairs,
    dpo_loss,
    first_slot_kl,
    held_out_partition,
    holdout_users,
    pair_log_probs,
    run_ipa,
    session_log_prob,
    train_iteration,
    true_session_affinity,
)
from onerec.model import ModelConfig, OneRecModel, hash_user
from onerec.reward import (
    CooccurrenceReward,
    RewardConfig,
    RewardModel,
    RewardSamples,
    auc,
    history_tensors,
    train_reward,
)
from onerec.tokenizer import item_embeddings, residual_semantic_ids
from onerec.train import SessionSamples, TrainConfig, train_model

TINY_WORLD = SyntheticConfig(n_users=120, n_items=80, n_topics=8)
TINY_MODEL = ModelConfig(
    session_items=3,
    history_window=10,
    d_model=32,
    n_heads=2,
    n_encoder_layers=1,
    n_decoder_layers=1,
    d_ff=32,
    n_experts=2,
    experts_top_k=1,
    dropout=0.0,
)
TRAIN_USERS = 100  # the reward trains on users [0, 100) and is judged on the rest


@dataclass
class Tiny:
    world: SyntheticWorld
    train: list[np.ndarray]
    codes: np.ndarray
    level_sizes: list[int]
    catalog: Catalog
    model: OneRecModel
    reward: RewardModel
    reward_cfg: RewardConfig


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    torch.manual_seed(0)
    world = make_synthetic(TINY_WORLD)
    split = leave_one_out(world.data)
    sids = residual_semantic_ids(item_embeddings(split.train, world.data.n_items, 16, seed=0), 2, 8, seed=0)
    level_sizes = list(sids.level_sizes)
    catalog = Catalog.from_codes(world.data.item_ids, sids.codes, level_sizes, [0])
    model = OneRecModel(replace(TINY_MODEL, level_sizes=level_sizes))
    train_model(model, split.train, world.data.user_ids, sids.codes, TrainConfig(epochs=2, batch_size=64), False)
    rcfg = RewardConfig(session_items=3, history_window=10, epochs=3, batch_size=128)
    reward, _ = train_reward(split.train[:TRAIN_USERS], sids.codes, level_sizes, rcfg, progress=False)
    return Tiny(world, split.train, sids.codes, level_sizes, catalog, model, reward, rcfg)


def align_tiny(tiny: Tiny, cfg: IpaConfig, iterations: int, **kwargs: Any) -> tuple[OneRecModel, IpaReport]:
    """run_ipa on the tiny world with its learned reward, no progress bar."""
    return run_ipa(
        tiny.model,
        tiny.reward,
        tiny.catalog.trie,
        tiny.train,
        tiny.world.data.user_ids,
        tiny.codes,
        iterations,
        cfg,
        False,
        **kwargs,
    )


def test_reward_ranks_real_next_sessions_above_sampled_ones_on_held_out_users(tiny: Tiny) -> None:
    held_out = RewardSamples(tiny.train[TRAIN_USERS:], tiny.codes, tiny.reward_cfg)
    assert len(held_out) > 50
    hist, mask, sessions, _, session_label = held_out.batch(np.arange(len(held_out)), np.random.default_rng(7))
    scores = tiny.reward.score(hist, mask, sessions).numpy()
    real = session_label.numpy() == 1
    assert real.sum() == (~real).sum() == len(held_out)
    assert auc(scores[real], scores[~real]) > 0.6
    assert ((scores >= 0) & (scores <= 1)).all()


def test_session_log_prob_matches_the_training_loss(tiny: Tiny) -> None:
    """The DPO helper and forward() must agree: -mean log-prob per code == forward's cross-entropy."""
    samples = SessionSamples(tiny.train, tiny.world.data.user_ids, tiny.codes, tiny.model.cfg)
    full = np.array([j for j, (u, p) in enumerate(samples.pairs) if p + 3 <= len(tiny.train[u])][:16])
    batch = samples.batch(full)
    tiny.model.eval()
    with torch.no_grad():
        loss, _ = tiny.model(*batch)
        logp = session_log_prob(tiny.model, *batch[:4])
    per_code = -logp.mean() / tiny.model.cfg.session_positions
    torch.testing.assert_close(per_code, loss, rtol=1e-4, atol=1e-4)


def test_constrained_session_log_prob_is_the_beam_search_score(tiny: Tiny) -> None:
    """Renormalised over the trie's allowed codes (history and earlier slots banned), the teacher-forced
    log-prob of a beam equals the score the constrained search ranked it by; the plain softmax does not."""
    snap = tiny.catalog.trie.tensors
    codes = torch.from_numpy(tiny.codes)
    users = [0, 1, 2, 3]
    reqs = [
        RecRequest(history=[int(i) for i in tiny.train[u]], mode="session", beam_width=6, user_id=f"u{u}")
        for u in users
    ]
    beams = Generator(tiny.model, tiny.catalog.trie).search(reqs, snap, slots=3)
    for q, u in enumerate(users):
        items = beams.items[q]
        assert torch.isfinite(beams.scores[q]).all() and (items >= 0).all()
        w = len(items)
        hist, mask = history_tensors([tiny.train[u][::-1]], codes, 10)
        free = snap.item_live.clone()
        free[torch.from_numpy(tiny.train[u])] = False
        masks = allowed_codes(snap.item_codes, free[None].expand(w, -1), items, tiny.level_sizes)
        args = (hist.expand(w, -1, -1), mask.expand(w, -1), torch.full((w,), hash_user(f"u{u}", 1000)), codes[items])
        with torch.no_grad():
            constrained = session_log_prob(tiny.model, *args, masks)
            plain = session_log_prob(tiny.model, *args)
        torch.testing.assert_close(constrained, beams.scores[q], rtol=0, atol=1e-4)
        assert (plain < constrained - 1e-3).all()  # the plain softmax spreads mass over banned codes too


def test_allowed_codes_ban_history_items_and_earlier_slots() -> None:
    item_codes = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [2, 0]])
    available = torch.tensor([[True, True, False, True, True]])  # item 2 is in the history
    session = torch.tensor([[0, 1, 3]])  # items 0, 1, 3
    lvl0, lvl1 = allowed_codes(item_codes, available, session, [3, 2])
    # slot 0: all of 0, 1, 3, 4 are free -> codes 0, 1, 2 at level 0; under code 0 both children
    assert lvl0[0, 0].tolist() == [True, True, True] and lvl1[0, 0].tolist() == [True, True]
    # slot 1: item 0 is taken -> level 0 keeps code 0 (item 1 is free); under 0 only child 1 is left
    assert lvl0[0, 1].tolist() == [True, True, True] and lvl1[0, 1].tolist() == [False, True]
    # slot 2: items 0 and 1 taken -> code 0 is closed; under code 1 only item 3 (item 2 is history)
    assert lvl0[0, 2].tolist() == [False, True, True] and lvl1[0, 2].tolist() == [False, True]


def test_ipa_iteration_lowers_dpo_loss_and_widens_the_margin_over_the_reference(tiny: Tiny) -> None:
    cfg = IpaConfig(n_sessions=8, epochs=3, batch_size=16, lr=1e-3)
    users = np.arange(32)
    pairs = collect_pairs(
        tiny.model,
        tiny.reward,
        tiny.catalog.trie,
        [tiny.train[u] for u in users],
        [tiny.world.data.user_ids[u] for u in users],
        torch.from_numpy(tiny.codes),
        cfg.n_sessions,
    )
    assert len(pairs) >= 24
    assert (pairs.reward_chosen >= pairs.reward_rejected).all()
    assert float((pairs.reward_chosen - pairs.reward_rejected).mean()) > 0
    reference = tiny.model
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    samples = SessionSamples(tiny.train, tiny.world.data.user_ids, tiny.codes, reference.cfg)
    policy, it = train_iteration(reference, pairs, samples, cfg, np.random.default_rng(0), progress=False)
    assert policy is not reference
    assert it.margin_before == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert it.margin_after > it.margin_before + 0.1
    assert it.dpo_loss[-1] < it.dpo_loss[0]
    with torch.no_grad():  # the final DPO loss over all pairs is below log 2, where it starts
        everything = torch.arange(len(pairs))
        final = dpo_loss(
            *pair_log_probs(policy, pairs, everything, cfg.constrained),
            *pair_log_probs(reference, pairs, everything, cfg.constrained),
            cfg.beta,
        )
    assert float(final) < float(np.log(2)) - 1e-3
    for name, value in reference.state_dict().items():
        assert torch.equal(value, before[name]), f"reference weight {name} changed"


def test_run_ipa_leaves_the_input_model_untouched(tiny: Tiny) -> None:
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    cfg = IpaConfig(min_users=16, n_sessions=4, epochs=1, batch_size=16)
    aligned, report = align_tiny(tiny, cfg, 2)
    assert len(report.iterations) == 2 and all(it.users == 16 for it in report.iterations)
    assert any(not torch.equal(v, before[k]) for k, v in aligned.state_dict().items())
    for name, value in tiny.model.state_dict().items():
        assert torch.equal(value, before[name]), f"input weight {name} changed"


def test_held_out_users_are_disjoint_from_every_user_ipa_samples(tiny: Tiny) -> None:
    pool, held_out = holdout_users(len(tiny.train), 1 / 3, seed=3)
    assert len(held_out) == 40 and len(pool) == 80
    assert not set(pool.tolist()) & set(held_out.tolist())
    assert sorted(pool.tolist() + held_out.tolist()) == list(range(len(tiny.train)))
    again, _ = holdout_users(len(tiny.train), 1 / 3, seed=3)
    assert np.array_equal(pool, again)  # seeded: the benchmark's split is reproducible
    cfg = IpaConfig(share=0.5, min_users=8, n_sessions=4, epochs=1, batch_size=16)
    _, report = align_tiny(tiny, cfg, 3, users=pool)
    sampled = report.sampled_users()
    assert all(len(it.sampled_users) == 40 for it in report.iterations)
    assert len(sampled) > 40  # three iterations drew different users ...
    assert sampled <= set(pool.tolist())  # ... all from the pool
    assert not sampled & set(held_out.tolist())


@pytest.mark.parametrize("reward", ["cooccurrence", "learned"])
def test_build_with_ipa_records_it_and_judges_it_on_users_ipa_never_sampled(tmp_path: Path, reward: str) -> None:
    cfg = BuildConfig(
        name="ipa",
        synthetic=TINY_WORLD,
        embedding_dim=16,
        levels=2,
        codes_per_level=8,
        model=TINY_MODEL,
        train=TrainConfig(epochs=1, batch_size=64),
        eval_beam=10,
        eval_users=32,
        ipa_iterations=2,
        ipa_reward=reward,
        ipa=IpaConfig(min_users=16, n_sessions=4, epochs=1),
        reward=RewardConfig(epochs=1),
        ipa_eval_users=16,
    )
    published, summary = build(cfg, tmp_path, progress=False)
    manifest = json.loads((published.path / "manifest.json").read_text())
    ipa = manifest["ipa"]
    assert len(ipa["iterations"]) == 2
    assert ipa["reward"]["kind"] == reward and 0.0 <= ipa["reward"]["auc_heldout_users"] <= 1.0
    assert ipa["reward"]["heldout_sessions"] > 0
    for it in ipa["iterations"]:
        assert it["reward_chosen"] >= it["reward_rejected"]
        assert len(it["dpo_loss"]) == 1 and 0 < it["dpo_loss"][0] < 2
    held_out = set(ipa["users"]["held_out"])
    sampled = {u for it in ipa["iterations"] for u in it["sampled_users"]}
    assert len(held_out) == 16 and len(sampled) > 16  # two iterations of 16 users each, not all the same
    assert not held_out & sampled  # the users IPA is judged on are users it never sampled
    assert held_out == set(held_out_partition(TINY_WORLD.n_users, 16, cfg.seed)[1].tolist())
    assert ipa["users"]["ipa_pool"] == TINY_WORLD.n_users - 16 and ipa["users"]["ipa_sampled"] == len(sampled)
    truth = ipa["true_affinity"]
    assert truth["users"] == 16 and truth["before"] > 0 and truth["after"] > 0
    assert truth["gain"] == pytest.approx(truth["after"] - truth["before"])
    assert manifest["metrics"]["test"] == summary["metrics"]["test"]


def test_onerec_build_aligns_with_the_count_reward_unless_asked_for_the_papers_recipe() -> None:
    parser = make_parser()
    plain = build_config(parser.parse_args(["build", "--out", "store", "--ipa-iterations", "2"]))
    assert plain.ipa_iterations == 2 and plain.ipa_reward == "cooccurrence"
    assert (plain.ipa.anchor, plain.ipa.ntp, plain.ipa.min_users) == (1.0, 0.0, 200)  # ipa_round3.json's
    args = ["build", "--out", "store", "--ipa-iterations", "2", "--ipa-reward", "learned"]
    paper = build_config(parser.parse_args(args))
    assert paper.ipa_reward == "learned" and paper.ipa == IpaConfig()
    with pytest.raises(ValueError, match="--ipa-reward oracle"):
        build_config(parser.parse_args(["build", "--out", "store", "--ipa-reward", "oracle"]))
    with pytest.raises(ValueError, match="ipa_reward 'oracle'"):  # refused before any training
        build(replace(plain, ipa_reward="oracle"), Path("never-written"), progress=False)


def test_held_out_partition_is_seeded_and_keeps_both_sides_non_empty() -> None:
    pool, held_out = held_out_partition(10, 3, seed=5)
    assert len(held_out) == 3 and sorted([*pool, *held_out]) == list(range(10))
    assert np.array_equal(held_out, held_out_partition(10, 3, seed=5)[1])
    assert not np.array_equal(held_out, held_out_partition(10, 3, seed=6)[1])
    assert len(held_out_partition(10, 50, seed=0)[0]) == 1  # at least one user left to align on
    assert np.array_equal(holdout_users(10, 0.3, seed=5)[1], held_out)  # the share spelling, same partition


def test_ipa_driven_by_a_reward_that_knows_the_taste_raises_true_affinity_on_users_it_never_sampled() -> None:
    """The machinery behind IPA (beams, pairs, DPO + NTP) against the goal's measure, on the demo world.

    The learned reward does not yet rank the model's beams by taste (benchmarks/results/ipa.json), so a
    test on it would measure the reward, not IPA. Here IPA is driven by the benchmark's diagnostic
    reward read from the world's hidden popularity; the same run without DPO (lambda 0: the same NTP
    steps) is the control. Observed on seeds 0/1/2 (2 iterations of 100 users): +7.6% / +7.8% / +9.4%
    with DPO, +0.2% / +1.3% / -0.2% without, -5.3% / -8.9% / -7.2% with DPO's sign flipped. The test
    asks for 3 points over the control, so it fails if pairs, DPO or the update stop working.
    """
    cfg = demo_config()
    cfg.train = replace(cfg.train, epochs=3)
    seed = 0
    world, split, sids, catalog, base = base_generator(cfg, seed, None)
    oracle: Any = PopularityOracle(sids.codes, world.item_popularity, cfg.model.history_window)  # scores as R does
    pool, held_out = holdout_users(world.data.n_users, HELD_OUT_SHARE, seed)
    affinity = world.true_affinity(held_out)
    histories = [split.train[u] for u in held_out]
    user_ids = [world.data.user_ids[u] for u in held_out]

    def gain(lam: float) -> float:
        ipa_cfg = IpaConfig(share=0.25, min_users=32, n_sessions=16, epochs=2, lam=lam, seed=seed)
        aligned, report = run_ipa(
            base, oracle, catalog.trie, split.train, world.data.user_ids, sids.codes, 2, ipa_cfg, False, users=pool
        )
        assert not report.sampled_users() & set(held_out.tolist())
        after = true_session_affinity(aligned, catalog.trie, affinity, histories, user_ids)
        return after / before - 1.0

    before = true_session_affinity(base, catalog.trie, affinity, histories, user_ids)
    with_dpo, control = gain(1.0), gain(0.0)
    assert with_dpo > 0.03 + control, f"IPA moved true affinity {with_dpo:+.3f}, NTP alone {control:+.3f}"


def test_frequency_reward_scores_a_session_by_its_items_training_counts() -> None:
    codes = np.array([[0, 0], [0, 1], [1, 0]])  # items 0, 1, 2 by code path
    reward = FrequencyReward(codes, [np.array([0, 0, 1]), np.array([0, 2])], 3, history_window=4)
    sessions = torch.tensor([[[0, 0], [1, 0]], [[0, 1], [0, 1]]])  # items (0, 2) and (1, 1)
    no_history = torch.zeros(2, 1, 2, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.bool)
    expected = torch.tensor([np.log(4) + np.log(2), 2 * np.log(2)], dtype=torch.float32)
    assert torch.allclose(reward.score(*no_history, sessions).float(), expected)


def test_category_reward_is_the_users_category_share_times_the_items_share_of_its_category() -> None:
    codes = np.array([[0, 0], [0, 1], [1, 0]])  # items 0 and 1 in category 0, item 2 in category 1
    reward = CategoryReward(codes, [np.array([0, 0, 1]), np.array([2])], 3, history_window=4)
    # counts + 1: items 3, 2, 2 -> categories 5 and 2 (shares 5/7, 2/7); within them 3/5, 2/5, 2/2
    hist_codes = torch.tensor([[[0, 0], [0, 1]]])  # two category-0 items
    hist_mask = torch.tensor([[True, True]])
    share_0, share_1 = (2 + 5 / 7) / 3, (0 + 2 / 7) / 3
    for session, expected in (([0, 0], share_0 * 3 / 5), ([1, 0], share_1 * 1.0)):
        got = reward.score(hist_codes, hist_mask, torch.tensor([[session]]))
        assert float(got[0]) == pytest.approx(np.log(expected), rel=1e-6)
    both = reward.score(hist_codes.expand(2, -1, -1), hist_mask.expand(2, -1), torch.tensor([[[0, 0]], [[1, 0]]]))
    assert float(both[0]) > float(both[1])  # this user's category first, though item 2 rules its own


def test_cooccurrence_reward_prefers_items_the_histories_users_also_have() -> None:
    codes = np.array([[0], [1], [2], [3]])
    pool = [np.array([0, 1]), np.array([0, 1, 2]), np.array([3, 2])]
    reward = CooccurrenceReward(pool, codes, RewardConfig(history_window=4))
    hist_codes, hist_mask = torch.tensor([[[0]]]).expand(3, -1, -1), torch.ones(3, 1, dtype=torch.bool)
    got = reward.score(hist_codes, hist_mask, torch.tensor([[[1]], [[2]], [[3]]]))
    # P(1 | 0) = 2/2, P(2 | 0) = 1/2, P(3 | 0) = 0
    expected = np.log(1e-3 + np.array([1.0, 0.5, 0.0]))
    assert np.allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_cooccurrence_reward_counts_what_a_dense_count_gives() -> None:
    """The library counts one P(. | h) row at a time from an item -> users index (no items x items matrix),
    with a bounded cache; it must give what counting every pair of a dense user x item table gives."""
    rng = np.random.default_rng(3)
    n_items = 12
    pool = [rng.integers(0, n_items - 1, rng.integers(1, 7)) for _ in range(30)]  # nobody has item 11
    codes = np.stack([np.arange(n_items) // 4, np.arange(n_items) % 4], 1)
    has = np.zeros((len(pool), n_items))
    for u, seq in enumerate(pool):
        has[u, seq] = 1.0
    together = has.T @ has
    count = np.diag(together).copy()
    np.fill_diagonal(together, 0.0)
    given = together / np.maximum(count, 1.0)[:, None]
    reward = CooccurrenceReward(pool, codes, RewardConfig(history_window=5), cache_rows=2)  # rows get evicted
    for h in [*range(n_items), 3, 0, 11]:
        np.testing.assert_allclose(reward.given(h), given[h], rtol=1e-6)
    assert not reward.given(11).any() and len(reward._rows) == 2
    hist = torch.from_numpy(codes[[3, 7, 0]])[None].expand(2, -1, -1)
    mask = torch.tensor([[True, True, False], [False, False, False]])  # the second history is empty
    got = reward.score(hist, mask, torch.from_numpy(codes[[[1, 2], [1, 2]]]))
    assert got[0].item() == pytest.approx(np.log(1e-3 + given[[3, 7]].mean(0)[[1, 2]]).sum(), rel=1e-5)
    assert got[1].item() == 0.0
    with pytest.raises(ValueError, match="item indices"):
        CooccurrenceReward([np.array([n_items])], codes, RewardConfig())


def test_first_slot_kl_is_zero_for_the_same_weights_and_grows_as_the_policy_moves(tiny: Tiny) -> None:
    samples = SessionSamples(tiny.train, tiny.world.data.user_ids, tiny.codes, tiny.model.cfg)
    batch = samples.batch(np.arange(16))
    policy = copy.deepcopy(tiny.model)
    assert float(first_slot_kl(tiny.model, policy, batch).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = first_slot_kl(tiny.model, policy, batch)
    assert float(moved.detach()) > 1e-4
    moved.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in policy.parameters())


def test_ntp_users_feed_l_ntp_without_joining_the_users_ipa_samples(tiny: Tiny) -> None:
    pool, others = np.arange(0, 40), np.arange(60, 120)
    cfg = IpaConfig(min_users=16, n_sessions=4, epochs=1, batch_size=16, lam=0.0)  # L_NTP alone moves the weights

    def aligned(ntp_users: np.ndarray | None) -> tuple[OneRecModel, set[int]]:
        model, report = align_tiny(tiny, cfg, 1, users=pool, ntp_users=ntp_users)
        return model, report.sampled_users()

    own, sampled_own = aligned(None)
    again, _ = aligned(None)
    elsewhere, sampled_elsewhere = aligned(others)
    assert sampled_own == sampled_elsewhere and sampled_own <= set(pool.tolist())
    state = again.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in own.state_dict().items())  # the same seed, the same weights
    state = elsewhere.state_dict()
    assert any(not torch.equal(v, state[k]) for k, v in own.state_dict().items())  # other L_NTP batches


def test_train_only_leaves_every_other_weight_where_it_was(tiny: Tiny) -> None:
    cfg = IpaConfig(min_users=16, n_sessions=4, epochs=1, batch_size=16, lr=1e-3, train_only="heads,dec_norm")
    aligned, _ = align_tiny(tiny, cfg, 1)
    before = tiny.model.state_dict()
    moved = {k for k, v in aligned.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(k.startswith(("heads", "dec_norm")) for k in moved), sorted(moved)


def test_ntp_weight_zero_without_dpo_or_anchor_leaves_the_model_as_it_was(tiny: Tiny) -> None:
    def moved(ntp: float) -> set[str]:
        cfg = IpaConfig(min_users=16, n_sessions=4, epochs=1, batch_size=16, lr=1e-3, lam=0.0, ntp=ntp)
        aligned, _ = align_tiny(tiny, cfg, 1)
        before = tiny.model.state_dict()
        return {k for k, v in aligned.state_dict().items() if not torch.equal(v, before[k])}

    assert moved(0.0) == set()  # nothing pulls: every gradient is zero, so is every Adam step
    assert moved(1.0)  # L_NTP alone moves the weights


def seed_row(gain: float, recall_difference: float) -> dict[str, Any]:
    """One seed's figures as run_seed reports them (only what summarise reads)."""
    pair = {"before": 0.5, "after": 0.5}
    return {
        "true_affinity": {**pair, "relative_gain": gain},
        "recall@10": {**pair, "difference": recall_difference},
        "ndcg@10": pair,
        "reward": {"auc_heldout_users": 0.8, "beam_pair_agreement": 0.6},
    }


def test_goal_verdict_needs_the_gain_and_a_recall_drop_within_noise_over_seeds() -> None:
    within_noise = summarise([seed_row(0.06, d) for d in (-0.03, 0.02, -0.01, 0.01)])["goal"]
    assert within_noise["affinity_met"] and within_noise["recall_met"] and within_noise["met"]
    steady_drop = summarise([seed_row(0.06, d) for d in (-0.02, -0.021, -0.019, -0.02)])["goal"]
    assert steady_drop["affinity_met"] and not steady_drop["recall_met"] and not steady_drop["met"]
    small_gain = summarise([seed_row(0.04, d) for d in (-0.03, 0.02, -0.01, 0.01)])["goal"]
    assert not small_gain["affinity_met"] and small_gain["recall_met"] and not small_gain["met"]
    one_seed = summarise([seed_row(0.06, 0.0)])["goal"]
    assert not one_seed["recall_met"]  # no spread over seeds, nothing to call noise
