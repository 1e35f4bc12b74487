"""Trie-constrained beam search over (request, beam) rows, with rows joining and leaving between steps.

``StepSearch`` is the one search: serving adds requests to it between decode steps (iteration-level
scheduling, as Orca and vLLM do), and ``Generator.generate`` / ``Generator.search`` add a whole batch
and step until it is done. A request is encoded once (its cross-attention K/V shared by its beams);
each step then decodes one position for every live row, whatever the row's request, mode, beam width
or position. Each step is one ``kernels.trie_topk`` call, which only ever looks at the children of
each row's trie node and renormalises the log-softmax over the allowed ones, so constraints shape the
search instead of filtering its output (the answer still has ``num_items`` items).

Bans are sorted keys ``group * num_nodes + node`` (see ``kernels.trie_topk``); every row has three
groups: 0 = nodes with no live item (withdrawn), 1+q = request q's exclusions and own history,
1+Q+r = items row r has already put in its session. A ban covers an inner node as soon as every live
item under it is banned, so no beam walks into a dead end.

Batch invariance: a request's rows meet other rows only in row-wise ops; its memory is padded to the
longest history of its beam-width group with masked keys, and per-request top-B sees only its own
beams' candidates, so a request gets the same items alone, in a batch, or joining one mid-way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal, get_args

import numpy as np
import torch

from kernels.trie_topk import trie_topk
from onerec.model import CandidateCopy, CopyRows, CrossGroup, DecodeWeights, OneRecModel, StepBatch, hash_user
from onerec.trie import TrieIndex, TrieTensors

# The request modes: "session" (m items per beam, a slate) and "items" (point-wise). The one
# definition: the service's request schema and engine messages import it; the load tester, which may
# not import the model, keeps a copy that tests/test_wire_contract.py holds to this one.
Mode = Literal["session", "items"]
MODES: tuple[Mode, ...] = get_args(Mode)


def request_cost(mode: str, beam_width: int, num_items: int, session_items: int, depth: int) -> tuple[int, int]:
    """(rows, decode steps) of a request: the one width rule, shared by the search and admission.

    Items mode needs a beam per returned item; a session needs at least enough beams to fill
    ``num_items``, and ``session_items * depth`` steps (a top-up of a short session is not counted).
    """
    if mode == "items":
        return max(beam_width, num_items), depth
    return max(beam_width, -(-num_items // session_items)), session_items * depth


@dataclass(frozen=True)
class RecRequest:
    history: Sequence[int]  # internal item indices, newest last (unknown ids already dropped)
    num_items: int = 10
    mode: Mode = "session"
    beam_width: int = 32
    exclude: Sequence[int] = ()  # internal item indices
    exclude_history: bool = True
    user_id: str = ""


@dataclass(frozen=True)
class RecItem:
    item: int
    score: float
    semantic_id: tuple[int, ...]


@dataclass
class RecResult:
    items: list[RecItem]


@dataclass
class BatchStats:
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0
    rows: int = 0
    invalid_paths: int = 0  # returned paths that were not live, allowed items: must stay 0


@dataclass
class _Beams:
    """The outcome of one search: per request, beams sorted by score."""

    scores: torch.Tensor  # (Q, W) total log-prob, -inf for dead or padding beams
    items: torch.Tensor  # (Q, W, m) item index per slot, -1 where invalid
    item_scores: torch.Tensor  # (Q, W, m) log-prob of each slot's item


class Generator:
    def __init__(
        self,
        model: OneRecModel,
        trie: TrieIndex,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        kernel_backend: str | None = None,
    ):
        """``kernel_backend``: see ``use_kernel_backend``."""
        self.model = model.eval()
        self.trie = trie
        self.use_kernel_backend(kernel_backend)
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.model.to(self.device, self.dtype)
        self.cfg = model.cfg
        self._device_snap: tuple[TrieTensors, TrieTensors] | None = None  # (host snapshot, its device copy)
        self._weights = model.decode_weights()  # fused QKV, cross K/V and input table; stored weights untouched

    def use_kernel_backend(self, backend: str | None) -> None:
        """The backend ("torch", "triton", None = auto by device) every kernel dispatcher of this
        generator's searches and model is asked for; the dispatchers decide from it alone."""
        self.kernel_backend = backend
        self.model.use_kernel_backend(backend)

    @property
    def weights(self) -> DecodeWeights:
        """The fused decoding weights, rebuilt if the model was changed in place since they were made."""
        if self._weights.stale():
            self._weights = self.model.decode_weights()
        return self._weights

    def _on_device(self, snap: TrieTensors) -> TrieTensors:
        """The snapshot's tensors on the generator's device, copied once per snapshot, not per step."""
        if self.device.type == "cpu":
            return snap
        cached = self._device_snap
        if cached is None or cached[0] is not snap:
            moved = {f.name: getattr(snap, f.name).to(self.device) for f in fields(snap) if f.name != "max_code"}
            cached = (snap, replace(snap, **moved))
            self._device_snap = cached
        return cached[1]

    # ---- public -------------------------------------------------------------------------------

    def generate(self, requests: list[RecRequest]) -> tuple[list[RecResult], BatchStats]:
        """Answer a batch: every request joins one StepSearch, which runs until all have finished.

        Serving and offline evaluation share this one search; the answer of a request does not depend
        on what else is in the batch.
        """
        for i, req in enumerate(requests):
            self._validate(req, i)
        search = StepSearch(self)
        for i, req in enumerate(requests):
            search.add(i, req)
        results: list[RecResult | None] = [None] * len(requests)
        while len(search):
            for key, result in search.step():
                results[key] = result
        return [r for r in results if r is not None], search.stats

    @torch.no_grad()
    def search(
        self,
        requests: list[RecRequest],
        snap: TrieTensors,
        slots: int,
        stats: BatchStats | None = None,
        constrained: bool = True,
    ) -> _Beams:
        """Beam search of ``slots`` items per beam for each request (constrained by the trie unless told not).

        Runs on StepSearch with the snapshot pinned; returns every beam, padded to the widest request
        with -inf scores, as IPA and the legality metric read them.
        """
        if not 1 <= slots <= self.cfg.session_items:
            raise ValueError(f"slots must lie in [1, {self.cfg.session_items}], got {slots}")
        for i, req in enumerate(requests):
            self._validate(req, i)
        step_search = StepSearch(self, snap=snap, constrained=constrained)
        for q, req in enumerate(requests):
            step_search._admit(_Job(key=q, request=req, width=self._width(req), slots=slots, raw=True))
        raw: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        while len(step_search):
            step_search.step()
            raw.update(step_search._raw_done)
            step_search._raw_done.clear()
        w = max((self._width(r) for r in requests), default=1)
        scores = torch.full((len(requests), w), float("-inf"))
        items = torch.full((len(requests), w, slots), -1, dtype=torch.int64)
        item_scores = torch.zeros(len(requests), w, slots)
        for q, (s, it, its) in raw.items():
            scores[q, : len(s)], items[q, : len(s)], item_scores[q, : len(s)] = s, it, its
        dev = self.device
        if stats is not None:
            for f in fields(BatchStats):
                setattr(stats, f.name, getattr(stats, f.name) + getattr(step_search.stats, f.name))
        return _Beams(scores.to(dev), items.to(dev), item_scores.to(dev))

    # ---- request preparation ------------------------------------------------------------------

    def _validate(self, req: RecRequest, i: int) -> None:
        if req.mode not in MODES:
            raise ValueError(f"request {i}: mode must be one of {MODES}, got {req.mode!r}")
        if req.beam_width < 1:
            raise ValueError(f"request {i}: beam_width must be >= 1, got {req.beam_width}")
        if req.num_items < 1:
            raise ValueError(f"request {i}: num_items must be >= 1, got {req.num_items}")

    def _width(self, req: RecRequest) -> int:
        return request_cost(req.mode, req.beam_width, req.num_items, self.cfg.session_items, self.cfg.depth)[0]

    def _encoder_inputs(self, requests: list[RecRequest], snap: TrieTensors) -> tuple[torch.Tensor, ...]:
        cap = self.cfg.history_window
        n_items = snap.item_codes.shape[0]
        hists = [[i for i in r.history if 0 <= i < n_items][-cap:][::-1] for r in requests]  # newest first
        s = max(1, max(len(h) for h in hists))
        idx = torch.zeros(len(requests), s, dtype=torch.int64)
        mask = torch.zeros(len(requests), s, dtype=torch.bool)
        for q, h in enumerate(hists):
            idx[q, : len(h)] = torch.tensor(h, dtype=torch.int64)
            mask[q, : len(h)] = True
        codes = snap.item_codes[idx]  # (Q, S, D)
        users = torch.tensor([hash_user(r.user_id, self.cfg.user_buckets) for r in requests])
        return codes.to(self.device), mask.to(self.device), users.to(self.device)

    def _request_bans(self, requests: list[RecRequest], snap: TrieTensors) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (1+q)*N + node of every node on a banned item's path, and the banned items under each.

        The count is turned into ``-1 - count`` where the node still has an allowed live item below it,
        so ``keys[counts >= 0]`` are exactly the blocked nodes while the counts stay available for the
        session bans.
        """
        return _ban_keys([self._request_ban_nodes(r, snap) for r in requests], snap.num_nodes, self.device)

    def _request_ban_nodes(self, req: RecRequest, snap: TrieTensors) -> tuple[np.ndarray, np.ndarray]:
        """One request's banned path nodes and their counts (see ``_request_bans``), group-free."""
        live = snap.item_live.numpy()
        banned = set(req.exclude) | (set(req.history) if req.exclude_history else set())
        items = np.array([i for i in banned if 0 <= i < len(live) and live[i]], dtype=np.int64)
        if not len(items):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        nodes, counts = np.unique(snap.path_nodes.numpy()[items].reshape(-1), return_counts=True)
        blocked = counts >= snap.live_count.numpy()[nodes]
        return nodes, np.where(blocked, counts, -counts - 1)  # negative: partly banned

    def _with_session_bans(
        self,
        static_keys: torch.Tensor,
        session: torch.Tensor,
        q_of_row: torch.Tensor,
        req_keys: torch.Tensor,
        req_counts: torch.Tensor,
        snap: TrieTensors,
        q_n: int,
    ) -> torch.Tensor:
        """Add each row's already generated items (and inner nodes left with nothing allowed)."""
        nodes = self._session_ban_nodes(session, q_of_row, req_keys, req_counts, snap)  # (R, j*D)
        base = (1 + q_n + torch.arange(nodes.shape[0], device=self.device))[:, None] * snap.num_nodes
        return torch.sort(torch.cat([static_keys, _session_keys(nodes, base)])).values

    def _session_ban_nodes(
        self,
        session: torch.Tensor,
        q_of_row: torch.Tensor,
        req_keys: torch.Tensor,
        req_counts: torch.Tensor,
        snap: TrieTensors,
    ) -> torch.Tensor:
        """Nodes each row must not enter because of its own session: (R, j*D), -1 where none.

        A node is blocked once every live item under it is either in the row's session or banned for
        its request. Kept per row (not as keys) so a search can carry it through beam reorders.
        session: (R, j) item per slot so far, -1 where none; q_of_row: (R,) the row's ban group - 1.
        """
        rows, j = session.shape
        n_nodes = snap.num_nodes
        ok = session >= 0  # (R, j)
        anc = snap.path_nodes[session.clamp(min=0)]  # (R, j, D)
        same = (anc[:, :, None, :] == anc[:, None, :, :]) & ok[:, None, :, None]  # (R, j, j, D)
        sess_cnt = same.sum(2)  # (R, j, D)
        req_cnt = torch.zeros_like(sess_cnt)
        if req_keys.numel():
            keys = (1 + q_of_row)[:, None, None] * n_nodes + anc
            pos = torch.searchsorted(req_keys, keys).clamp_(max=req_keys.numel() - 1)
            hit = req_keys[pos] == keys
            cnt = req_counts[pos]
            req_cnt = torch.where(hit, torch.where(cnt >= 0, cnt, -cnt - 1), 0)
        remaining = snap.live_count[anc] - req_cnt - sess_cnt
        blocked = (remaining <= 0) & ok[:, :, None]
        return torch.where(blocked, anc, -1).view(rows, -1)

    # ---- answers ------------------------------------------------------------------------------

    def _collect(self, req: RecRequest, q: int, beams: _Beams, snap: TrieTensors, stats: BatchStats) -> RecResult:
        """Request q's answer from its beams: distinct live allowed items, best beam first.

        Reads the snapshot through numpy (no tensor op per item): this runs once per finished request.
        """
        banned = set(req.exclude) | (set(req.history) if req.exclude_history else set())
        live = snap.item_live.numpy()
        codes = snap.item_codes.numpy()
        scores = beams.scores[q].tolist()
        items = beams.items[q].tolist()
        item_scores = beams.item_scores[q].tolist()
        out: list[RecItem] = []
        seen: set[int] = set()
        for score, row_items, row_scores in zip(scores, items, item_scores):
            if score == float("-inf"):
                break
            for item, item_score in zip(row_items, row_scores):
                if item < 0 or item in banned or not live[item]:
                    stats.invalid_paths += 1
                    continue
                if item in seen:
                    continue
                seen.add(item)
                value = score if req.mode == "items" else item_score
                out.append(RecItem(item, float(value), tuple(int(c) for c in codes[item])))
                if len(out) == req.num_items:
                    return RecResult(out)
        return RecResult(out)


def _session_keys(nodes: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Flat ban keys base[r] + node of each row's session-banned nodes; -1 (matches no key) where none.

    nodes: (R, n) node ids, -1 = none; base: (R, 1) the row's group times the node count.
    """
    return torch.where(nodes >= 0, base + nodes, -1).view(-1)


def _ban_keys(
    per_request: Sequence[tuple[np.ndarray, np.ndarray]], n_nodes: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted keys (1+q)*N + node and their counts from each request's (nodes, counts), q in list order."""
    keys = [(1 + q) * n_nodes + nodes for q, (nodes, _) in enumerate(per_request) if len(nodes)]
    if not keys:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty
    flat_keys = np.concatenate(keys)
    flat_counts = np.concatenate([counts for nodes, counts in per_request if len(nodes)])
    order = np.argsort(flat_keys, kind="stable")
    return torch.from_numpy(flat_keys[order]).to(device), torch.from_numpy(flat_counts[order]).to(device)


@dataclass
class StepStats(BatchStats):
    """BatchStats plus the counters of a search that outlives any one batch."""

    steps: int = 0
    rows_stepped: int = 0  # sum over steps of the rows decoded at that step
    finished: int = 0  # requests answered
    removed: int = 0  # requests dropped mid-search


@dataclass(eq=False)
class _Job:
    """One search in a StepSearch: a request (or its session top-up, or a raw ``Generator.search`` row)."""

    key: int
    request: RecRequest
    width: int  # beams, = rows it occupies
    slots: int  # items per beam
    raw: bool = False  # keep the beams (Generator.search) instead of answering with a RecResult
    t: int = 0  # next decoder position
    enc: torch.Tensor | None = None  # (layers, 2, H, S_q, dh) memory K/V, a view into its encode batch
    mem_len: int = 0  # S_q: user column + real history items
    copy: CandidateCopy | None = None  # its candidates for the copy head, (1, K, ...) each
    bans: tuple[np.ndarray, np.ndarray] | None = None  # (nodes, counts) for the snapshot in bans_snap
    bans_snap: TrieTensors | None = None
    done_items: list[RecItem] | None = None  # a short session's items, which this items search tops up
    dropped: bool = False  # finished or removed: its rows go at the next relayout


class StepSearch:
    """Beam search whose row set changes between decode steps (iteration-level scheduling).

    Requests join with ``add`` and leave when finished (returned by ``step``) or with ``remove``; every
    ``step`` decodes one position for every live (request, beam) row, whatever the request's mode,
    beam width or position. Rows sit in beam-width groups (a request's beams contiguous inside its
    group), each row carries its own position (slot, level), and a request's memory K/V are computed
    once and shared by its beams on the query axis. Beam reorder, the compaction of leaving requests
    and the placement of joining ones are one ``index_select`` of the one self-attention cache.

    Constraints are those of ``Generator.search``: trie validity (the live snapshot, re-read at every
    step, so a withdrawal between steps takes effect at the next one), the request's exclusions and
    history, and items already in the beam's session. A session left with fewer than ``num_items``
    distinct items is topped up by an items search (excluding what it has) before it is returned.

    Batch invariance: a request's rows only ever meet other requests' rows in row-wise ops, and its
    per-request top-B sees its own beams only, so it gets the same items alone, in a batch, or joining
    one mid-way (scores equal up to float rounding of padded reductions).
    """

    def __init__(self, generator: Generator, snap: TrieTensors | None = None, constrained: bool = True) -> None:
        self.gen = generator
        self.model = generator.model
        self.cfg = generator.cfg
        self.device = generator.device
        self.stats = StepStats()
        self._pinned = snap  # Generator.search keeps one snapshot; serving reads the live one each step
        self._constrained = constrained
        self._weights = generator.weights
        dev, cfg = self.device, self.cfg
        self._depth, self._m, self._positions = cfg.depth, cfg.session_items, cfg.session_positions
        self._keys: dict[int, _Job] = {}  # every live job, pending or running
        self._pending: list[_Job] = []  # joins at the next step
        self._order: list[_Job] = []  # running jobs, in row order
        self._dirty = False  # a job finished or was removed: compact at the next step
        self._raw_done: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # row state, (R, ...) in the order of self._order
        self._scores = torch.zeros(0, device=dev)  # (R,) total log-prob
        self._node = torch.zeros(0, dtype=torch.int64, device=dev)  # (R,) trie node, -1 = dead beam
        self._tok = torch.zeros(0, dtype=torch.int64, device=dev)  # (R,) table row of the previous code
        # (R,) path key of the codes chosen so far in each row's current item, for the trie-node biases (node_bias)
        self._prefix = torch.zeros(0, dtype=torch.int64, device=dev)
        self._strides = self.model.path_strides if cfg.node_bias else None  # (D,) the keys' mixed radix
        self._items = torch.zeros(0, self._m, dtype=torch.int64, device=dev)  # (R, m) -1 = not (validly) filled
        self._item_scores = torch.zeros(0, self._m, device=dev)  # (R, m)
        self._parent: torch.Tensor | None = None  # (R,) cache reorder owed by the last step
        self._cache = self.model.allocate_cache(0, self._positions, dev, generator.dtype)
        self._spare = self._cache
        self._arange = torch.arange(max(self._positions, 1), device=dev)
        self._groups: list[CrossGroup] = []
        self._group_jobs: list[list[_Job]] = []
        self._group_base: list[torch.Tensor] = []  # per group (Q_w, 1): first row of each request
        self._widths = np.zeros(0, dtype=np.int64)  # per running job, row order
        self._snap: TrieTensors | None = None
        self._bans_dirty = True
        self._sess_nodes: torch.Tensor | None = None  # (R, j*D) session-banned nodes per row; None = stale
        # copy head (model.cfg.copy_head): each row's request's candidates, and which still match its item
        self._copy: CandidateCopy | None = None  # (R, K, d), (R, K, D), (R, K)
        self._copy_match = torch.ones(0, cfg.candidate_tokens, dtype=torch.bool, device=dev)  # (R, K)

    # ---- public -------------------------------------------------------------------------------

    def add(self, key: int, request: RecRequest) -> None:
        """Validate (ValueError naming the bad field) and queue a request; its rows join at the next step.

        Requests that join at the same step are encoded together there (one encoder call, each
        request's memory K/V then kept once and shared by its beams).
        """
        if key in self._keys:
            raise ValueError(f"request {key}: key is already live")
        self.gen._validate(request, key)
        slots = 1 if request.mode == "items" else self._m
        self._admit(_Job(key=key, request=request, width=self.gen._width(request), slots=slots))

    def remove(self, key: int) -> bool:
        """Drop a live request mid-search (deadline passed, caller gone); its rows go at the next step."""
        job = self._keys.pop(key, None)
        if job is None:
            return False
        if job in self._pending:
            self._pending.remove(job)
        else:
            job.dropped = True
            self._dirty = True
        self.stats.removed += 1
        return True

    @property
    def rows(self) -> int:
        """Live (request, beam) rows, those joining at the next step included."""
        return sum(job.width for job in self._keys.values())

    def __len__(self) -> int:
        """Live requests, those joining at the next step included."""
        return len(self._keys)

    def cost(self, request: RecRequest) -> tuple[int, int]:
        """(rows it will occupy, decode steps it needs), for admission pricing.

        A session that ends short of ``num_items`` distinct items needs ``depth`` more steps of an
        items search; that is rare and not counted here.
        """
        r = request
        return request_cost(r.mode, r.beam_width, r.num_items, self._m, self._depth)

    @torch.no_grad()
    def step(self) -> list[tuple[int, RecResult]]:
        """One decode position for every live row; returns the requests that finished at this step."""
        snap = self._pinned if self._pinned is not None else self.gen.trie.tensors
        if snap is not self._snap:
            self._snap = snap
            self._bans_dirty = True
        if self._pending or self._dirty:
            self._relayout(snap)
        elif self._parent is not None:
            self._reorder_cache(self._parent, None, len(self._parent), max(job.t for job in self._order))
        self._parent = None
        if not self._order:
            return []
        t0 = time.perf_counter()
        if self._constrained:
            for job in self._order:
                if job.bans_snap is not snap:
                    job.bans, job.bans_snap = self.gen._request_ban_nodes(job.request, snap), snap
            if self._bans_dirty:
                self._build_bans(snap)
        done = self._decode(snap)
        self.stats.decode_seconds += time.perf_counter() - t0
        return done

    # ---- joining and leaving ------------------------------------------------------------------

    def _admit(self, job: _Job) -> None:
        self._keys[job.key] = job
        self._pending.append(job)

    def _relayout(self, snap: TrieTensors) -> None:
        """New row order: drop finished and removed jobs, place joining ones in their width group.

        The small per-row state moves with two ops per tensor; the cache with one gather that folds
        the last step's beam reorder into the compaction.
        """
        old_start: dict[int, int] = {}
        start = 0
        for job in self._order:
            old_start[id(job)] = start
            start += job.width
        survivors = [job for job in self._order if not job.dropped]
        joiners, self._pending = self._pending, []
        self.stats.rows += sum(job.width for job in joiners)  # rows admitted, session top-ups included
        self._encode([job for job in joiners if job.enc is None], snap)
        widths = sorted({job.width for job in survivors + joiners})
        order, groups = [], []
        for w in widths:
            members = [job for job in survivors if job.width == w] + [job for job in joiners if job.width == w]
            groups.append(members)
            order += members
        src, dst, fresh = [], [], []
        row = 0
        for job in order:
            if id(job) in old_start:
                src.append(np.arange(old_start[id(job)], old_start[id(job)] + job.width))
                dst.append(np.arange(row, row + job.width))
            else:
                fresh.append(row)
            row += job.width
        rows, dev = row, self.device
        src_t = self._host(np.concatenate(src)) if src else None
        dst_t = self._host(np.concatenate(dst)) if dst else None

        def carry(old: torch.Tensor, fill: float) -> torch.Tensor:
            new = old.new_full((rows, *old.shape[1:]), fill)
            if src_t is not None:
                new[dst_t] = old[src_t]
            return new

        self._scores = carry(self._scores, float("-inf"))
        self._scores[torch.tensor(fresh, dtype=torch.int64, device=dev)] = 0.0  # beam 0 of each new request
        self._node = carry(self._node, 0)  # new rows at the root
        self._tok = carry(self._tok, 0)  # table row 0: the start vector
        self._prefix = carry(self._prefix, 0)  # new rows start an item
        self._items = carry(self._items, -1)
        self._item_scores = carry(self._item_scores, 0.0)
        self._copy_match = carry(self._copy_match, True)  # new rows start an item: every candidate matches
        if src_t is not None:
            cache_src = self._parent[src_t] if self._parent is not None else src_t
            self._reorder_cache(cache_src, dst_t, rows, max(job.t for job in survivors))
        else:
            self._reorder_cache(None, None, rows, 0)
        self._order = order
        self._widths = np.array([job.width for job in order], dtype=np.int64)
        self._copy = self._rows_copy(order)
        self._build_groups(groups)
        self._dirty = False
        self._bans_dirty = True

    def _rows_copy(self, order: list[_Job]) -> CandidateCopy | None:
        """Each row's request's candidates (copy head), gathered once per relayout, not per step."""
        if not self.cfg.copy_head or not order:
            return None
        parts = [job.copy for job in order]
        assert all(p is not None for p in parts)
        of_row = self._host(np.repeat(np.arange(len(order)), self._widths))  # (R,) job of each row
        return CandidateCopy(
            *(torch.cat([getattr(p, f) for p in parts]).index_select(0, of_row) for f in ("keys", "codes", "valid"))
        )

    def _reorder_cache(self, src: torch.Tensor | None, dst: torch.Tensor | None, rows: int, written: int) -> None:
        """cache'[dst] = cache[src] into the spare buffer (dst None: all rows in order), then swap.

        Only the first ``written`` positions hold anything (the rest is masked out until a row writes
        it), so when they are under half the cache only they are copied.
        """
        spare = self._spare
        if spare.shape[0] < rows or spare is self._cache:
            spare = self.model.allocate_cache(max(rows, 2 * spare.shape[0]), self._positions, self.device, spare.dtype)
        if src is not None and written > 0:
            if 2 * written > self._positions:
                if dst is None:
                    torch.index_select(self._cache, 0, src, out=spare[:rows])
                else:
                    spare[:rows].index_copy_(0, dst, self._cache.index_select(0, src))
            else:
                moved = self._cache[..., :written, :].index_select(0, src)  # (len(src), layers, 2, written, d)
                if dst is None:
                    spare[:rows, ..., :written, :] = moved
                else:
                    spare[:rows, ..., :written, :].index_copy_(0, dst, moved)
        self._spare, self._cache = self._cache, spare

    def _encode(self, jobs: list[_Job], snap: TrieTensors) -> None:
        """Encode the joining requests in one batch; each keeps its own memory K/V slice."""
        if not jobs:
            return
        t0 = time.perf_counter()
        codes, mask, users = self.gen._encoder_inputs([job.request for job in jobs], snap)
        state = self.model.prepare_decoding(codes, mask, users, self._weights)
        # Each request keeps the memory positions it attends to: [user, history] and its candidates,
        # which sit after the batch's history padding.
        keep = state.mask[:, 0, 0, :]  # (B, M)
        for b, job in enumerate(jobs):
            cols = keep[b].nonzero().squeeze(1)
            job.enc = state.cross_kv[:, :, b].index_select(3, cols)  # (layers, 2, H, M_q, dh)
            job.mem_len = int(cols.numel())
            if state.copy is not None:
                c = state.copy
                job.copy = CandidateCopy(c.keys[b : b + 1], c.codes[b : b + 1], c.valid[b : b + 1])
        self.stats.encode_seconds += time.perf_counter() - t0

    def _build_groups(self, groups: list[list[_Job]]) -> None:
        """Per beam width: the members' memory K/V padded to the group's longest history, and a mask."""
        old = {tuple(id(j) for j in g_jobs): g for g_jobs, g in zip(self._group_jobs, self._groups)}
        self._group_jobs = groups
        new_groups, bases = [], []
        start = 0
        for members in groups:
            w = members[0].width
            stop = start + w * len(members)
            reuse = old.get(tuple(id(j) for j in members))
            if reuse is not None:
                kv, mask = reuse.kv, reuse.mask
            else:
                s = max(job.mem_len for job in members)
                enc0 = members[0].enc
                assert enc0 is not None
                layers, _, heads, _, dh = enc0.shape
                kv = enc0.new_zeros(layers, 2, len(members), heads, s, dh)
                for q, job in enumerate(members):
                    assert job.enc is not None
                    kv[:, :, q, :, : job.mem_len] = job.enc
                lens = torch.tensor([job.mem_len for job in members], device=self.device)
                mask = (self._arange_to(s)[None, :] < lens[:, None])[:, None, None, :]  # (Q_w, 1, 1, S_w)
            new_groups.append(CrossGroup(start, stop, w, kv, mask))
            bases.append(start + torch.arange(len(members), device=self.device)[:, None] * w)  # (Q_w, 1)
            start = stop
        self._groups, self._group_base = new_groups, bases

    def _row_groups_of(self, groups: tuple[int, ...]) -> torch.Tensor:
        """(R, G) ban groups of each row for the given kinds (0 dead, 1 request, 2 session); built once."""
        cols = self._row_groups_cache.get(groups)
        if cols is None:
            rows = self._q_of_row.shape[0]
            session = 1 + len(self._order) + torch.arange(rows, device=self.device)
            parts = [self._group_columns[g] if g < 2 else session for g in groups]
            cols = torch.stack(parts, 1) if parts else self._q_of_row.new_zeros(rows, 1)
            self._row_groups_cache[groups] = cols
        return cols

    def _host(self, array: np.ndarray) -> torch.Tensor:
        """A host-planned index array as a tensor on the device (no copy, no op on CPU)."""
        t = torch.from_numpy(array)
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)

    def _arange_to(self, n: int) -> torch.Tensor:
        if self._arange.numel() < n:
            self._arange = torch.arange(2 * n, device=self.device)
        return self._arange[:n]

    def _build_bans(self, snap: TrieTensors) -> None:
        """Ban keys of the running jobs: 0 = dead nodes, 1+q = job q's exclusions, 1+Q+r = row r's session."""
        dev, n_nodes = self.device, snap.num_nodes
        dsnap = self.gen._on_device(snap)
        per_job = [job.bans if job.bans is not None else (np.zeros(0, np.int64),) * 2 for job in self._order]
        self._req_keys, self._req_counts = _ban_keys(per_job, n_nodes, dev)
        static = torch.cat([dsnap.dead_nodes, self._req_keys[self._req_counts >= 0]])
        self._static_keys = torch.sort(static).values
        q_n, rows = len(self._order), int(self._widths.sum())
        self._q_of_row = torch.from_numpy(np.repeat(np.arange(q_n), self._widths)).to(dev)  # (R,)
        self._group_columns = [torch.zeros_like(self._q_of_row), 1 + self._q_of_row, None]  # session: 1+Q+r
        self._row_groups_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._ban_groups = tuple(
            g for g, n in ((0, dsnap.dead_nodes.shape[0]), (1, int((self._req_counts >= 0).sum()))) if n
        )
        self._sess_base = (1 + q_n + torch.arange(rows, device=dev))[:, None] * n_nodes  # (R, 1) session groups
        self._sess_nodes = None
        self._bans_dirty = False

    # ---- one step -----------------------------------------------------------------------------

    def _decode(self, snap: TrieTensors) -> list[tuple[int, RecResult]]:
        """Decoder, constrained top-k, per-request top-B and state update for every running row."""
        depth, m, w_ = self._depth, self._m, self._weights
        order, widths = self._order, self._widths
        t_job = np.array([job.t for job in order], dtype=np.int64)
        pos_np = np.repeat(t_job, widths)  # (R,) host copy: no device sync to plan the step
        rows = len(pos_np)
        level_np, slot_np = pos_np % depth, pos_np // depth
        pos = self._host(pos_np)
        t_hi = int(t_job.max()) + 1
        self_mask = None  # every row reads all of [0, t_hi)
        if t_job.min() + 1 < t_hi:
            self_mask = torch.where(self._arange_to(t_hi)[None, :, None] <= pos[:, None, None], 0.0, float("-inf"))
        level = self._host(level_np)
        copy, copy_codes = None, None
        if self._copy is not None:  # each candidate's code at the row's level, and the still-matching ones
            at = level[:, None, None].expand(rows, self._copy.codes.shape[1], 1)
            copy_codes = self._copy.codes.gather(2, at).squeeze(2)  # (R, K)
            copy = CopyRows(self._copy.keys, copy_codes, self._copy_match & self._copy.valid)
        batch = StepBatch(
            cache=self._cache[:rows],
            rows=self._arange_to(rows),
            pos=pos,
            t_hi=t_hi,
            self_mask=self_mask,
            groups=self._groups,
            level=level,
            copy=copy,
            prefix=self._prefix if self._strides is not None else None,
        )
        tokens = torch.stack([self._tok, self._host(pos_np + w_.pos_offset)], 1)  # (R, 2) rows of the input table
        logits = self.model.decode_step(self.model.step_input(tokens, w_), batch, w_)  # (R, V)
        k = int(widths.max())
        dsnap = self.gen._on_device(snap)
        if self._constrained:
            banned = self._static_keys
            max_slot = int(slot_np.max())
            groups = self._ban_groups  # only the groups that have keys: each costs the kernel a lookup
            if max_slot > 0:  # rows with items behind them: ban those items for that row
                if self._sess_nodes is None:  # an item was completed, or rows or snapshot changed
                    self._sess_nodes = self.gen._session_ban_nodes(
                        self._items[:, :max_slot], self._q_of_row, self._req_keys, self._req_counts, dsnap
                    )
                keys = _session_keys(self._sess_nodes, self._sess_base)
                banned = torch.sort(torch.cat([self._static_keys, keys])).values
                groups = groups + (2,)
            top = trie_topk(
                logits,
                self._node,
                dsnap.offsets,
                dsnap.child_codes,
                dsnap.child_nodes,
                k,
                banned,
                self._row_groups_of(groups),
                snap.num_nodes,
                backend=self.gen.kernel_backend,
                at_root=bool((level_np == 0).all()),
            )
            values, codes, nodes = top.values, top.codes, top.nodes  # (R, k)
        else:
            values, codes = torch.log_softmax(logits.float(), dim=-1).topk(min(k, logits.shape[1]), dim=1)
            nodes = dsnap.child_of(self._node[:, None].expand_as(codes), codes)  # -1 off the trie
        k = values.shape[1]

        # per-request top-B over its own beams' candidates, one topk per beam-width group
        bests, parents, choices = [], [], []
        for g, base in zip(self._groups, self._group_base):
            kk = min(g.width, k)
            cand = self._scores[g.start : g.stop, None] + values[g.start : g.stop, :kk]  # (Q_w*w, kk)
            best, pick = cand.view(base.shape[0], g.width * kk).topk(g.width, dim=1)  # (Q_w, w), sorted
            beam = pick // kk
            bests.append(best.view(-1))
            parents.append((base + beam).view(-1))
            choices.append((pick - beam * kk).view(-1))
        one = len(bests) == 1
        best = bests[0] if one else torch.cat(bests)  # (R,)
        parent = parents[0] if one else torch.cat(parents)  # (R,) row each new beam continues
        flat = parent * k + (choices[0] if one else torch.cat(choices))  # (R,) into (R, k)
        new_code = codes.view(-1)[flat]
        new_node = nodes.view(-1)[flat]
        gained = values.view(-1)[flat].nan_to_num(neginf=0.0)  # -inf only on dead beams, never read

        items, item_scores = self._items[parent], self._item_scores[parent]  # (R, m)
        cell = self._host(np.arange(rows) * m + slot_np)  # (R,) this step's slot of each row
        item_scores.view(-1).index_add_(0, cell, gained)
        last_np = level_np == depth - 1
        if self._sess_nodes is not None:
            self._sess_nodes = self._sess_nodes[parent]  # the session bans follow their beams
        if last_np.any():  # rows finishing an item: record it and go back to the root
            self._sess_nodes = None  # sessions changed: recompute their bans at the next step
            leaf = torch.where(new_node >= 0, dsnap.node_item[new_node.clamp(min=0)], -1)
            if last_np.all():
                items.view(-1).index_copy_(0, cell, leaf)
                new_node = new_node.clamp(max=0)
            else:
                idx = self._host(np.flatnonzero(last_np))
                items.view(-1).index_copy_(0, cell[idx], leaf[idx])
                new_node = torch.where(self._host(last_np), new_node.clamp(max=0), new_node)
        if copy_codes is not None:  # a beam keeps the candidates whose code it just chose (same request,
            # same level as its parent row); a finished item starts the next one with all of them
            follow = self._copy_match[parent] & (copy_codes == new_code[:, None])
            self._copy_match = follow if not last_np.any() else follow | self._host(last_np)[:, None]
        if self._strides is not None:  # the parent's prefix and the chosen code; a finished item starts afresh
            prefix = self._prefix[parent] + new_code.clamp(min=0) * self._strides[level]
            self._prefix = torch.where(self._host(last_np), 0, prefix)
        offsets = np.asarray(w_.code_offset, dtype=np.int64)[level_np]  # table row of code 0 of the level
        self._tok = new_code.clamp(min=0) + self._host(offsets)
        self._scores, self._node, self._items, self._item_scores = best, new_node, items, item_scores
        self._parent = parent
        self.stats.steps += 1
        self.stats.rows_stepped += rows
        return self._finish(snap)

    def _finish(self, snap: TrieTensors) -> list[tuple[int, RecResult]]:
        """Advance every job; answer those at their last position (topping up short sessions)."""
        out: list[tuple[int, RecResult]] = []
        start = 0
        for job in self._order:
            job.t += 1
            r0, start = start, start + job.width
            if job.t < job.slots * self._depth or job.dropped:
                continue
            job.dropped = True
            self._dirty = True
            scores = self._scores[r0:start]
            items = self._items[r0:start, : job.slots]
            item_scores = self._item_scores[r0:start, : job.slots]
            if job.raw:
                self._raw_done[job.key] = (scores.cpu(), items.cpu(), item_scores.cpu())
                del self._keys[job.key]
                continue
            req = job.request
            beams = _Beams(scores[None], items[None], item_scores[None])
            result = self.gen._collect(req, 0, beams, snap, self.stats)
            if job.done_items is not None:  # the top-up of a short session
                job.done_items.extend(result.items)
                result = RecResult(job.done_items)
            elif req.mode == "session" and len(result.items) < req.num_items:
                self._admit(self._top_up(job, result))
                continue
            del self._keys[job.key]
            self.stats.finished += 1
            out.append((job.key, result))
        return out

    def _top_up(self, job: _Job, have: RecResult) -> _Job:
        """Sessions that overlap can leave fewer than num_items distinct items: fill with the best single
        items, by an items search that excludes what the session has (and reuses its memory K/V)."""
        req = job.request
        need = req.num_items - len(have.items)
        extra = RecRequest(
            history=req.history,
            num_items=need,
            mode="items",
            beam_width=max(req.beam_width, need),
            exclude=list(req.exclude) + [it.item for it in have.items],
            exclude_history=req.exclude_history,
            user_id=req.user_id,
        )
        return _Job(
            key=job.key,
            request=extra,
            width=self.gen._width(extra),
            slots=1,
            enc=job.enc,
            mem_len=job.mem_len,
            copy=job.copy,
            done_items=have.items,
        )
