"""Interaction data: the sequence-file parser and loader, the leave-one-out split and the synthetic world.

Everything downstream (tokenizer, training, evaluation, the demo build) works on `InteractionData`:
external string ids mapped to dense internal indices, and one chronological int64 array of item indices
per user. Keeping ids as strings matters because catalogue ids can exceed what JSON numbers hold.

The synthetic world exists for two reasons: a demo model that trains in seconds, and a ground truth
(`SyntheticWorld.true_affinity`) against which preference alignment can be measured honestly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EvalSet",
    "InteractionData",
    "SequenceFileError",
    "Split",
    "SyntheticConfig",
    "SyntheticWorld",
    "leave_one_out",
    "load_item_attributes",
    "load_item_content",
    "load_item_text",
    "load_sequence_file",
    "make_synthetic",
    "read_histories",
]


class SequenceFileError(ValueError):
    """A sequence file could not be parsed; the message names the file and the 1-based line."""

    def __init__(self, path: Path | str, line: int, reason: str) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        super().__init__(f"{path}:{line}: {reason}")


@dataclass
class InteractionData:
    """Users' chronological item sequences over a catalogue, with external ids kept as strings.

    `item_ids[i]` is the external id of internal item `i`; `sequences[u]` (int64, oldest first) belongs
    to `user_ids[u]`. `item_features`, when present, is one int64 array of attribute ids per item.
    """

    name: str
    user_ids: list[str]
    item_ids: list[str]
    sequences: list[np.ndarray]
    item_features: list[np.ndarray] | None = None

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def item_index(self) -> dict[str, int]:
        """External item id -> internal index (built on demand; the catalogue owns the live map)."""
        return {item: i for i, item in enumerate(self.item_ids)}

    def popularity(self, sequences: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """Interaction counts per item (int64, length n_items) over `sequences` (default: all)."""
        seqs = self.sequences if sequences is None else sequences
        flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]) if len(seqs) else np.zeros(0)
        return np.bincount(flat.astype(np.int64), minlength=self.n_items).astype(np.int64)

    def summary(self) -> dict[str, object]:
        """Counts for logs and manifests."""
        lengths = np.array([len(s) for s in self.sequences], dtype=np.int64)
        return {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": int(lengths.sum()),
            "mean_sequence_length": float(lengths.mean()) if len(lengths) else 0.0,
        }


def _sorted_ids(first_seen: dict[str, int]) -> list[str]:
    """Ids in a stable, human-friendly order: numerically when every id is an integer, else lexically."""
    ids = list(first_seen)
    if all(i.isdigit() for i in ids):
        return sorted(ids, key=int)
    return sorted(ids)


def read_histories(path: Path | str, *, strict: bool = True) -> dict[str, list[str]]:
    """Read `user item item ...` lines (chronological, whitespace separated): user id -> item ids.

    The one parser of sequence files, for the offline pipeline and the service's feature preload.
    Blank lines are skipped; bytes that are not UTF-8 always raise SequenceFileError naming the file
    and line. ``strict`` (the offline pipeline) also refuses a line with a user but no items, a user
    that appears twice and a file with no sequences: silently dropping or merging lines would shift
    an evaluation without anyone noticing. Lenient (``strict=False``, the service's preload, where a
    file may be an event log) skips a user without items and appends a repeated user's items to
    what that user already has, in file order.
    """
    path = Path(path)
    histories: dict[str, list[str]] = {}
    user_line: dict[str, int] = {}
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                tokens = raw.decode("utf-8").split()
            except UnicodeDecodeError as exc:
                raise SequenceFileError(path, line_no, f"not UTF-8 text ({exc.reason})") from None
            if not tokens:
                continue
            user = tokens[0]
            if strict and len(tokens) < 2:
                reason = f"user {user!r} has no items (want 'user item item ...')"
                raise SequenceFileError(path, line_no, reason)
            if strict and user in user_line:
                reason = f"user {user!r} already appeared on line {user_line[user]}"
                raise SequenceFileError(path, line_no, reason)
            if len(tokens) < 2:
                continue
            user_line.setdefault(user, line_no)
            histories.setdefault(user, []).extend(tokens[1:])
    if strict and not histories:
        raise SequenceFileError(path, 0, "file holds no sequences")
    return histories


def load_sequence_file(path: Path | str, name: str | None = None) -> InteractionData:
    """A sequence file (read strictly, see ``read_histories``) as InteractionData.

    Items are indexed in numeric order of their ids when all ids are integers (so Beauty's item "1"
    is index 0), lexical order otherwise.
    """
    path = Path(path)
    histories = read_histories(path, strict=True)
    first_seen: dict[str, int] = {}
    raw_seqs = [[first_seen.setdefault(t, len(first_seen)) for t in items] for items in histories.values()]
    item_ids = _sorted_ids(first_seen)
    remap = np.empty(len(item_ids), dtype=np.int64)
    order = {item: i for i, item in enumerate(item_ids)}
    for item, seen_index in first_seen.items():
        remap[seen_index] = order[item]
    lengths = np.fromiter((len(s) for s in raw_seqs), dtype=np.int64, count=len(raw_seqs))
    flat = remap[np.fromiter((i for s in raw_seqs for i in s), dtype=np.int64, count=int(lengths.sum()))]
    sequences = np.split(flat, np.cumsum(lengths)[:-1])
    return InteractionData(
        name=name or path.parent.name or path.stem,
        user_ids=list(histories),
        item_ids=item_ids,
        sequences=sequences,
    )


def load_item_attributes(path: Path | str, item_ids: Sequence[str]) -> list[np.ndarray]:
    """Read `{item_id: [attribute_id, ...]}` JSON (Beauty's item2attributes.json) aligned to `item_ids`.

    Items missing from the file get an empty array; attribute ids are kept as given (ints).
    """
    with Path(path).open(encoding="utf-8") as handle:
        table = json.load(handle)
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a JSON object of item id -> attribute ids")
    return [np.asarray(table.get(item, []), dtype=np.int64) for item in item_ids]


def load_item_text(path: Path | str, item_ids: Sequence[str]) -> list[str]:
    """Read `item_id<TAB>...<TAB>text` lines (Beauty's item_text.tsv; the last column is the text)
    aligned to `item_ids`. A first line whose id is not a catalogue item is taken as a header; items
    missing from the file get an empty string."""
    known = set(item_ids)
    text: dict[str, str] = {}
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 2 and parts[0] in known:
                text[parts[0]] = parts[-1]
    return [text.get(item, "") for item in item_ids]


CONTENT_FILES = ("item2attributes.json", "item_text.tsv")


def load_item_content(sequence_path: Path | str, item_ids: Sequence[str]) -> tuple[list[list[str]], list[str]] | None:
    """Content tokens per item from the optional files beside a sequence file, or None when there are none.

    `item2attributes.json` gives tokens `a:<attribute id>`, `item_text.tsv` gives `w:<word>` per
    lowercase word of the text. Returns (tokens per item aligned to `item_ids`, the files used).
    """
    folder = Path(sequence_path).parent
    tokens: list[list[str]] = [[] for _ in item_ids]
    used: list[str] = []
    attributes = folder / CONTENT_FILES[0]
    if attributes.is_file():
        for row, attrs in zip(tokens, load_item_attributes(attributes, item_ids)):
            row.extend(f"a:{int(a)}" for a in attrs)
        used.append(attributes.name)
    text = folder / CONTENT_FILES[1]
    if text.is_file():
        for row, words in zip(tokens, load_item_text(text, item_ids)):
            row.extend(f"w:{w}" for w in words.lower().split())
        used.append(text.name)
    if not used or not any(tokens):
        return None
    return tokens, used


# --------------------------------------------------------------------------------------------------
# Leave-one-out split
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """Evaluation rows: user `users[j]` saw `histories[j]` (oldest first) and then `targets[j]`."""

    users: np.ndarray
    histories: list[np.ndarray]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def truncated(self, history_window: int) -> list[np.ndarray]:
        """The histories cut to their newest `history_window` items (what the model's encoder reads)."""
        return [h[-history_window:] for h in self.histories]


@dataclass
class Split:
    """Leave-one-out split (TIGER protocol): last item test, second-to-last validation, rest training.

    `train[u]` is user u's training sequence (seq[:-2], or the whole sequence for users with fewer than
    three items, which appear in training only). `valid` and `test` hold the evaluation rows.
    """

    train: list[np.ndarray]
    valid: EvalSet
    test: EvalSet
    n_items: int

    def eval_set(self, name: str) -> EvalSet:
        """`valid` or `test` by name (the CLI's --split)."""
        if name not in ("valid", "test"):
            raise ValueError(f"unknown split {name!r}: want 'valid' or 'test'")
        return self.valid if name == "valid" else self.test

    def train_popularity(self) -> np.ndarray:
        """Training interaction counts per item: the most-popular baseline and the fallback ranking."""
        if not self.train:
            return np.zeros(self.n_items, dtype=np.int64)
        return np.bincount(np.concatenate(self.train), minlength=self.n_items).astype(np.int64)


def leave_one_out(data: InteractionData) -> Split:
    """Split every user's sequence leave-one-out; users with fewer than 3 items only train."""
    train: list[np.ndarray] = []
    eval_users: list[int] = []
    for user, seq in enumerate(data.sequences):
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq) >= 3:
            train.append(seq[:-2])
            eval_users.append(user)
        else:
            train.append(seq)
    users = np.asarray(eval_users, dtype=np.int64)
    seqs = [np.asarray(data.sequences[u], dtype=np.int64) for u in eval_users]
    valid = EvalSet(
        users=users, histories=[s[:-2] for s in seqs], targets=np.asarray([s[-2] for s in seqs], dtype=np.int64)
    )
    test = EvalSet(
        users=users.copy(), histories=[s[:-1] for s in seqs], targets=np.asarray([s[-1] for s in seqs], dtype=np.int64)
    )
    return Split(train=train, valid=valid, test=test, n_items=data.n_items)


# --------------------------------------------------------------------------------------------------
# Synthetic world
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic world. The defaults give the small demo world (trains in seconds).

    Items belong to one of `n_topics` topics and have a Zipf popularity. Within a topic the items lie on
    a ring; from an item a session moves to one of its next `n_successors` ring neighbours (sparse,
    strongly sequential transitions), and after about `mean_session_length` items it switches topic,
    drawn from the user's Dirichlet(`interest_concentration`) interest mixture. `popularity_bias` in
    [0, 1] tilts successor choice towards popular items.
    """

    n_users: int = 600
    n_items: int = 400
    n_topics: int = 20
    min_sequence_length: int = 8
    max_sequence_length: int = 24
    mean_session_length: float = 6.0
    n_successors: int = 3
    interest_concentration: float = 0.3
    popularity_exponent: float = 0.8
    popularity_bias: float = 0.3
    seed: int = 0

    def validate(self) -> None:
        """Reject configurations the generator cannot honour, with the reason."""
        if self.n_users < 1 or self.n_items < 2 or self.n_topics < 1:
            raise ValueError("need n_users >= 1, n_items >= 2 and n_topics >= 1")
        if self.n_topics > self.n_items // 2:
            raise ValueError(f"n_topics={self.n_topics} needs n_items >= {2 * self.n_topics}")
        if not 1 <= self.min_sequence_length <= self.max_sequence_length:
            raise ValueError("need 1 <= min_sequence_length <= max_sequence_length")
        if self.max_sequence_length > self.n_items:
            raise ValueError("max_sequence_length cannot exceed n_items (sequences never repeat an item)")
        if self.mean_session_length < 1.0:
            raise ValueError("mean_session_length must be >= 1")
        if self.n_successors < 1 or self.interest_concentration <= 0.0:
            raise ValueError("need n_successors >= 1 and interest_concentration > 0")
        if not 0.0 <= self.popularity_bias <= 1.0:
            raise ValueError("popularity_bias must lie in [0, 1]")

    def as_dict(self) -> dict[str, Any]:
        """For the manifest: `SyntheticConfig(**d)` regenerates the same world."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class SyntheticWorld:
    """A generated dataset together with the latent structure that produced it.

    `item_topic[i]` and `item_popularity[i]` (sums to 1 within each topic) describe items;
    `user_interests[u]` is the user's topic mixture; `successors[i]`/`successor_probs[i]` the sparse
    within-topic transition graph. `true_affinity` is the ground-truth user-item preference.
    """

    config: SyntheticConfig
    data: InteractionData
    item_topic: np.ndarray
    item_popularity: np.ndarray
    user_interests: np.ndarray
    successors: np.ndarray
    successor_probs: np.ndarray
    topic_items: list[np.ndarray] = field(repr=False)

    def true_affinity(self, users: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """P(a fresh session of user u opens with item i) for each requested user: (len(users), n_items).

        It is interest[u, topic(i)] * popularity of i within its topic, so each row sums to 1. The
        reward model never sees it; evaluation of preference alignment scores generated items with it.
        """
        rows = np.arange(self.config.n_users) if users is None else np.asarray(users, dtype=np.int64)
        return self.user_interests[rows][:, self.item_topic] * self.item_popularity[None, :]

    def next_item_probs(self, user: int, last_item: int) -> np.ndarray:
        """The generator's true distribution of the item after `last_item` (ignoring the no-repeat rule)."""
        switch = 1.0 / self.config.mean_session_length
        probs = switch * self.true_affinity([user])[0]
        probs[self.successors[last_item]] += (1.0 - switch) * self.successor_probs[last_item]
        return probs


def _zipf_popularity(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Zipf weights 1/rank^s over a random ranking of `n` items (unnormalised)."""
    ranks = rng.permutation(n) + 1
    return 1.0 / ranks.astype(np.float64) ** exponent


def _transition_graph(
    rng: np.random.Generator, topic_items: list[np.ndarray], popularity: np.ndarray, cfg: SyntheticConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Each item's next `n_successors` ring neighbours within its topic and their probabilities.

    Probabilities decay with ring distance (so the immediate neighbour dominates and the next item is
    predictable from the last one) and are tilted towards popular items by `popularity_bias`.
    """
    n_succ = cfg.n_successors
    successors = np.zeros((cfg.n_items, n_succ), dtype=np.int64)
    probs = np.zeros((cfg.n_items, n_succ), dtype=np.float64)
    decay = 0.45 ** np.arange(n_succ)
    for items in topic_items:
        size = len(items)
        for pos, item in enumerate(items):
            nxt = items[(pos + 1 + np.arange(n_succ)) % size]
            weights = decay * rng.uniform(0.7, 1.3, size=n_succ) * popularity[nxt] ** cfg.popularity_bias
            if size <= n_succ:  # tiny topic: neighbours wrap onto the item itself; give those no mass
                weights[nxt == item] = 0.0
            successors[item] = nxt
            probs[item] = weights / weights.sum()
    return successors, probs


def _draw_sequence(rng: np.random.Generator, world: SyntheticWorld, user: int, length: int) -> np.ndarray:
    """One user's chronological sequence: topic sessions walking the transition graph, no repeats."""
    cfg = world.config
    switch_prob = 1.0 / cfg.mean_session_length
    seen = np.zeros(cfg.n_items, dtype=bool)
    out: list[int] = []
    last = -1
    while len(out) < length:
        item = -1
        if last >= 0 and rng.random() >= switch_prob:
            succ, p = world.successors[last], world.successor_probs[last].copy()
            p[seen[succ]] = 0.0
            if p.sum() > 0:
                item = int(succ[rng.choice(len(succ), p=p / p.sum())])
        if item < 0:  # a new session: topic from the user's interests, item by popularity in the topic
            item = _fresh_session_item(rng, world, user, seen)
        seen[item] = True
        out.append(item)
        last = item
    return np.asarray(out, dtype=np.int64)


def _fresh_session_item(rng: np.random.Generator, world: SyntheticWorld, user: int, seen: np.ndarray) -> int:
    """Draw an unseen item from the user's true affinity (topic mixture x in-topic popularity)."""
    affinity = world.true_affinity([user])[0]
    affinity[seen] = 0.0
    total = affinity.sum()
    if total <= 0:  # the user's topics are exhausted: any unseen item, by popularity
        affinity = np.where(seen, 0.0, world.item_popularity)
        total = affinity.sum()
    return int(rng.choice(len(affinity), p=affinity / total))


def make_synthetic(cfg: SyntheticConfig | None = None) -> SyntheticWorld:
    """Generate the synthetic world for `cfg` (deterministic for `cfg.seed`)."""
    cfg = cfg or SyntheticConfig()
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    item_topic = rng.permutation(np.arange(cfg.n_items) % cfg.n_topics).astype(np.int64)
    topic_items = [rng.permutation(np.flatnonzero(item_topic == t)) for t in range(cfg.n_topics)]
    raw_pop = _zipf_popularity(rng, cfg.n_items, cfg.popularity_exponent)
    topic_mass = np.bincount(item_topic, weights=raw_pop, minlength=cfg.n_topics)
    item_popularity = raw_pop / topic_mass[item_topic]
    user_interests = rng.dirichlet(np.full(cfg.n_topics, cfg.interest_concentration), size=cfg.n_users)
    successors, successor_probs = _transition_graph(rng, topic_items, raw_pop, cfg)
    lengths = rng.integers(cfg.min_sequence_length, cfg.max_sequence_length + 1, size=cfg.n_users)
    data = InteractionData(
        name=f"synthetic-{cfg.seed}",
        user_ids=[f"u{u}" for u in range(cfg.n_users)],
        item_ids=[str(i) for i in range(cfg.n_items)],
        sequences=[],
        item_features=[np.asarray([t], dtype=np.int64) for t in item_topic],
    )
    world = SyntheticWorld(
        config=cfg,
        data=data,
        item_topic=item_topic,
        item_popularity=item_popularity,
        user_interests=user_interests,
        successors=successors,
        successor_probs=successor_probs,
        topic_items=topic_items,
    )
    data.sequences = [_draw_sequence(rng, world, u, int(lengths[u])) for u in range(cfg.n_users)]
    return world
