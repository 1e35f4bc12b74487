"""Sequence-file loader, leave-one-out split and the synthetic world."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from onerec.data import (
    InteractionData,
    SequenceFileError,
    SyntheticConfig,
    leave_one_out,
    load_sequence_file,
    make_synthetic,
    read_histories,
)

BEAUTY = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-beauty" / "sequences.txt"
SMALL_WORLD = SyntheticConfig(
    n_users=120, n_items=80, n_topics=8, min_sequence_length=4, max_sequence_length=12, seed=7
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sequences.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_loader_maps_ids_and_keeps_order(tmp_path: Path) -> None:
    path = write(tmp_path, "u1 10 2 33\n\nu2 2 10\nu3 7\n")
    data = load_sequence_file(path)
    assert data.user_ids == ["u1", "u2", "u3"]
    assert data.item_ids == ["2", "7", "10", "33"]  # numeric order when every id is an integer
    decoded = [[data.item_ids[i] for i in seq] for seq in data.sequences]
    assert decoded == [["10", "2", "33"], ["2", "10"], ["7"]]
    assert all(seq.dtype == np.int64 for seq in data.sequences)
    assert data.n_interactions == 6


def test_loader_non_numeric_ids_sort_lexically(tmp_path: Path) -> None:
    data = load_sequence_file(write(tmp_path, "a x10 b\nb x2 x10\n"))
    assert data.item_ids == ["b", "x10", "x2"]


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("u1 1 2\nu2\nu3 4\n", 2, "has no items"),
        ("u1 1 2\nu3 4\nu1 5 6\n", 3, "already appeared on line 1"),
    ],
)
def test_loader_bad_line_names_file_and_line(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SequenceFileError) as info:
        load_sequence_file(path)
    assert info.value.line == line
    assert f"{path}:{line}:" in str(info.value)
    assert fragment in str(info.value)


def test_loader_rejects_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"u1 1 2\nu2 \xff\xfe 3\n")
    with pytest.raises(SequenceFileError, match=r"bad\.txt:2:"):
        load_sequence_file(path)


def test_lenient_reading_merges_repeated_users_and_skips_users_without_items(tmp_path: Path) -> None:
    path = write(tmp_path, "u1 1 2\nu2\n\nu3 4\nu1 5 6\n")
    assert read_histories(path, strict=False) == {"u1": ["1", "2", "5", "6"], "u3": ["4"]}
    with pytest.raises(SequenceFileError, match="has no items"):
        read_histories(path)  # strict is the default: the same file is refused


def test_lenient_reading_takes_an_empty_file_and_strict_does_not(tmp_path: Path) -> None:
    path = write(tmp_path, "\n\n")
    assert read_histories(path, strict=False) == {}
    with pytest.raises(SequenceFileError, match="holds no sequences"):
        read_histories(path, strict=True)


@pytest.mark.parametrize("strict", [True, False])
def test_both_readings_name_the_file_and_line_of_bytes_that_are_not_utf8(tmp_path: Path, strict: bool) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"u1 1 2\nu2 \xff\xfe 3\n")
    with pytest.raises(SequenceFileError, match=r"bad\.txt:2: not UTF-8"):
        read_histories(path, strict=strict)


def test_leave_one_out_split() -> None:
    seqs = [np.array([5, 6, 7, 8]), np.array([1, 2]), np.array([3, 4, 0])]
    data = InteractionData("t", ["a", "b", "c"], [str(i) for i in range(9)], seqs)
    split = leave_one_out(data)
    assert [s.tolist() for s in split.train] == [[5, 6], [1, 2], [3]]
    assert split.test.users.tolist() == [0, 2]  # user b (2 items) trains only
    assert split.test.targets.tolist() == [8, 0]
    assert [h.tolist() for h in split.test.histories] == [[5, 6, 7], [3, 4]]
    assert split.valid.targets.tolist() == [7, 4]
    assert [h.tolist() for h in split.valid.histories] == [[5, 6], [3]]
    assert split.eval_set("valid") is split.valid
    assert split.test.truncated(1)[0].tolist() == [7]
    assert split.train_popularity()[[1, 2, 3, 5, 8]].tolist() == [1, 1, 1, 1, 0]


def test_synthetic_is_deterministic_for_a_seed() -> None:
    first, again = make_synthetic(SMALL_WORLD), make_synthetic(SMALL_WORLD)
    other = make_synthetic(dataclasses.replace(SMALL_WORLD, seed=8))
    assert len(first.data.sequences) == SMALL_WORLD.n_users

    def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
        return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))

    assert same(first.data.sequences, again.data.sequences)
    assert np.array_equal(first.true_affinity(), again.true_affinity())
    assert not same(first.data.sequences, other.data.sequences)


def test_synthetic_world_shape_and_ground_truth() -> None:
    world = make_synthetic(SMALL_WORLD)
    lengths = [len(s) for s in world.data.sequences]
    assert min(lengths) >= SMALL_WORLD.min_sequence_length and max(lengths) <= SMALL_WORLD.max_sequence_length
    assert all(len(np.unique(s)) == len(s) for s in world.data.sequences)  # no repeats within a user
    affinity = world.true_affinity([0, 5])
    assert affinity.shape == (2, SMALL_WORLD.n_items)
    np.testing.assert_allclose(affinity.sum(axis=1), 1.0)
    # Sessions walk the transition graph: most consecutive pairs are graph edges.
    pairs = np.concatenate([np.stack([s[:-1], s[1:]], axis=1) for s in world.data.sequences])
    on_graph = (world.successors[pairs[:, 0]] == pairs[:, 1:2]).any(axis=1).mean()
    assert on_graph > 0.6


def test_synthetic_next_item_beats_popularity() -> None:
    """The sequential signal is real: the true last-item transition ranks targets far above popularity."""
    world = make_synthetic(SMALL_WORLD)
    split = leave_one_out(world.data)
    popular = np.argsort(-split.train_popularity(), kind="stable")
    pop_hits = markov_hits = 0
    for user, history, target in zip(split.test.users, split.test.histories, split.test.targets, strict=True):
        pop_hits += target in [i for i in popular if i not in set(history)][:10]
        probs = world.next_item_probs(int(user), int(history[-1]))
        probs[history] = -1.0
        markov_hits += target in np.argsort(-probs, kind="stable")[:10]
    assert markov_hits >= 2 * max(pop_hits, 1)


def test_synthetic_config_validation() -> None:
    with pytest.raises(ValueError):
        make_synthetic(SyntheticConfig(n_items=10, n_topics=8))


@pytest.mark.skipif(not BEAUTY.exists(), reason="shared Beauty data not present")
def test_loads_beauty_when_present() -> None:
    data = load_sequence_file(BEAUTY)
    assert (data.n_users, data.n_items, data.n_interactions) == (22363, 12101, 198502)
    assert data.item_ids[0] == "1"
