"""The quality work of issue 8 on small generated data: baselines, codebook sizing, content features,
the MoE balance loss and slot weighting, and the build's measured legality."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from onerec.baselines import (
    CooccurrenceKnn,
    SASRecConfig,
    evaluate_scorer,
    most_popular_scores,
    rank_all,
    sasrec_scores,
    train_sasrec,
)
from onerec.build import BuildConfig, build
from onerec.data import InteractionData, Split, leave_one_out, load_item_content, load_sequence_file
from onerec.model import CANDIDATE_RECENCY, ModelConfig, NextItemTargets, OneRecModel, candidate_score_features
from onerec.tokenizer import (
    codebook_size,
    content_embeddings,
    cooccurrence,
    join_embeddings,
    residual_semantic_ids,
    top_neighbours,
)
from onerec.train import TrainConfig

# ---- baselines -----------------------------------------------------------------------------------


def naive_knn_top(
    train: list[np.ndarray], history: list[int], n_items: int, k: int, backward: float = 1.0, decay: float = 0.0
) -> list[int]:
    """The kNN recipe written the slow, obvious way: pair counts by scanning every training sequence
    (row: the earlier item, column: the later one; the reverse pair at `backward` times the weight; with
    `decay`, each pair times exp(-(items after the later one) / decay))."""
    co = np.zeros((n_items, n_items))
    for seq in train:
        for i in range(len(seq)):
            for j in range(i + 1, min(i + 4, len(seq))):
                if seq[i] != seq[j]:
                    fade = math.exp(-(len(seq) - 1 - j) / decay) if decay else 1.0
                    co[seq[i], seq[j]] += fade / (j - i)
                    co[seq[j], seq[i]] += backward * fade / (j - i)
    pop = np.zeros(n_items)
    for seq in train:
        for item in seq:
            pop[item] += 1
    score = np.zeros(n_items)
    for weight, item in zip((1.0, 0.5, 0.25), reversed(history)):
        score += weight * co[item]
    candidates = [i for i in range(n_items) if i not in set(history)]
    return sorted(candidates, key=lambda i: (-round(score[i], 9), -pop[i], i))[:k]  # equal sums tie exactly


@pytest.mark.parametrize(("backward", "decay"), [(1.0, 0.0), (0.25, 0.0), (0.0, 0.0), (0.25, 2.0)])
def test_knn_matches_a_naive_count_of_the_recipe(backward: float, decay: float) -> None:
    rng = np.random.default_rng(3)
    n_items = 30
    train = [rng.choice(n_items, size=rng.integers(2, 9), replace=False) for _ in range(60)]
    knn = CooccurrenceKnn(train, n_items, backward=backward, decay=decay)
    histories = [list(rng.choice(n_items, size=rng.integers(1, 6), replace=False)) for _ in range(25)]
    ranked = rank_all(knn.scores([np.asarray(h) for h in histories]), [np.asarray(h) for h in histories], 10)
    for hist, got in zip(histories, ranked):
        assert got == naive_knn_top(train, hist, n_items, 10, backward, decay)


def test_rank_all_never_returns_history_and_most_popular_is_counts() -> None:
    train = [np.array([0, 1, 1]), np.array([1, 2])]
    pop = most_popular_scores(train, 4)
    assert pop.tolist() == [1.0, 3.0, 1.0, 0.0]
    top = rank_all(np.tile(pop, (2, 1)), [np.array([1]), np.array([], dtype=np.int64)], 3)
    assert top == [[0, 2, 3], [1, 0, 2]]


def ring_world(n_items: int = 40, users: int = 300, seed: int = 0) -> list[np.ndarray]:
    """Users walk a ring of items one step at a time from a random start: the next item is the last + 1."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(n_items) + np.arange(rng.integers(5, 12))) % n_items for _ in range(users)]


def test_sasrec_learns_a_deterministic_successor_that_popularity_cannot() -> None:
    seqs = ring_world(users=200)
    split_train = [s[:-2] for s in seqs]
    hist = [s[:-1] for s in seqs]
    targets = [int(s[-1]) for s in seqs]
    cfg = SASRecConfig(max_len=10, d_model=32, n_heads=2, dropout=0.1, lr=1e-2, max_epochs=15, batch_size=64)
    model, report = train_sasrec(split_train, 40, cfg, progress=False)
    assert report.epochs == 15 and report.best_epoch == 15
    learned = evaluate_scorer(lambda h: sasrec_scores(model, h), hist, targets, ks=(1,))
    pop = most_popular_scores(split_train, 40)
    popular = evaluate_scorer(lambda h: np.tile(pop, (len(h), 1)), hist, targets, ks=(1,))
    assert learned["recall@1"] >= 0.9 > popular["recall@1"] + 0.5, (learned, popular)


def test_sasrec_keeps_the_best_validated_epoch_and_stops_early() -> None:
    seqs = ring_world(users=120)
    cfg = SASRecConfig(max_len=8, d_model=16, n_heads=1, lr=5e-3, max_epochs=24, eval_every=2, patience=2)
    valid_h = [s[:-2] for s in seqs]
    valid_t = [int(s[-2]) for s in seqs]
    _, report = train_sasrec([s[:-2] for s in seqs], 40, cfg, valid_h, valid_t, progress=False)
    checks = report.valid_ndcg10
    assert len(checks) == report.epochs // 2
    assert report.best_epoch == 2 * (int(np.argmax(checks)) + 1)
    assert report.epochs == 24 or report.epochs - report.best_epoch == 2 * cfg.patience
    assert not report.stopped_by_time


def test_sasrec_time_budget_stops_after_a_checked_epoch() -> None:
    seqs = ring_world(users=60)
    cfg = SASRecConfig(max_len=8, d_model=8, n_heads=1, max_epochs=50, eval_every=10, time_budget_s=0.0)
    _, report = train_sasrec([s[:-2] for s in seqs], 40, cfg, [s[:-2] for s in seqs], [int(s[-2]) for s in seqs])
    assert report.stopped_by_time and report.epochs == 1 and len(report.valid_ndcg10) == 1 and report.best_epoch == 1


# ---- semantic IDs --------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_codebook_size_follows_the_catalogue(levels: int) -> None:
    sizes = [codebook_size(n, levels) for n in (50, 400, 3_000, 12_000, 60_000, 10**6)]
    assert sizes == sorted(sizes) and sizes[-1] <= 256
    for n, k in zip((50, 400, 3_000, 12_000, 60_000), sizes):
        assert k & (k - 1) == 0  # a power of two
        target = 2 * n ** (1 / levels)
        if k < 256:
            assert abs(math.log2(k) - math.log2(target)) <= 0.5 + 1e-9
            assert k**levels >= n  # enough paths for every item before the extra level


def test_disambiguation_ranks_colliding_items_by_popularity() -> None:
    emb = np.repeat(np.eye(4), 5, axis=0)  # 4 groups of 5 identical items: paths collide
    popularity = np.arange(20)[::-1].astype(float)
    popularity[[3, 8]] = 100.0
    ids = residual_semantic_ids(emb, levels=1, codes_per_level=4, seed=0, priority=popularity)
    assert ids.depth == 2 and len(ids.path_to_item()) == 20
    for group in range(4):
        members = np.arange(group * 5, group * 5 + 5)
        expected = sorted(members, key=lambda i: (-popularity[i], i))
        assert [int(ids.codes[i, 1]) for i in expected] == list(range(5))


# ---- content features ----------------------------------------------------------------------------


def test_content_embeddings_put_items_with_shared_tokens_together() -> None:
    rng = np.random.default_rng(0)
    groups = 6
    tokens = [[f"a:{g}", f"w:brand{g}", f"w:x{rng.integers(1000)}"] for g in range(groups) for _ in range(10)]
    tokens.append([])  # an item without content
    emb = content_embeddings(tokens, dim=8, seed=0)
    assert emb.shape == (61, 8) and np.allclose(np.linalg.norm(emb[:60], axis=1), 1.0, atol=1e-5)
    assert np.allclose(emb[60], 0.0)
    sim = emb[:60] @ emb[:60].T
    same = np.equal.outer(np.arange(60) // 10, np.arange(60) // 10)
    assert sim[same].mean() > sim[~same].mean() + 0.5


def test_content_embeddings_are_the_same_in_every_process() -> None:
    """Python salts string hashes per process (PYTHONHASHSEED), so anything built from a set of tokens
    in iteration order differs between two builds of the same data; the embeddings must not."""
    script = (
        "import sys, numpy as np\n"
        "from onerec.tokenizer import content_embeddings\n"
        "rng = np.random.default_rng(0)\n"
        "tokens = [[f'a:{i % 7}', f'w:{i % 5}', f'w:x{rng.integers(40)}', f'w:y{rng.integers(40)}']\n"
        "          for i in range(60)]\n"
        "sys.stdout.write(content_embeddings(tokens, dim=6, seed=0).tobytes().hex())\n"
    )
    outputs = set()
    for hash_seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        outputs.add(run.stdout)
    assert len(outputs) == 1


def test_join_embeddings_weights_the_content_share() -> None:
    rng = np.random.default_rng(1)
    collab = rng.standard_normal((5, 4))
    collab /= np.linalg.norm(collab, axis=1, keepdims=True)
    content = rng.standard_normal((5, 3))
    content /= np.linalg.norm(content, axis=1, keepdims=True)
    content[4] = 0.0
    joined = join_embeddings(collab, content, 0.3)
    assert np.allclose(np.linalg.norm(joined, axis=1), 1.0, atol=1e-6)
    assert np.allclose((joined[:4, 4:] ** 2).sum(1), 0.3, atol=1e-6)
    assert np.allclose(joined[4, :4], collab[4], atol=1e-6) and np.allclose(joined[4, 4:], 0.0)


def write_catalogue(folder: Path, with_content: bool) -> Path:
    """A small Beauty-layout dataset: items of 8 families, users browse within a family in order."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    n_items, families = 96, 8
    lines = []
    for u in range(260):
        fam = rng.integers(families)
        start = rng.integers(12)
        items = [1 + fam * 12 + (start + j) % 12 for j in range(rng.integers(5, 9))]
        lines.append(f"u{u} " + " ".join(str(i) for i in items))
    seq = folder / "sequences.txt"
    seq.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if with_content:
        attrs = {str(i): [1 + (i - 1) // 12, 50] for i in range(1, n_items + 1)}
        (folder / "item2attributes.json").write_text(json.dumps(attrs), encoding="utf-8")
        text = ["item_id\tasin\ttext_id"] + [
            f"{i}\tB{i:05d}\tfamily{(i - 1) // 12} thing" for i in range(1, n_items + 1)
        ]
        (folder / "item_text.tsv").write_text("\n".join(text) + "\n", encoding="utf-8")
    return seq


def test_item_content_is_read_beside_the_sequence_file_and_optional(tmp_path: Path) -> None:
    seq = write_catalogue(tmp_path / "full", with_content=True)
    data = load_sequence_file(seq)
    tokens, used = load_item_content(seq, data.item_ids)
    assert used == ["item2attributes.json", "item_text.tsv"]
    first = data.item_ids.index("13")
    assert tokens[first] == ["a:2", "a:50", "w:family1", "w:thing"]
    bare = write_catalogue(tmp_path / "bare", with_content=False)
    assert load_item_content(bare, load_sequence_file(bare).item_ids) is None


def small_file_config(path: Path) -> BuildConfig:
    return BuildConfig(
        dataset=str(path),
        name="small",
        embedding_dim=8,
        levels=2,
        codes_per_level=None,
        model=ModelConfig(
            session_items=2, history_window=8, d_model=32, n_heads=2, d_ff=32, n_experts=2, n_encoder_layers=1,
            n_decoder_layers=1,
        ),
        train=TrainConfig(epochs=1, batch_size=64, lr=3e-3, holdout_share=0.0, slot_weights=[1.0, 0.5]),
        eval_beam=10,
        session_eval_users=50,
    )  # fmt: skip


@pytest.mark.parametrize("with_content", [True, False])
def test_build_of_a_sequence_file_with_and_without_content(tmp_path: Path, with_content: bool) -> None:
    seq = write_catalogue(tmp_path / "data", with_content=with_content)
    published, summary = build(small_file_config(seq), tmp_path / "store", progress=False)
    manifest = json.loads((published.path / "manifest.json").read_text())
    assert ("content" in manifest["dataset"]) == with_content
    levels = manifest["semantic_ids"]["level_sizes"]
    assert levels[:2] == [codebook_size(96, 2)] * 2
    metrics = summary["metrics"]
    assert metrics["legality_constrained"] == 1.0  # measured on the served, constrained search
    assert 0.0 <= metrics["legality_unconstrained"] <= 1.0
    assert metrics["test_session"]["users"] == 50 and 0.0 <= metrics["test_session"]["recall@10"] <= 1.0


# ---- model: balance loss and slot weights --------------------------------------------------------


def tiny_model() -> tuple[OneRecModel, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    cfg = ModelConfig(level_sizes=[5, 6], session_items=3, history_window=4, d_model=16, n_heads=2, d_ff=16)
    model = OneRecModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    hist = torch.stack([torch.randint(0, v, (3, 4), generator=g) for v in cfg.level_sizes], dim=-1)
    target = torch.stack([torch.randint(0, v, (3, 3), generator=g) for v in cfg.level_sizes], dim=-1)
    mask = torch.ones(3, 4, dtype=torch.bool)
    return model, (hist, mask, torch.tensor([0, 1, 2]), target)


def test_balance_loss_is_computed_on_what_the_router_sees() -> None:
    model, batch = tiny_model()
    seen: list[torch.Tensor] = []
    hooks = [layer.moe.register_forward_hook(lambda m, args, out: seen.append(args[0])) for layer in model.decoder]
    with torch.no_grad():
        _, balance = model(*batch)
    for h in hooks:
        h.remove()
    expected = sum(layer.moe.balance_loss(x) for layer, x in zip(model.decoder, seen)) / len(model.decoder)
    assert torch.allclose(balance, expected)
    stale = sum(layer.moe.balance_loss(layer.n3(model.decoder_inputs(batch[3]))) for layer in model.decoder[:1])
    assert not torch.allclose(model.decoder[0].moe.balance_loss(seen[0]), stale)  # the old, wrong input


def test_slot_weights_zero_reduce_the_loss_to_the_first_slot() -> None:
    model, (hist, mask, users, target) = tiny_model()
    with torch.no_grad():
        first_only, _ = model(hist, mask, users, target[:, :1])
        weighted, _ = model(hist, mask, users, target, slot_weights=[1.0, 0.0, 0.0])
        plain, _ = model(hist, mask, users, target)
        same, _ = model(hist, mask, users, target, slot_weights=[2.0, 2.0, 2.0])
    assert torch.allclose(weighted, first_only, atol=1e-6)  # causal decoder: later slots do not change slot 1
    assert torch.allclose(plain, same, atol=1e-6) and not torch.allclose(plain, weighted)
    with pytest.raises(ValueError):
        model(hist, mask, users, target, slot_weights=[1.0])


def test_sample_weights_weigh_each_sample_in_the_loss_and_fade_with_age() -> None:
    """A zero-weight sample drops out of the mean; the weights the trainer gives fall with the items after
    each sample's target (1 for a user's last training item)."""
    from onerec.train import SessionSamples

    model, (hist, mask, users, target) = tiny_model()
    with torch.no_grad():
        first_two, _ = model(hist[:2], mask[:2], users[:2], target[:2])
        weighted, _ = model(hist, mask, users, target, sample_weights=torch.tensor([3.0, 3.0, 0.0]))
        plain, _ = model(hist, mask, users, target)
    assert torch.allclose(weighted, first_two, atol=1e-6) and not torch.allclose(plain, weighted)
    cfg = ModelConfig(level_sizes=[5], session_items=1, history_window=4, d_model=8, n_heads=2, d_ff=8)
    samples = SessionSamples([np.array([0, 1, 2, 3]), np.array([4, 0])], ["a", "b"], np.arange(5)[:, None], cfg)
    assert samples.pairs.tolist() == [[0, 1], [0, 2], [0, 3], [1, 1]]
    got = samples.sample_weights(np.arange(4), 2.0, torch.device("cpu"))
    np.testing.assert_allclose(got.numpy(), np.exp(-np.array([2.0, 1.0, 0.0, 0.0]) / 2.0), rtol=1e-6)
    assert samples.sample_weights(np.arange(4), 0.0, torch.device("cpu")) is None
    # user_balance divides by the user's sample count: user a has 3 samples, user b one
    balanced = samples.sample_weights(np.arange(4), 0.0, torch.device("cpu"), user_balance=1.0)
    np.testing.assert_allclose(balanced.numpy(), [1 / 3, 1 / 3, 1 / 3, 1.0], rtol=1e-6)
    both = samples.sample_weights(np.arange(4), 2.0, torch.device("cpu"), user_balance=0.5)
    np.testing.assert_allclose(both.numpy(), got.numpy() / np.sqrt([3.0, 3.0, 3.0, 1.0]), rtol=1e-6)


def test_next_item_loss_adds_the_weighted_softmax_over_every_item() -> None:
    model, (hist, mask, users, target) = tiny_model()
    catalogue = torch.tensor([[a, b] for a in range(5) for b in range(6)])  # (30, D) every code path
    wanted = torch.tensor([4, 17, 29])
    with torch.no_grad():
        plain, _ = model(hist, mask, users, target)
        joined, _ = model(hist, mask, users, target, next_items=NextItemTargets(catalogue, wanted, 0.5))
        off, _ = model(hist, mask, users, target, next_items=NextItemTargets(catalogue, wanted, 0.0))
        user_token = model.encode(hist, mask, users)[0][:, 0]  # (B, d)
        items = model.enc_codes[0].weight[catalogue[:, 0]] + model.enc_codes[1].weight[catalogue[:, 1]]  # (I, d)
        by_hand = torch.nn.functional.cross_entropy(user_token @ items.T, wanted)
    assert torch.allclose(joined - plain, 0.5 * by_hand, atol=1e-5)
    assert torch.equal(off, plain)


def test_training_with_the_next_item_loss_ranks_validation_items_higher(tmp_path: Path) -> None:
    from onerec.train import SessionSamples, train_model

    data, split, codes, cfg = training_world(tmp_path)
    samples = SessionSamples(split.train, data.user_ids, codes, cfg)
    first = samples.next_items(np.arange(len(samples)), 1.0, torch.device("cpu"))
    assert first is not None and samples.next_items(np.arange(3), 0.0, torch.device("cpu")) is None
    assert first.targets.tolist() == [int(split.train[u][p]) for u, p in samples.pairs]  # slot 1 of each sample

    def validation_item_loss(weight: float) -> float:
        torch.manual_seed(0)
        model = OneRecModel(cfg)
        tcfg = TrainConfig(epochs=6, batch_size=32, lr=3e-3, threads=1, next_item_weight=weight)
        train_model(model, split.train, data.user_ids, codes, tcfg, progress=False, selection=split.valid)
        idx = np.arange(len(split.valid))
        hist, mask, users, _, _ = samples.next_item_batch(split.valid, idx)
        with torch.no_grad():
            logits = model.next_item_logits(model.encode(hist, mask, users)[0], torch.from_numpy(codes))
        return float(torch.nn.functional.cross_entropy(logits, torch.tensor(split.valid.targets)))

    # without the loss nothing trains these scores to mean anything; with it they rank the next item
    with_loss, without = validation_item_loss(1.0), validation_item_loss(0.0)
    assert with_loss < without - 0.5


# ---- item identities and epoch selection ---------------------------------------------------------


def candidate_model(scores: bool = False, sources: bool = False) -> OneRecModel:
    """Five items on one-level paths 0..4 (item i has code i), each item's neighbours given by hand."""
    torch.manual_seed(0)
    cfg = ModelConfig(level_sizes=[6], session_items=1, history_window=4, d_model=8, n_heads=2, d_ff=8,
                      catalogue_items=5, candidate_tokens=3, candidate_scores=scores or sources,
                      candidate_sources=sources)  # fmt: skip
    model = OneRecModel(cfg).eval()
    model.set_catalogue(torch.arange(5)[:, None])
    items = torch.tensor([[1, 2, -1], [2, 3, -1], [4, -1, -1], [0, -1, -1], [-1, -1, -1]])
    weights = torch.tensor([[4.0, 1.0, 0.0], [2.0, 1.0, 0.0], [3.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    model.set_neighbours(items, weights)
    return model


def test_candidates_sum_the_newest_three_items_neighbours_and_skip_the_history() -> None:
    model = candidate_model()
    hist = torch.tensor([[[0], [1], [5]]])  # newest first: item 0, item 1, then path 5 (not in the catalogue)
    rows, scores = model.candidates(hist, torch.ones(1, 3, dtype=torch.bool))
    # item 0 (weight 1): 1 -> 4, 2 -> 1; item 1 (weight 0.5): 2 -> +1, 3 -> +0.5; items 0 and 1 are history
    assert rows[0].tolist() == [2, 3, -1] and scores[0].tolist() == [2.0, 0.5, 0.0]
    rows, scores = model.candidates(torch.tensor([[[2], [3]]]), torch.tensor([[True, False]]))  # 3 is padding
    assert rows[0].tolist() == [4, -1, -1] and scores[0].tolist() == [3.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="share a code path"):
        model.set_catalogue(torch.tensor([[0], [1], [1], [2], [3]]))
    with pytest.raises(ValueError, match="item indices"):
        model.set_neighbours(torch.full((5, 3), 7), torch.ones(5, 3))


def test_candidates_enter_the_memory_and_the_model_reads_them() -> None:
    model = candidate_model()
    hist, mask, user = torch.tensor([[[0], [1]]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([0])
    memory, mem_mask = model.encode(hist, mask, user)
    assert memory.shape[1] == 1 + 2 + 3 and mem_mask[0, 0, 0].tolist() == [True] * 3 + [True, True, False]
    given = (torch.tensor([[4, -1, -1]]), torch.tensor([[2.0, 0.0, 0.0]]))
    other, given_mask = model.encode(hist, mask, user, candidates=given)
    assert given_mask[0, 0, 0].tolist() == [True] * 3 + [True, False, False]
    assert not torch.allclose(memory[:, :3], other[:, :3])  # the encoder attends to its candidates


def test_candidate_scores_enter_the_memory_when_configured() -> None:
    model = candidate_model(scores=True)
    hist, mask, user = torch.tensor([[[0], [1]]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([0])
    rows = torch.tensor([[4, 2, -1]])
    weak, _ = model.encode(hist, mask, user, candidates=(rows, torch.tensor([[2.0, 1.0, 0.0]])))
    strong, _ = model.encode(hist, mask, user, candidates=(rows, torch.tensor([[9.0, 1.0, 0.0]])))
    assert not torch.allclose(weak, strong)  # same candidates, different scores: a different memory
    plain = candidate_model()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "cand_score.weight"})
    a, _ = plain.encode(hist, mask, user, candidates=(rows, torch.tensor([[2.0, 1.0, 0.0]])))
    b, _ = plain.encode(hist, mask, user, candidates=(rows, torch.tensor([[9.0, 1.0, 0.0]])))
    assert torch.equal(a, b)  # without the option only the rank is read


def test_item_vectors_give_each_catalogue_item_its_own_input() -> None:
    """With item_vectors the encoder reads a history item or a candidate as its code sum plus its own vector:
    at zero vectors the memory is exactly the plain model's, an item's vector moves the memory only where that
    item is read, and a path without a catalogue row (path 5: an item added after training) reads its codes alone."""
    plain = candidate_model(scores=True)
    own = OneRecModel(replace(plain.cfg, item_vectors=True)).eval()
    own.load_state_dict({**plain.state_dict(), "item_vectors.weight": torch.zeros(5, 8)})
    own.set_catalogue(torch.arange(5)[:, None])
    hist, mask, user = torch.tensor([[[0], [5]]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([0])
    given = (torch.tensor([[4, 2, -1]]), torch.tensor([[2.0, 1.0, 0.0]]))
    base, _ = plain.encode(hist, mask, user, candidates=given)
    assert torch.equal(own.encode(hist, mask, user, candidates=given)[0], base)
    with torch.no_grad():
        own.item_vectors.weight[[1, 3]] = 5.0  # neither in the history nor among the candidates
    assert torch.equal(own.encode(hist, mask, user, candidates=given)[0], base)
    for item in (0, 4, 2):  # the history's item, the strongest candidate, the second
        with torch.no_grad():
            own.item_vectors.weight.zero_()
            own.item_vectors.weight[item] = 1.0
        assert not torch.allclose(own.encode(hist, mask, user, candidates=given)[0], base), item
    assert own.own_vectors(torch.tensor([-1, 2])).tolist() == [[0.0] * 8, [1.0] * 8]
    with pytest.raises(ValueError, match="item_vectors needs candidate_tokens"):
        OneRecModel(ModelConfig(level_sizes=[6], item_vectors=True))


def test_candidate_sources_split_each_score_by_the_history_item_that_gave_it() -> None:
    """Item 2 is a neighbour of the newest item (co-occurrence 1, recency weight 1) and of the one before
    (2 x 0.5), item 3 of the one before only (1 x 0.5): the split says so, and sums to the plain score."""
    model, plain = candidate_model(sources=True), candidate_model(scores=True)
    hist, mask = torch.tensor([[[0], [1], [5]]]), torch.ones(1, 3, dtype=torch.bool)
    rows, shares = model.candidates(hist, mask)
    want_rows, want_scores = plain.candidates(hist, mask)
    assert torch.equal(rows, want_rows) and rows[0].tolist() == [2, 3, -1]
    assert shares.shape == (1, 3, 3) and shares[0].tolist() == [[1.0, 1.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.0]]
    assert torch.equal(shares.sum(-1), want_scores)
    rows, shares = model.candidates(torch.tensor([[[2]]]), torch.ones(1, 1, dtype=torch.bool))  # one item: R = 3
    assert rows[0].tolist() == [4, -1, -1] and shares[0].tolist() == [[3.0, 0.0, 0.0], [0.0] * 3, [0.0] * 3]
    user, cand = torch.tensor([0]), torch.tensor([[4, 2, -1]])
    newest = torch.tensor([[[2.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0] * 3]])
    older = torch.tensor([[[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0] * 3]])  # the same sums, another source
    a, _ = model.encode(hist, mask, user, candidates=(cand, newest))
    b, _ = model.encode(hist, mask, user, candidates=(cand, older))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="candidate_sources and candidate_mass need"):
        OneRecModel(replace(model.cfg, candidate_scores=False))


def test_candidate_mass_tells_a_common_candidate_from_a_rare_one_at_the_same_score() -> None:
    """Given the same candidates and scores, a candidate whose own neighbour weights are larger (a more
    common item) makes a different memory when ``candidate_mass`` is on, and the same one when it is off."""
    hist, mask, user = torch.tensor([[[0], [1]]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([0])
    given = (torch.tensor([[4, 2, -1]]), torch.tensor([[2.0, 1.0, 0.0]]))
    items = torch.tensor([[1, 2, -1], [2, 3, -1], [4, -1, -1], [0, -1, -1], [0, 1, -1]])
    weights = torch.tensor([[4.0, 1.0, 0.0], [2.0, 1.0, 0.0], [3.0, 0.0, 0.0], [5.0, 0.0, 0.0], [1.0, 1.0, 0.0]])

    def memory(mass: bool, item_4_weights: list[float]) -> torch.Tensor:
        torch.manual_seed(0)
        model = OneRecModel(replace(candidate_model(scores=True).cfg, candidate_mass=mass)).eval()
        model.set_catalogue(torch.arange(5)[:, None])
        model.set_neighbours(items, torch.cat([weights[:4], torch.tensor([item_4_weights])]))
        return model.encode(hist, mask, user, candidates=given)[0]

    assert torch.equal(memory(False, [1.0, 1.0, 0.0]), memory(False, [90.0, 9.0, 0.0]))  # off: never read
    assert not torch.allclose(memory(True, [1.0, 1.0, 0.0]), memory(True, [90.0, 9.0, 0.0]))


def test_training_candidates_split_by_source_sum_to_their_scores() -> None:
    from onerec.train import leave_user_out_candidates

    seqs = [np.array([0, 1, 2]), np.array([0, 3]), np.array([5, 0, 3]), np.array([1, 5, 0, 3, 2]), np.array([2, 0])]
    pairs = np.array([(u, p) for u, s in enumerate(seqs) for p in range(1, len(s))])
    cand, scores = leave_user_out_candidates(seqs, pairs, 20, 6, 4, 0.5)
    same, shares = leave_user_out_candidates(seqs, pairs, 20, 6, 4, 0.5, sources=True)
    assert np.array_equal(cand, same) and shares.shape == (len(pairs), 4, 3)
    np.testing.assert_allclose(shares.sum(-1), scores, rtol=1e-6)
    for n, (_, p) in enumerate(pairs):
        assert not shares[n, :, min(p, 3) :].any()  # no share from a history item the sample lacks
    assert (shares[:, :, 1:].sum((0, 1)) > 0).all()  # the older items do give shares


@pytest.mark.parametrize("decay", [0.0, 1.5])
def test_candidate_transitions_and_directions_are_the_same_in_training_and_serving(decay: float) -> None:
    """Training's leave-user-out candidates for user 0 equal what a served model computes from neighbour
    lists built without user 0, transitions and forward fractions included, with the count faded or not
    (the user's own pairs fade as they were counted); each transition is the share over its source's mass,
    and a fraction of 1 means the candidate was only ever seen after its source."""
    from onerec.build import candidate_lists, candidate_part
    from onerec.train import leave_user_out_candidates

    seqs = [np.array([0, 1, 2, 4]), np.array([0, 3, 1]), np.array([5, 0, 3, 4]), np.array([1, 5, 0, 3, 2])]
    pairs = np.array([(0, p) for p in range(1, 4)])
    cand, got = leave_user_out_candidates(
        seqs, pairs, 20, 6, 4, 0.5, True, transitions=True, directions=True, decay=decay
    )
    assert got.shape == (3, 4, 9)
    cfg = ModelConfig(level_sizes=[7], session_items=1, history_window=4, d_model=8, n_heads=2, d_ff=8,
                      catalogue_items=6, candidate_tokens=4, candidate_scores=True, candidate_sources=True,
                      candidate_transitions=True, candidate_directions=True, candidate_decay=decay)  # fmt: skip
    model = OneRecModel(cfg).eval()
    model.set_catalogue(torch.arange(6)[:, None])
    items, weights = candidate_lists(seqs[1:], 6, 4, 0.5, decay)
    forward = candidate_part(seqs[1:], 6, items, 0.0, decay)
    assert items[0, 0] == 3 and forward[0, 0] == weights[0, 0]  # 3 after 0 thrice (faded: 1 and 2 items old)
    assert (weights[0, 0] == 3.0) == (decay == 0.0)
    assert decay or (items[0, 1] == 5 and forward[0, 1] == 0.0)  # 5 only before 0
    model.set_neighbours(
        torch.from_numpy(items), torch.from_numpy(weights), {"neighbour_forward": torch.from_numpy(forward)}
    )
    for n, (_, p) in enumerate(pairs):
        hist = torch.from_numpy(seqs[0][:p][::-1].copy())[None, :, None]  # newest first
        rows, want = model.candidates(hist, torch.ones(1, p, dtype=torch.bool))
        assert rows[0].tolist() == cand[n].tolist(), p
        np.testing.assert_allclose(got[n], want[0].numpy(), rtol=1e-5, atol=1e-6)
        for r in range(min(p, 3)):  # newest item's mass: the sum of its neighbour list, times its weight
            mass = CANDIDATE_RECENCY[r] * weights[seqs[0][p - 1 - r]].sum()
            np.testing.assert_allclose(got[n, :, 3 + r], got[n, :, r] / mass, rtol=1e-5)
    assert (got[:, :, 3:] <= 1 + 1e-6).all() and got[:, :, 3:6].any()
    fractions = got[:, :, 6:][got[:, :, :3] > 0]
    assert (fractions == 1.0).any() and (fractions < 1.0).any()  # both directions occur among the shares
    assert not got[:, :, 6:][got[:, :, :3] == 0].any()
    for key in ("candidate_transitions", "candidate_directions"):
        with pytest.raises(ValueError, match=f"{key} needs candidate_sources"):
            off = {"candidate_sources": False, "candidate_transitions": False, "candidate_directions": False}
            OneRecModel(replace(cfg, **{**off, key: True}))
    with pytest.raises(ValueError, match="weight parts are"):
        model.set_neighbours(torch.from_numpy(items), torch.from_numpy(weights))


def test_candidate_recency_is_the_same_in_training_and_serving() -> None:
    """Each source's recent fraction (the share left when the count fades) is what a served model computes
    from neighbour lists built without user 0; it is 1 only where every pair behind a share is a user's
    newest, and the whole count still ranks the candidates."""
    from onerec.build import candidate_lists, candidate_part, neighbour_parts
    from onerec.train import leave_user_out_candidates

    seqs = [np.array([0, 1, 2, 4]), np.array([0, 3, 1]), np.array([5, 0, 3, 4]), np.array([1, 5, 0, 3, 2])]
    pairs = np.array([(0, p) for p in range(1, 4)])
    cand, got = leave_user_out_candidates(seqs, pairs, 20, 6, 4, 0.5, True, recency=1.5)
    whole, whole_shares = leave_user_out_candidates(seqs, pairs, 20, 6, 4, 0.5, True)
    assert got.shape == (3, 4, 6) and (cand == whole).all()  # the ranking is the whole count's
    np.testing.assert_allclose(got[:, :, :3], whole_shares, rtol=1e-6)
    cfg = ModelConfig(level_sizes=[7], session_items=1, history_window=4, d_model=8, n_heads=2, d_ff=8,
                      catalogue_items=6, candidate_tokens=4, candidate_scores=True, candidate_sources=True,
                      candidate_backward=0.5, candidate_recency=1.5)  # fmt: skip
    model = OneRecModel(cfg).eval()
    assert candidate_score_features(cfg) == 2 + 6
    model.set_catalogue(torch.arange(6)[:, None])
    items, weights = candidate_lists(seqs[1:], 6, 4, 0.5)
    parts = neighbour_parts(seqs[1:], items, cfg)
    assert list(parts) == ["neighbour_recent"]
    recent = parts["neighbour_recent"].numpy()
    np.testing.assert_allclose(recent, candidate_part(seqs[1:], 6, items, 0.5, 1.5), rtol=1e-6)
    assert (recent <= weights + 1e-6).all() and (recent[items >= 0] > 0).all() and (recent < weights - 1e-3).any()
    model.set_neighbours(torch.from_numpy(items), torch.from_numpy(weights), parts)
    for n, (_, p) in enumerate(pairs):
        hist = torch.from_numpy(seqs[0][:p][::-1].copy())[None, :, None]  # newest first
        rows, want = model.candidates(hist, torch.ones(1, p, dtype=torch.bool))
        assert rows[0].tolist() == cand[n].tolist(), p
        np.testing.assert_allclose(got[n], want[0].numpy(), rtol=1e-5, atol=1e-6)
    fractions = got[:, :, 3:][got[:, :, :3] > 0]
    assert ((fractions > 0) & (fractions <= 1.0)).all() and (fractions < 1.0).any()
    assert not got[:, :, 3:][got[:, :, :3] == 0].any()
    with pytest.raises(ValueError, match="candidate_recency needs a whole count"):
        OneRecModel(replace(cfg, candidate_decay=2.0))
    with pytest.raises(ValueError, match="candidate_recency needs candidate_sources"):
        OneRecModel(replace(cfg, candidate_sources=False))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_keeps_its_neighbour_lists_exact(dtype: torch.dtype) -> None:
    """The generator casts the model to float16 on CUDA. float16 holds integers exactly only up to 2048
    (bfloat16 up to 256) and overflows past 65504; an H200 run of the Beauty build found candidates
    pointing at rounded item indices, and the candidates' scatter refusing the half-precision weights."""
    n = 4099  # item 4097 is not a float16 number
    cfg = ModelConfig(level_sizes=[n], session_items=1, history_window=4, d_model=8, n_heads=2, d_ff=8,
                      catalogue_items=n, candidate_tokens=2, candidate_scores=True, copy_head=True)  # fmt: skip
    torch.manual_seed(0)
    model = OneRecModel(cfg).eval()
    model.set_catalogue(torch.arange(n)[:, None])
    i = torch.arange(n)
    model.set_neighbours(torch.stack([n - 1 - i, (i + 2049) % n], 1), torch.tensor([[70000.0, 1.0]]).repeat(n, 1))
    half = copy.deepcopy(model).to(dtype)
    assert half.enc_codes[0].weight.dtype == dtype  # the weights are cast...
    assert half.neighbour_items.dtype == half.neighbour_weights.dtype == torch.float32  # ...the lists are not
    assert torch.equal(half.neighbour_items, model.neighbour_items)
    assert torch.equal(half.neighbour_weights, model.neighbour_weights)
    hist, mask = torch.tensor([[[5], [4097]]]), torch.ones(1, 2, dtype=torch.bool)
    rows, scores = half.candidates(hist, mask)
    want_rows, want_scores = model.candidates(hist, mask)
    assert rows.tolist() == want_rows.tolist() == [[4093, 1]]  # 4093 = the neighbour of item 5
    assert torch.equal(scores, want_scores)
    memory, _ = half.encode(hist, mask, torch.tensor([0]))
    assert memory.dtype == dtype and bool(torch.isfinite(memory).all())
    back = half.to(torch.float32)  # and back: still the same lists
    assert torch.equal(back.neighbour_items, model.neighbour_items)


def copy_model(gate_bias: float | None = None) -> OneRecModel:
    """Two-level paths for eight items, each item's neighbours given by hand, and the copy head on."""
    torch.manual_seed(0)
    cfg = ModelConfig(level_sizes=[4, 4], session_items=3, history_window=4, d_model=8, n_heads=2, d_ff=8,
                      catalogue_items=8, candidate_tokens=3, copy_head=True)  # fmt: skip
    model = OneRecModel(cfg).eval()
    model.set_catalogue(torch.tensor([[0, 0], [0, 1], [1, 0], [1, 2], [2, 3], [2, 0], [0, 3], [3, 1]]))
    items = torch.tensor([[1, 2, 4]] * 8)  # every item's neighbours: items 1 (0, 1), 2 (1, 0), 4 (2, 3)
    model.set_neighbours(items, torch.tensor([[3.0, 2.0, 1.0]] * 8))
    if gate_bias is not None:
        with torch.no_grad():
            model.copy_gate.weight.zero_()
            model.copy_gate.bias.fill_(gate_bias)
    return model


@torch.no_grad()
def test_copy_head_mixes_a_distribution_that_points_at_the_matching_candidates() -> None:
    hist, mask, user = torch.tensor([[[0, 0]]]), torch.ones(1, 1, dtype=torch.bool), torch.tensor([0])  # item 0
    target = torch.tensor([[[1, 0], [3, 1], [0, 3]]])  # items 2 (a candidate), 7 and 6 (not candidates)
    logps, _ = copy_model().position_log_probs(hist, mask, user, target)
    for logp in logps:  # a distribution at every position
        torch.testing.assert_close(logp.exp().sum(-1), torch.ones(1, 3))
    shut = copy_model(gate_bias=-30.0)  # gate forced shut: the head's own softmax
    got, _ = shut.position_log_probs(hist, mask, user, target)
    shut.cfg.copy_head = False  # the same weights, read without the pointer
    plain, _ = shut.position_log_probs(hist, mask, user, target)
    for a, b in zip(got, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # gate forced open: all the mass on the codes of the candidates that agree with the item so far
    p0, p1 = (logp[0].exp() for logp in copy_model(gate_bias=30.0).position_log_probs(hist, mask, user, target)[0])
    assert p0[:, 3].max().item() < 1e-6 and bool((p0[:, :3] > 0).all())  # level 0: items 1, 2, 4 start 0, 1, 2
    assert p1[0, 0].item() == pytest.approx(1.0, abs=1e-6)  # after code 1 only item 2 matches: its code 0
    assert p1[2, 1].item() == pytest.approx(1.0, abs=1e-6)  # after code 0 only item 1 matches: its code 1
    torch.testing.assert_close(p1[1], plain[1][0, 1].exp())  # after code 3 nothing matches: the head alone


def test_copy_head_needs_candidates() -> None:
    with pytest.raises(ValueError, match="copy_head needs candidate_tokens"):
        OneRecModel(ModelConfig(copy_head=True))


def unseen_transition_hits(copy_head: bool) -> tuple[int, int]:
    """Every item's next item is its strongest neighbour; train on two thirds of the items and count
    the others whose next item (never a training target) comes first: (hits, held-out items)."""
    from onerec.generate import Generator, RecRequest
    from onerec.trie import TrieIndex

    rng = np.random.default_rng(0)
    n, sizes = 36, [6, 6]
    paths = np.array([(c // 6, c % 6) for c in rng.choice(36, n, replace=False)])
    successor = np.roll(rng.permutation(n), 1)  # a random cycle: item successor[i] follows item i
    other = (successor + 1 + rng.integers(0, n - 2, n)) % n  # a weaker neighbour, a distractor
    other = np.where(other == np.arange(n), (other + 1) % n, other)
    torch.manual_seed(0)
    cfg = ModelConfig(level_sizes=sizes, session_items=1, history_window=2, d_model=32, n_heads=2, d_ff=32,
                      n_encoder_layers=1, n_decoder_layers=1, user_buckets=4, dropout=0.0,
                      catalogue_items=n, candidate_tokens=2, copy_head=copy_head)  # fmt: skip
    model = OneRecModel(cfg)
    model.set_catalogue(torch.from_numpy(paths))
    model.set_neighbours(torch.from_numpy(np.stack([successor, other], 1)), torch.tensor([[2.0, 1.0]] * n))
    train, held_out = np.arange(n)[: 2 * n // 3], np.arange(n)[2 * n // 3 :]
    codes = torch.from_numpy(paths)
    hist, mask = codes[train][:, None], torch.ones(len(train), 1, dtype=torch.bool)
    users, target = torch.zeros(len(train), dtype=torch.long), codes[successor[train]][:, None]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss, _ = model(hist, mask, users, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    gen = Generator(model.eval(), TrieIndex(paths, sizes))
    results, _ = gen.generate([RecRequest(history=[int(i)], num_items=1, mode="items", beam_width=4) for i in held_out])
    return sum(r.items[0].item == successor[i] for r, i in zip(results, held_out)), len(held_out)


def test_copy_head_follows_transitions_it_never_trained_on() -> None:
    """The pointer generalises where the head cannot: the same model without it, candidates still in
    its memory, barely finds those next items (0-2 of 12 over three seeds; 10-12 with the head)."""
    hits, total = unseen_transition_hits(copy_head=True)
    assert hits >= 0.75 * total, f"copy head: {hits} of {total} unseen transitions"
    hits, total = unseen_transition_hits(copy_head=False)
    assert hits <= total // 3, f"without the copy head: {hits} of {total} unseen transitions"


def test_top_neighbours_keep_the_strongest_per_item() -> None:
    from onerec.tokenizer import cooccurrence, top_neighbours

    seqs = [np.array([0, 1, 2]), np.array([0, 1]), np.array([3])]
    items, weights = top_neighbours(*cooccurrence(seqs, 4, 3), 4, 2)
    assert items.tolist() == [[1, 2], [0, 2], [1, 0], [-1, -1]]  # 0-1 twice; 1-2 at distance 1 beats 0-2 at 2
    assert weights[0].tolist() == [2.0, 0.5] and weights[3].tolist() == [0.0, 0.0]


def test_training_candidates_leave_out_the_samples_own_user() -> None:
    """A pair only one user made is never a candidate in that user's training samples; another user's is."""
    from onerec.train import leave_user_out_candidates

    seqs = [np.array([0, 1, 2]), np.array([0, 3]), np.array([5, 0, 3])]
    pairs = np.array([(u, p) for u, s in enumerate(seqs) for p in range(1, len(s))])
    cand, scores = leave_user_out_candidates(seqs, pairs, 20, 6, 4)
    assert ((cand >= 0) == (scores > 0)).all() and (np.diff(scores, axis=1) <= 0).all()  # strongest first
    by_sample = {(int(u), int(p)): set(c[c >= 0].tolist()) for (u, p), c in zip(pairs, cand)}
    assert 1 not in by_sample[(0, 1)] and 2 not in by_sample[(0, 1)]  # user 0 alone saw 0 with 1 and 2
    assert 3 in by_sample[(0, 1)]  # users 1 and 2 saw 0 then 3
    assert by_sample[(0, 1)] == {3, 5}
    assert by_sample[(1, 1)] == {1, 2, 3, 5}  # user 2's 0-3 still counts for user 1


def test_training_candidates_weigh_items_seen_before_by_the_backward_weight() -> None:
    """Users 1 and 2 saw 3 right after 0, user 2 saw 5 right before it: for user 0's first sample, 3 scores 2
    either way and 5 scores the backward weight (1 in the symmetric count, the baseline's)."""
    from onerec.train import leave_user_out_candidates

    seqs = [np.array([0, 1, 2]), np.array([0, 3]), np.array([5, 0, 3])]
    pairs = np.array([(0, 1)])
    for backward, want in ((1.0, [2.0, 1.0]), (0.5, [2.0, 0.5]), (0.0, [2.0])):
        cand, scores = leave_user_out_candidates(seqs, pairs, 20, 6, 4, backward)
        got = cand[0][cand[0] >= 0].tolist()
        assert got == [3, 5][: len(want)], backward
        assert scores[0][: len(want)].tolist() == want, backward


def test_the_build_chooses_the_backward_weight_whose_candidates_hold_the_most_targets() -> None:
    """On the ring (the next item is always the last + 1), the symmetric count ties an item's neighbour
    before it with the one after it, so a single candidate is the wrong one about half the time; counted
    forward only, the one candidate is the next item every time."""
    from onerec.build import candidate_lists, candidate_recall, choose_candidate_backward
    from onerec.data import EvalSet

    seqs = ring_world(n_items=20, users=200)
    rows = EvalSet(
        users=np.arange(len(seqs)),
        histories=[s[-2:-1] for s in seqs],  # the last item alone: its one candidate is all there is
        targets=np.asarray([s[-1] for s in seqs]),
    )
    train = [s[:-1] for s in seqs]
    assert candidate_recall(*candidate_lists(train, 20, 1, 0.0), rows) == 1.0
    assert candidate_recall(*candidate_lists(train, 20, 1, 1.0), rows) < 0.8
    backward, recall = choose_candidate_backward(train, rows, 20, 1, (1.0, 0.0))
    assert backward == 0.0 and recall["0.0"] == 1.0 > recall["1.0"] and set(recall) == {"1.0", "0.0"}
    backward, recall = choose_candidate_backward(train, rows, 20, 1, (0.5, 0.0))  # both forward: a tie
    assert backward == 0.5 and recall["0.5"] == recall["0.0"] == 1.0
    with pytest.raises(ValueError, match="no backward weight"):
        choose_candidate_backward(train, rows, 20, 1, ())


def drifting_world(n_items: int = 20, users: int = 200, seed: int = 0) -> list[np.ndarray]:
    """Users walked the ring one step at a time for a while, then switched to two steps at a time: the
    next item is the last + 2, but most pairs on record are one step apart."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(users):
        start, old, new = rng.integers(n_items), rng.integers(6, 10), rng.integers(3, 5)
        steps = np.concatenate([np.ones(old, dtype=np.int64), np.full(new, 2)])
        out.append((start + np.concatenate([[0], np.cumsum(steps)])) % n_items)
    return out


def test_the_build_fades_the_candidates_count_where_the_recent_pairs_predict_better() -> None:
    """On the drifting ring the unfaded count ranks the old successor (last + 1) first, a faded one the new
    (last + 2): the build chooses to fade. On the stationary ring the unfaded count already ranks the
    successor first, and the build keeps it."""
    from onerec.build import candidate_lists, candidate_ndcg, choose_candidate_decay
    from onerec.data import EvalSet

    def last_item_rows(seqs: list[np.ndarray]) -> tuple[list[np.ndarray], EvalSet]:
        rows = EvalSet(np.arange(len(seqs)), [s[-2:-1] for s in seqs], np.asarray([s[-1] for s in seqs]))
        return [s[:-1] for s in seqs], rows

    train, rows = last_item_rows(drifting_world())
    assert candidate_ndcg(*candidate_lists(train, 20, 2, 0.0, 1.0), rows) == 1.0
    assert candidate_ndcg(*candidate_lists(train, 20, 2, 0.0), rows) < 0.7
    decay, ndcg = choose_candidate_decay(train, rows, 20, 2, 0.0, (0.0, 0.1))
    mean_length = np.mean([len(s) for s in train])
    assert decay == round(0.1 * mean_length, 3) > 0 and ndcg[str(decay)] == 1.0 > ndcg["0.0"]
    train, rows = last_item_rows(ring_world(n_items=20, users=200))
    decay, ndcg = choose_candidate_decay(train, rows, 20, 2, 0.0, (0.0, 0.1))
    assert decay == 0.0 and ndcg["0.0"] == max(ndcg.values()) == 1.0
    with pytest.raises(ValueError, match="no decay"):
        choose_candidate_decay(train, rows, 20, 2, 0.0, ())


@pytest.mark.parametrize("recent_fractions", [False, True])
def test_the_build_fades_the_training_samples_alone_when_asked(tmp_path: Path, recent_fractions: bool) -> None:
    """fade_candidates off: the chosen scale weighs the training samples, the candidates' count stays whole;
    with recent_fractions the same scale gives each source's recent fraction, saved and loaded with the model."""
    from onerec.build import candidate_lists, candidate_part
    from onerec.bundle import load_bundle

    seq = write_catalogue(tmp_path / "data", with_content=False)
    cfg = small_file_config(seq)
    cfg.model.candidate_tokens = 5
    cfg.model.candidate_scores = cfg.model.candidate_sources = recent_fractions
    cfg.candidate_decay_lengths = (2.0,)
    cfg.fade_candidates, cfg.fade_samples, cfg.recent_fractions = False, True, recent_fractions
    published, _ = build(cfg, tmp_path / "store", progress=False)
    manifest = json.loads((published.path / "manifest.json").read_text())
    data = load_sequence_file(seq)
    split = leave_one_out(data)
    decay = round(2.0 * float(np.mean([len(s) for s in split.train])), 3)
    assert manifest["candidates"]["decay"] == manifest["train_config"]["sample_decay"] == decay > 0
    assert manifest["candidates"]["faded"] == {"candidates": False, "samples": True}
    assert manifest["model_config"]["candidate_decay"] == 0.0
    assert manifest["model_config"]["candidate_recency"] == (decay if recent_fractions else 0.0)
    if recent_fractions:
        model = load_bundle(published.path).model
        items, _ = candidate_lists(split.train, data.n_items, 5, model.cfg.candidate_backward)
        want = candidate_part(split.train, data.n_items, items, model.cfg.candidate_backward, decay)
        assert torch.equal(model.neighbour_recent, torch.from_numpy(want)) and bool(model.neighbour_recent.any())


def test_the_build_fades_the_training_samples_at_a_number_of_mean_sequences(tmp_path: Path) -> None:
    """sample_decay_length: the samples' scale is that many mean training sequences, with no choice made and
    no candidates needed; asking for the chosen scale as well is refused before any work."""
    seq = write_catalogue(tmp_path / "data", with_content=False)
    cfg = small_file_config(seq)
    cfg.sample_decay_length = 2.0
    published, _ = build(cfg, tmp_path / "store", progress=False)
    manifest = json.loads((published.path / "manifest.json").read_text())
    split = leave_one_out(load_sequence_file(seq))
    assert manifest["train_config"]["sample_decay"] == round(2.0 * float(np.mean([len(s) for s in split.train])), 3)
    assert manifest["train_config"]["sample_decay"] > 0 and not manifest["model_config"]["candidate_tokens"]
    cfg.fade_samples = True
    with pytest.raises(ValueError, match="set one"):
        build(cfg, tmp_path / "store", progress=False)


def test_embedding_dropout_acts_in_training_only() -> None:
    _, batch = tiny_model()
    model = OneRecModel(ModelConfig(level_sizes=[5, 6], session_items=3, history_window=4, d_model=16, n_heads=2,
                                    d_ff=16, dropout=0.0))  # fmt: skip
    with torch.no_grad():
        model.train()
        assert torch.equal(model(*batch)[0], model(*batch)[0])  # no dropout anywhere: deterministic
        model.cfg.embedding_dropout = 0.5
        assert not torch.equal(model(*batch)[0], model(*batch)[0])
        model.eval()
        assert torch.equal(model(*batch)[0], model(*batch)[0])


def test_residual_dropout_acts_in_training_only_and_leaves_inference_unchanged() -> None:
    _, batch = tiny_model()
    base = ModelConfig(level_sizes=[5, 6], session_items=3, history_window=4, d_model=16, n_heads=2, d_ff=16,
                       dropout=0.0)  # fmt: skip
    plain = OneRecModel(base)
    dropped = OneRecModel(replace(base, residual_dropout=0.5))
    dropped.load_state_dict(plain.state_dict())  # same weights: only the dropout differs
    with torch.no_grad():
        dropped.train()
        assert not torch.equal(dropped(*batch)[0], dropped(*batch)[0])
        plain.train()
        assert not torch.equal(dropped(*batch)[0], plain(*batch)[0])
        dropped.eval()
        plain.eval()
        assert torch.equal(dropped(*batch)[0], plain(*batch)[0])


def training_world(tmp_path: Path) -> tuple[InteractionData, Split, np.ndarray, ModelConfig]:
    """The small catalogue split leave-one-out, two-level codes for it, and a tiny model config."""
    data = load_sequence_file(write_catalogue(tmp_path, with_content=False))
    codes = np.stack([np.arange(data.n_items) % 7, np.arange(data.n_items) // 7], axis=1)
    cfg = ModelConfig(level_sizes=[7, 14], session_items=2, history_window=8, d_model=16, n_heads=2, d_ff=16)
    return data, leave_one_out(data), codes, cfg


def test_selection_on_validation_rows_trains_every_sample_and_keeps_the_best_epoch(tmp_path: Path) -> None:
    from onerec.train import SessionSamples, selection_loss, train_model

    data, split, codes, cfg = training_world(tmp_path)
    model = OneRecModel(cfg)
    tcfg = TrainConfig(epochs=4, batch_size=64, lr=3e-3, holdout_share=0.2, threads=1)
    report = train_model(model, split.train, data.user_ids, codes, tcfg, progress=False, selection=split.valid)
    samples = SessionSamples(split.train, data.user_ids, codes, cfg)
    assert report.steps == 4 * math.ceil(len(samples) / 64)  # the holdout share is not drawn: all samples train
    assert len(report.holdout_loss) == 4
    assert report.best_epoch == 1 + int(np.argmin(report.holdout_loss))
    kept = selection_loss(model, samples, split.valid, 64, torch.device("cpu"))
    assert kept == pytest.approx(min(report.holdout_loss), rel=1e-5)  # the best epoch's weights are loaded


def test_length_sorted_batches_train_every_sample_once_and_pad_to_their_own_lengths() -> None:
    from onerec.train import length_sorted_batches

    rng = np.random.default_rng(3)
    lengths = rng.choice([1, 2, 3, 20], size=1000, p=[0.5, 0.3, 0.17, 0.03])  # Beauty-like: a few full windows
    perm = rng.permutation(1000)
    plain = length_sorted_batches(perm, lengths, 50, 0, rng)
    assert [b.tolist() for b in plain] == [perm[i : i + 50].tolist() for i in range(0, 1000, 50)]
    batches = length_sorted_batches(perm, lengths, 50, 4, rng)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))  # every sample once
    assert [len(b) for b in batches] == [50] * 20
    padded = [int(lengths[b].max()) for b in batches]
    assert np.mean(padded) < 0.5 * np.mean([lengths[b].max() for b in plain])
    for start in range(0, 1000, 200):  # each chunk of 4 batches holds the same samples as before, sorted
        chunk = set(perm[start : start + 200].tolist())
        inside = [b for b in batches if set(b.tolist()) <= chunk]
        assert len(inside) == 4
    assert len({tuple(b) for b in batches}) == 20
    again = length_sorted_batches(perm, lengths, 50, 4, np.random.default_rng(4))
    assert [b.tolist() for b in again] != [b.tolist() for b in batches]  # the batches' order is drawn


def test_training_on_length_sorted_batches_pads_less_and_still_sees_every_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onerec.train import SessionSamples, train_model

    data, split, codes, cfg = training_world(tmp_path)
    seen: dict[int, list[tuple[list[int], int]]] = {}
    real = SessionSamples.batch

    def spy(self: SessionSamples, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        out = real(self, idx)
        seen[chunks].append((idx.tolist(), out[0].shape[1]))  # (samples, padded history width)
        return out

    monkeypatch.setattr(SessionSamples, "batch", spy)
    n = len(SessionSamples(split.train, data.user_ids, codes, cfg))
    widths = {}
    for chunks in (0, 4):
        seen[chunks] = []
        tcfg = TrainConfig(epochs=1, batch_size=16, threads=1, sorted_chunk_batches=chunks)
        train_model(OneRecModel(cfg), split.train, data.user_ids, codes, tcfg, progress=False, selection=split.valid)
        assert sorted(i for idx, _ in seen[chunks] for i in idx) == list(range(n))
        widths[chunks] = np.mean([w for _, w in seen[chunks]])
    assert widths[4] < widths[0]


def test_weight_average_follows_the_moving_average_and_gives_the_weights_back() -> None:
    from onerec.train import WeightAverage

    layer = torch.nn.Linear(3, 2)
    average = WeightAverage(layer, span_steps=4.0)  # decay 0.75 once the warm-up cap passes it
    expected = [p.detach().clone() for p in layer.parameters()]
    for n in range(12):
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(float(n + 1))
        average.update()
        decay = min(0.75, (1 + n) / (10 + n))
        expected = [e * decay + p.detach() * (1 - decay) for e, p in zip(expected, layer.parameters())]
    for got, want in zip(average.shadow, expected):
        torch.testing.assert_close(got, want)
    own = [p.detach().clone() for p in layer.parameters()]
    assert not torch.allclose(own[0], average.shadow[0])
    with average.applied():
        assert all(torch.equal(p, s) for p, s in zip(layer.parameters(), average.shadow))
    assert all(torch.equal(p, o) for p, o in zip(layer.parameters(), own))


@pytest.mark.parametrize("with_selection", [True, False])
def test_training_with_a_weight_average_selects_and_publishes_the_averaged_weights(
    tmp_path: Path, with_selection: bool
) -> None:
    from onerec.train import SessionSamples, selection_loss, train_model

    data, split, codes, cfg = training_world(tmp_path)
    samples = SessionSamples(split.train, data.user_ids, codes, cfg)
    kept = {}
    for average in (None, 1.0):
        torch.manual_seed(0)
        model = OneRecModel(cfg)
        tcfg = TrainConfig(epochs=3, batch_size=64, lr=3e-3, holdout_share=0.0, threads=1, average_epochs=average)
        report = train_model(
            model, split.train, data.user_ids, codes, tcfg, progress=False,
            selection=split.valid if with_selection else None,
        )  # fmt: skip
        kept[average] = selection_loss(model, samples, split.valid, 64, torch.device("cpu"))
        if with_selection:  # the epoch was chosen on, and kept with, the weights it was scored with
            assert kept[average] == pytest.approx(min(report.holdout_loss), rel=1e-5)
    assert kept[1.0] != pytest.approx(kept[None], rel=1e-4)  # the same run without the average ends elsewhere


def test_training_progress_goes_to_stderr_so_stdout_stays_machine_readable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from onerec.train import train_model

    data, split, codes, cfg = training_world(tmp_path)
    tcfg = TrainConfig(epochs=2, batch_size=64, threads=1)
    train_model(OneRecModel(cfg), split.train, data.user_ids, codes, tcfg, progress=True, selection=split.valid)
    out, err = capsys.readouterr()
    assert out == ""  # `onerec build` prints its summary JSON there
    assert "[train] epoch 2:" in err


def test_a_build_with_candidates_by_source_tied_codes_and_copy_head_answers_the_same_loaded(tmp_path: Path) -> None:
    from onerec.build import candidate_part
    from onerec.bundle import load_bundle
    from onerec.evaluate import evaluate_split

    seq = write_catalogue(tmp_path / "data", with_content=False)
    cfg = small_file_config(seq)
    cfg.select_on_valid = True
    cfg.model.candidate_tokens = 5
    cfg.model.candidate_scores = True
    cfg.model.candidate_sources = True
    cfg.model.candidate_transitions = True  # off in the recipe: here for the saved forward weights' round trip
    cfg.model.candidate_directions = True
    cfg.model.tie_code_embeddings = True
    cfg.model.copy_head = True
    cfg.model.item_vectors = True  # off in the recipe: here for the saved item vectors' round trip
    cfg.model.head_bias = True  # off in the recipe: here for the saved head and trie-node biases' round trip
    cfg.model.node_bias = True
    cfg.candidate_backward_choices = (0.0, 1.0)
    cfg.candidate_decay_lengths = (1.0,)  # one choice: the count fades at the mean sequence length
    cfg.fade_samples = True
    published, summary = build(cfg, tmp_path / "store", progress=False)
    bundle = load_bundle(published.path)
    model = bundle.model
    manifest = json.loads((published.path / "manifest.json").read_text())
    chosen = manifest["candidates"]
    assert set(chosen["valid_recall_by_backward"]) == {"0.0", "1.0"}
    assert model.cfg.candidate_backward == chosen["backward"]
    data = load_sequence_file(seq)
    split = leave_one_out(data)
    decay = round(float(np.mean([len(s) for s in split.train])), 3)
    assert model.cfg.candidate_decay == chosen["decay"] == decay == manifest["train_config"]["sample_decay"] > 0
    assert chosen["faded"] == {"candidates": True, "samples": True}
    count = cooccurrence(split.train, data.n_items, 3, chosen["backward"], decay)
    want, _ = top_neighbours(*count, data.n_items, 5)
    assert torch.equal(model.neighbour_items, torch.from_numpy(want).float())  # the lists of the chosen count
    forward = candidate_part(split.train, data.n_items, want, 0.0, decay)
    assert torch.equal(model.neighbour_forward, torch.from_numpy(forward)) and bool(model.neighbour_forward.any())
    for lvl, table in enumerate(model.enc_codes):  # still one tensor per level after the safetensors round trip
        assert model.heads[lvl].weight is table.weight and model.dec_codes[lvl].weight is table.weight
        assert model.heads[lvl].bias is not None and bool(model.heads[lvl].bias.any())  # trained, not the zero init
    assert bool(model.node_bias.any()) and model.node_keys.numel() > 0  # trained, and the node keys rebuilt
    data = load_sequence_file(seq)
    assert bundle.model.cfg.catalogue_items == data.n_items
    again = evaluate_split(
        bundle.generator, split.test, data.user_ids, split.train_popularity(), beam_width=10, progress=False
    )
    assert again.model == summary["metrics"]["test"]  # neighbours saved, catalogue lookup rebuilt on load
