"""Beam search against brute force, constraint guarantees, and batch invariance."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from onerec.generate import Generator, RecRequest
from onerec.model import ModelConfig, OneRecModel, hash_user
from onerec.trie import TrieIndex

SIZES = [3, 3, 2]


def tiny_world(
    n_items: int = 9,
    session_items: int = 2,
    seed: int = 0,
    sizes: list[int] = SIZES,
    history_window: int = 6,
    candidates: int = 0,
    tie: bool = False,
    copy: bool = False,
    head_bias: bool = False,
    node_bias: bool = False,
) -> tuple[OneRecModel, TrieIndex]:
    """A random model over a random catalogue of ``n_items`` paths: small enough for many searches.

    With ``candidates`` > 0 the encoder memory also holds that many co-occurrence candidates, from
    random neighbour lists; with ``tie`` each level's codes have one table (encoder, decoder, head);
    with ``copy`` the output also mixes in the copy head's pointer over those candidates; with ``head_bias``
    each head has its per-code bias; with ``node_bias`` each node of the catalogue's trie has its own."""
    rng = np.random.default_rng(seed)
    space = np.array(list(itertools.product(*[range(s) for s in sizes])))
    paths = space[rng.choice(len(space), n_items, replace=False)]
    torch.manual_seed(seed)
    cfg = ModelConfig(
        level_sizes=sizes,
        session_items=session_items,
        history_window=history_window,
        d_model=32,
        n_heads=4,
        n_encoder_layers=1,
        n_decoder_layers=2,
        d_ff=32,
        n_experts=4,
        experts_top_k=2,
        user_buckets=16,
        catalogue_items=n_items if candidates else 0,
        candidate_tokens=candidates,
        tie_code_embeddings=tie,
        copy_head=copy,
        head_bias=head_bias,
        node_bias=node_bias,
    )
    model = OneRecModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.6)  # sharp, varied distributions: no near-ties
    if candidates:
        model.set_catalogue(torch.from_numpy(paths))
        neighbours = torch.from_numpy(np.stack([rng.permutation(n_items)[:candidates] for _ in range(n_items)]))
        model.set_neighbours(neighbours, torch.from_numpy(rng.uniform(0.5, 2.0, (n_items, candidates))))
    return model, TrieIndex(paths, sizes)


@torch.no_grad()
def teacher_forced_logprobs(
    model: OneRecModel, history: list[int], user: str, trie: TrieIndex, session: list[int]
) -> list[torch.Tensor]:
    """Per-position log-softmax over the full level vocabulary, by the training (full-sequence) path."""
    snap = trie.tensors
    hist = torch.tensor(history[::-1] or [0])
    codes = snap.item_codes[hist][None]
    mask = torch.tensor([bool(history)] * len(hist))[None]
    users = torch.tensor([hash_user(user, model.cfg.user_buckets)])
    target = snap.item_codes[torch.tensor(session)][None]  # (1, m', D)
    per_level, _ = model.position_log_probs(codes, mask, users, target)  # per level (1, m', V_l)
    depth = model.cfg.depth
    return [per_level[t % depth][0, t // depth] for t in range(target.shape[1] * depth)]


def brute_force(
    model: OneRecModel, trie: TrieIndex, history: list[int], user: str, slots: int, banned: set[int]
) -> list[tuple[float, tuple[int, ...]]]:
    """Score every sequence of distinct allowed items by renormalising over allowed children at each step."""
    allowed = [i for i in range(trie.num_items) if trie.is_live(i) and i not in banned]
    scored = []
    for session in itertools.permutations(allowed, slots):
        logps = teacher_forced_logprobs(model, history, user, trie, list(session))
        total = 0.0
        for slot, item in enumerate(session):
            usable = [i for i in allowed if i not in session[:slot]]
            path = trie.path_of_item(item)
            for level in range(trie.depth):
                prefix = path[:level]
                codes = sorted({trie.path_of_item(i)[level] for i in usable if trie.path_of_item(i)[:level] == prefix})
                lp = logps[slot * trie.depth + level]
                total += float(lp[path[level]] - torch.logsumexp(lp[codes], 0))
        scored.append((total, session))
    return sorted(scored, reverse=True)


@pytest.mark.parametrize(
    ("candidates", "tie", "copy"), [(0, False, False), (3, False, False), (3, True, False), (3, True, True)]
)
def test_items_mode_equals_brute_force_when_the_beam_covers_the_catalogue(
    candidates: int, tie: bool, copy: bool
) -> None:
    model, trie = tiny_world(n_items=9, session_items=1, candidates=candidates, tie=tie, copy=copy)
    gen = Generator(model, trie)
    history = [1, 4]
    req = RecRequest(history=history, num_items=7, mode="items", beam_width=9, user_id="u1")
    (result,), stats = gen.generate([req])
    expected = brute_force(model, trie, history, "u1", 1, banned=set(history))[:7]
    assert [it.item for it in result.items] == [s[0] for _, s in expected]
    np.testing.assert_allclose([it.score for it in result.items], [v for v, _ in expected], rtol=1e-4, atol=1e-4)
    assert stats.invalid_paths == 0


@pytest.mark.parametrize("copy", [False, True])
def test_session_mode_equals_brute_force_over_ordered_pairs(copy: bool) -> None:
    """With the copy head too: the pointer's matching candidates restart with each slot's item."""
    model, trie = tiny_world(n_items=6, session_items=2, candidates=3 if copy else 0, copy=copy)
    gen = Generator(model, trie)
    history = [0]
    # 5 allowed items -> 20 ordered pairs; a beam of 20 keeps every partial sequence
    req = RecRequest(history=history, num_items=2, mode="session", beam_width=20, user_id="u2")
    beams = gen.search([req], trie.tensors, slots=2)
    got = [
        (float(s), tuple(int(i) for i in items))
        for s, items in zip(beams.scores[0], beams.items[0])
        if torch.isfinite(s)
    ]
    expected = brute_force(model, trie, history, "u2", 2, banned=set(history))
    assert [s for _, s in got] == [s for _, s in expected]
    np.testing.assert_allclose([v for v, _ in got], [v for v, _ in expected], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("seed", "candidates", "tie", "copy", "head_bias", "node_bias"),
    [
        (0, 0, False, False, False, False),
        (1, 0, False, False, False, False),
        (2, 4, False, False, False, False),
        (3, 4, True, False, False, False),
        (4, 4, True, True, False, False),
        (5, 0, False, False, True, False),
        (6, 4, True, True, True, False),
        (7, 4, False, False, False, True),
        (8, 4, True, True, True, True),
    ],
)
def test_decode_step_logits_equal_the_training_forward_at_every_position(
    seed: int, candidates: int, tie: bool, copy: bool, head_bias: bool, node_bias: bool
) -> None:
    """The two paths of ``DecoderLayer`` (every position at once, one cached position per row) agree,
    with candidate tokens in the memory too (the search gathers each request's attended positions),
    with tied code tables (the decode step's fused input table copies the shared one), with the
    heads' per-code biases (the fused head's bias is their concatenation, level by level), and with the
    trie-node biases (the search's running prefix of each row names the node the forward's target does)."""
    model, trie = tiny_world(
        n_items=12,
        session_items=3,
        seed=seed,
        candidates=candidates,
        tie=tie,
        copy=copy,
        head_bias=head_bias,
        node_bias=node_bias,
    )
    steps: list[torch.Tensor] = []
    decode_step = model.decode_step

    def recorded(*args: object, **kwargs: object) -> torch.Tensor:
        logits = decode_step(*args, **kwargs)  # type: ignore[arg-type]
        steps.append(logits.clone())
        return logits

    model.decode_step = recorded  # type: ignore[method-assign]
    history = [4, 1]
    req = RecRequest(history=history, num_items=3, mode="session", beam_width=1, user_id="u7")
    (result,), _ = Generator(model, trie).generate([req])  # one beam: one row, one path
    session = [it.item for it in result.items]
    assert len(session) == 3 and len(steps) == 3 * trie.depth
    forward = teacher_forced_logprobs(model, history, "u7", trie, session)
    for t, (step, want) in enumerate(zip(steps, forward, strict=True)):
        got = torch.log_softmax(step[0, : want.shape[0]], -1)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=5e-5, msg=f"position {t}")


@pytest.mark.parametrize("mode", ["session", "items"])
def test_returned_items_are_valid_unique_and_not_excluded(mode: str) -> None:
    model, trie = tiny_world(n_items=16, session_items=3, seed=1)
    gen = Generator(model, trie)
    # exclude every item under the first root code: the whole subtree is blocked, no beam may die in it
    first = trie.path_of_item(0)[0]
    subtree = [i for i in range(16) if trie.path_of_item(i)[0] == first]
    trie.withdraw([15])
    req = RecRequest(history=[3, 5], num_items=6, mode=mode, beam_width=8, exclude=subtree)
    (result,), stats = gen.generate([req])
    items = [it.item for it in result.items]
    assert len(items) == 6
    assert len(set(items)) == len(items)
    assert not set(items) & (set(subtree) | {3, 5, 15})
    for it in result.items:
        assert trie.item_of_path(it.semantic_id) == it.item
    assert stats.invalid_paths == 0


def test_history_is_allowed_back_when_asked() -> None:
    model, trie = tiny_world(n_items=9, session_items=1)
    gen = Generator(model, trie)
    req = RecRequest(history=list(range(8)), num_items=9, mode="items", beam_width=9, exclude_history=False)
    (result,), _ = gen.generate([req])
    assert sorted(it.item for it in result.items) == list(range(9))


@pytest.mark.parametrize(("candidates", "copy", "node_bias"), [(0, False, False), (4, False, False), (4, True, True)])
def test_same_answer_alone_and_inside_a_batch(candidates: int, copy: bool, node_bias: bool) -> None:
    model, trie = tiny_world(n_items=18, session_items=2, seed=2, candidates=candidates, copy=copy, node_bias=node_bias)
    gen = Generator(model, trie)
    target = RecRequest(history=[2], num_items=4, mode="session", beam_width=3, user_id="alone")
    others = [
        RecRequest(history=[1, 5, 7, 9, 11], num_items=5, mode="session", beam_width=8, user_id="a"),
        RecRequest(history=[], num_items=3, mode="items", beam_width=6, user_id="b", exclude=[0, 1]),
        RecRequest(history=[4, 4, 6], num_items=2, mode="session", beam_width=5, user_id="c"),
    ]
    (alone,), _ = gen.generate([target])
    batched, _ = gen.generate([others[0], target, others[1], others[2]])
    assert [it.item for it in batched[1].items] == [it.item for it in alone.items]
    np.testing.assert_allclose([it.score for it in batched[1].items], [it.score for it in alone.items], atol=1e-5)
    items_alone, _ = gen.generate([others[1]])
    assert [it.item for it in batched[2].items] == [it.item for it in items_alone[0].items]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_generator_with_candidates_answers_as_in_float32(dtype: torch.dtype) -> None:
    """CUDA serves in float16: the candidates, the copy head and the search must run in it (an H200 run
    found the candidates' scatter refusing half-precision weights) and find what float32 finds."""
    model, trie = tiny_world(n_items=18, session_items=2, seed=2, candidates=3, copy=True)
    full = Generator(model, trie)
    half = Generator(copy.deepcopy(model), trie, dtype=dtype)
    reqs = [
        RecRequest(history=[1, 5, 7], num_items=4, mode="items", beam_width=8, user_id="a"),
        RecRequest(history=[2], num_items=3, mode="session", beam_width=4, user_id="b"),
    ]
    want, _ = full.generate(reqs)
    got, _ = half.generate(reqs)
    for g, w in zip(got, want):  # bfloat16's 8-bit mantissa may swap two near scores lower down
        assert g.items[0].item == w.items[0].item
        assert sorted(it.item for it in g.items) == sorted(it.item for it in w.items)


def test_bad_requests_name_the_field() -> None:
    model, trie = tiny_world()
    gen = Generator(model, trie)
    with pytest.raises(ValueError, match="mode"):
        gen.generate([RecRequest(history=[], mode="pairs")])
    with pytest.raises(ValueError, match="beam_width"):
        gen.generate([RecRequest(history=[], beam_width=0)])
