"""StepSearch: requests join and leave between decode steps without changing anyone's answer.

The acceptance test of step-level continuous batching is batch invariance: a request gets the same
items (exactly) and the same scores (allclose) when it runs alone, in a static batch, and when it
joins mid-way while requests of both modes and other beam widths are running.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onerec.generate import Generator, RecRequest, RecResult, StepSearch
from tests.test_generator import tiny_world

torch.set_num_threads(1)

SIZES = [4, 4, 3]
N_ITEMS = 30
SESSION = 3


def small_world(seed: int = 0, copy: bool = False) -> Generator:
    """A demo-shaped model small enough for many searches per test; sharp weights, so no near-ties.
    With ``copy``: co-occurrence candidates in the memory and the copy head pointing at them."""
    world = tiny_world(N_ITEMS, SESSION, seed, sizes=SIZES, history_window=8, candidates=5 if copy else 0, copy=copy)
    return Generator(*world)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "copy-head"])
def gen(request: pytest.FixtureRequest) -> Generator:
    return small_world(copy=request.param)


def drain(search: StepSearch, out: dict[int, RecResult], max_steps: int = 200) -> None:
    for _ in range(max_steps):
        if not len(search):
            return
        out.update(search.step())
    raise AssertionError("search did not finish")


def alone(gen: Generator, req: RecRequest) -> RecResult:
    search = StepSearch(gen)
    search.add(0, req)
    out: dict[int, RecResult] = {}
    drain(search, out)
    return out[0]


def staggered(gen: Generator, schedule: list[tuple[int, RecRequest]]) -> dict[int, RecResult]:
    """Add request i before step ``schedule[i][0]`` (counting steps from 0); run until all finish."""
    search = StepSearch(gen)
    out: dict[int, RecResult] = {}
    step = 0
    pending = sorted(enumerate(schedule), key=lambda e: e[1][0])
    while pending or len(search):
        while pending and pending[0][1][0] <= step:
            key, (_, req) = pending.pop(0)
            search.add(key, req)
        out.update(search.step())
        step += 1
        assert step < 500
    return out


def assert_same(got: RecResult, want: RecResult) -> None:
    assert [it.item for it in got.items] == [it.item for it in want.items]
    assert [it.semantic_id for it in got.items] == [it.semantic_id for it in want.items]
    np.testing.assert_allclose([it.score for it in got.items], [it.score for it in want.items], rtol=1e-4, atol=1e-4)


MIX = [
    RecRequest(history=[1, 5, 7, 9, 11, 13, 2], num_items=5, mode="session", beam_width=8, user_id="a"),
    RecRequest(history=[], num_items=3, mode="items", beam_width=6, user_id="b", exclude=[0, 1]),
    RecRequest(history=[4, 4, 6], num_items=2, mode="session", beam_width=5, user_id="c"),
    RecRequest(history=[3], num_items=4, mode="items", beam_width=4, user_id="d", exclude_history=False),
]


@pytest.mark.parametrize("mode,width", [("session", 3), ("items", 6), ("session", 8)])
@pytest.mark.parametrize("join_at", [0, 1, 3, 5])
def test_same_answer_alone_static_and_joining_midway(gen: Generator, mode: str, width: int, join_at: int) -> None:
    target = RecRequest(history=[2, 17, 8], num_items=4, mode=mode, beam_width=width, user_id="target")
    want = alone(gen, target)
    assert len(want.items) == 4
    static, _ = gen.generate([MIX[0], target, MIX[1], MIX[2], MIX[3]])
    assert_same(static[1], want)
    # the others run from step 0 (and one joins after the target); the target joins at join_at
    schedule = [(0, MIX[0]), (0, MIX[1]), (join_at, target), (0, MIX[2]), (join_at + 2, MIX[3])]
    out = staggered(gen, schedule)
    assert_same(out[2], want)
    for key, (_, req) in enumerate(schedule):  # nobody else's answer moved either
        assert_same(out[key], alone(gen, req))


request_strategy = st.builds(
    RecRequest,
    history=st.lists(st.integers(0, N_ITEMS - 1), max_size=9),
    num_items=st.integers(1, 6),
    mode=st.sampled_from(["session", "items"]),
    beam_width=st.integers(1, 7),
    exclude=st.lists(st.integers(0, N_ITEMS - 1), max_size=4),
    exclude_history=st.booleans(),
    user_id=st.sampled_from(["", "u1", "u2", "u3"]),
)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    schedule=st.lists(st.tuples(st.integers(0, 10), request_strategy), min_size=1, max_size=5),
)
def test_batch_invariance_over_random_schedules(gen: Generator, schedule: list[tuple[int, RecRequest]]) -> None:
    wants = [alone(gen, req) for _, req in schedule]
    out = staggered(gen, schedule)
    static, stats = gen.generate([req for _, req in schedule])
    for key, want in enumerate(wants):
        assert_same(out[key], want)
        assert_same(static[key], want)
    assert stats.invalid_paths == 0


def test_remove_frees_rows_and_leaves_the_others_alone(gen: Generator) -> None:
    search = StepSearch(gen)
    search.add(7, MIX[0])
    search.add(8, MIX[1])
    assert (len(search), search.rows) == (2, 8 + 6)
    out: dict[int, RecResult] = {}
    out.update(search.step())
    out.update(search.step())
    assert search.remove(7) is True
    assert search.remove(7) is False
    assert search.remove(12345) is False
    assert (len(search), search.rows) == (1, 6)
    drain(search, out)
    assert 7 not in out
    assert_same(out[8], alone(gen, MIX[1]))
    assert search.stats.removed == 1
    # the removed request's rows are gone from the row state
    assert search._scores.shape[0] == 0 or all(job.key != 7 for job in search._order)


def test_removing_a_pending_request_never_steps_it(gen: Generator) -> None:
    search = StepSearch(gen)
    search.add(1, MIX[1])
    assert search.remove(1)
    assert len(search) == 0 and search.rows == 0
    assert search.step() == []
    assert search.stats.steps == 0


def test_cost_rows_and_length(gen: Generator) -> None:
    search = StepSearch(gen)
    depth = len(SIZES)
    assert search.cost(RecRequest(history=[], mode="items", beam_width=4, num_items=9)) == (9, depth)
    assert search.cost(RecRequest(history=[], mode="session", beam_width=4)) == (4, SESSION * depth)
    search.add(0, RecRequest(history=[1], mode="items", beam_width=4, num_items=2))
    search.add(1, RecRequest(history=[1], mode="session", beam_width=3, num_items=2))
    assert (len(search), search.rows) == (2, 7)
    finished_at = {}
    for step in range(SESSION * depth):
        for key, _ in search.step():
            finished_at[key] = step
    assert finished_at == {0: depth - 1, 1: SESSION * depth - 1}
    assert len(search) == 0 and search.rows == 0
    assert search.stats.steps == SESSION * depth
    assert search.stats.rows_stepped == depth * 7 + (SESSION - 1) * depth * 3


def test_bad_requests_name_the_field(gen: Generator) -> None:
    search = StepSearch(gen)
    with pytest.raises(ValueError, match="mode"):
        search.add(0, RecRequest(history=[], mode="pairs"))
    with pytest.raises(ValueError, match="beam_width"):
        search.add(0, RecRequest(history=[], beam_width=0))
    with pytest.raises(ValueError, match="num_items"):
        search.add(0, RecRequest(history=[], num_items=0))
    search.add(0, RecRequest(history=[]))
    with pytest.raises(ValueError, match="key"):
        search.add(0, RecRequest(history=[]))
    assert len(search) == 1


def test_memory_kv_is_per_request_not_per_beam(gen: Generator) -> None:
    search = StepSearch(gen)
    search.add(0, RecRequest(history=[1, 2, 3], mode="items", beam_width=7, num_items=3))
    search.add(1, RecRequest(history=[4], mode="items", beam_width=7, num_items=3))
    search.add(2, RecRequest(history=[5, 6], mode="session", beam_width=2, num_items=3))
    search.step()
    by_width = {g.width: g for g in search._groups}
    assert set(by_width) == {2, 7}
    assert by_width[7].kv.shape[2] == 2  # (layers, 2, Q_w, H, S, dh): two requests, not 14 beams
    # padded to the longest history (+ the user column, + its candidates in the copy-head world: 5 here)
    assert by_width[7].kv.shape[4] == 4 + gen.cfg.candidate_tokens
    assert by_width[2].kv.shape[2] == 1
    lens = [search._keys[key].mem_len for key in (0, 1)]  # user + history (+ that request's candidates)
    assert lens[0] == by_width[7].kv.shape[4] and 2 <= lens[1] <= 2 + gen.cfg.candidate_tokens
    assert by_width[7].mask[:, 0, 0].tolist() == [[i < n for i in range(lens[0])] for n in lens]


def test_withdrawal_between_steps_takes_effect_at_once(gen: Generator) -> None:
    req = RecRequest(history=[0, 1], num_items=4, mode="session", beam_width=4, user_id="w")
    before = alone(gen, req)
    gone = [it.item for it in before.items[:2]]
    search = StepSearch(gen)
    search.add(0, req)
    out: dict[int, RecResult] = {}
    out.update(search.step())  # the first item is not complete yet (depth 3)
    try:
        gen.trie.withdraw(gone)
        drain(search, out)
    finally:
        for item in gone:
            gen.trie.add(gen.trie.path_of_item(item))
    got = [it.item for it in out[0].items]
    assert len(got) == 4 and not set(got) & set(gone)
    assert search.stats.invalid_paths == 0


def test_short_sessions_are_topped_up_inside_the_search(gen: Generator) -> None:
    """Beam width 1 per 3 items: overlapping beams leave sessions short, an items search fills them."""
    reqs = [RecRequest(history=[h], num_items=6, mode="session", beam_width=1, user_id=f"t{h}") for h in range(8)]
    topped = 0
    for key, req in enumerate(reqs):
        search = StepSearch(gen)
        search.add(key, req)
        out: dict[int, RecResult] = {}
        drain(search, out)
        items = [it.item for it in out[key].items]
        assert len(items) == 6 and len(set(items)) == 6 and not set(items) & set(req.history)
        topped += search.stats.steps > SESSION * len(SIZES)
        # and the topped-up answer is batch-invariant too
        assert_same(staggered(gen, [(0, MIX[0]), (2, req), (4, MIX[1])])[1], out[key])
    assert topped > 0


def test_generate_and_search_run_on_step_search(gen: Generator) -> None:
    results, stats = gen.generate(MIX)
    for got, req in zip(results, MIX):
        assert_same(got, alone(gen, req))
    assert stats.rows >= sum(gen._width(r) for r in MIX)  # and any session top-up's rows
    assert stats.rows_stepped >= stats.rows * len(SIZES)
    assert stats.invalid_paths == 0 and stats.decode_seconds > 0 and stats.encode_seconds > 0
    beams = gen.search(MIX, gen.trie.tensors, slots=SESSION)
    assert beams.scores.shape == (4, 8) and beams.items.shape == (4, 8, SESSION)
    assert torch.isinf(beams.scores[1, 6:]).all()  # padding past the request's own width


def test_fused_weights_follow_in_place_changes(gen: Generator) -> None:
    model = small_world(seed=3).model
    g = Generator(model, gen.trie)
    req = RecRequest(history=[1, 2], num_items=3, mode="items", beam_width=3)
    first = alone(g, req)
    with torch.no_grad():
        for layer in model.decoder:
            layer.self_attn.kv.weight.mul_(-1.5)
            layer.cross_attn.kv.weight.mul_(0.5)
        model.dec_pos.weight.mul_(2.0)
    after = alone(g, req)
    fresh = alone(Generator(model, gen.trie), req)
    assert_same(after, fresh)
    assert [it.score for it in after.items] != [it.score for it in first.items]


def test_catalogue_additions_between_steps_are_read_at_the_next_step() -> None:
    g = small_world(seed=4)
    taken = {tuple(g.trie.path_of_item(i)) for i in range(N_ITEMS)}
    free = next(p for p in itertools.product(*[range(s) for s in SIZES]) if p not in taken)
    req = RecRequest(history=[3, 4], num_items=N_ITEMS, mode="items", beam_width=N_ITEMS + 1, user_id="new")
    search = StepSearch(g)
    search.add(0, req)
    new_item = g.trie.add(free)  # after add(), before the first step: the search must see it
    out: dict[int, RecResult] = {}
    drain(search, out)
    assert new_item in [it.item for it in out[0].items]  # the beam covers the catalogue
    assert_same(out[0], alone(g, req))
    # and one added mid-way (new nodes appended, ids of the old ones unchanged) keeps the search valid
    search = StepSearch(g)
    search.add(0, RecRequest(history=[1], num_items=4, mode="session", beam_width=4))
    search.step()
    g.trie.add(next(p for p in itertools.product(*[range(s) for s in SIZES]) if p not in taken and p != free))
    drain(search, out)
    assert len(out[0].items) == 4 and search.stats.invalid_paths == 0
    for it in out[0].items:
        assert g.trie.item_of_path(it.semantic_id) == it.item
