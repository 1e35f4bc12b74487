"""Trie-constrained beam search over (request, beam) rows.

One batch: encode every request once; project cross-attention K/V once per request (its beams share
them); then decode position by position for all rows at once. Each step is one ``kernels.trie_topk``
call, which only ever looks at the children of each row's trie node and renormalises the
log-softmax over the allowed ones, so constraints shape the search instead of filtering its output
(the answer still has ``num_items`` items).

Bans are sorted keys ``group * num_nodes + node`` (see ``kernels.trie_topk``); every row has three
groups: 0 = nodes with no live item (withdrawn), 1+q = request q's exclusions and own history,
1+Q+r = items row r has already put in its session. A ban covers an inner node as soon as every live
item under it is banned, so no beam walks into a dead end.

Batch invariance: requests are padded to the widest beam of the batch with -inf beams and to the
longest history with masked keys, and per-request top-B keeps the request's own width, so a request
gets the same items alone or in any batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from kernels.trie_topk import trie_topk
from onerec.model import OneRecModel, hash_user
from onerec.trie import TrieIndex, TrieTensors

MODES = ("session", "items")


@dataclass(frozen=True)
class RecRequest:
    history: Sequence[int]  # internal item indices, newest last (unknown ids already dropped)
    num_items: int = 10
    mode: str = "session"  # "session" | "items"
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
    def __init__(self, model: OneRecModel, trie: TrieIndex, device: str = "cpu", dtype: torch.dtype | None = None):
        self.model = model.eval()
        self.trie = trie
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.model.to(self.device, self.dtype)
        self.cfg = model.cfg
        self._device_snap: tuple[TrieTensors, TrieTensors] | None = None  # (host snapshot, its device copy)

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
        """Answer a batch; requests of the two modes are searched separately (different lengths)."""
        for i, req in enumerate(requests):
            self._validate(req, i)
        results: list[RecResult | None] = [None] * len(requests)
        stats = BatchStats()
        snap = self.trie.tensors
        for mode in MODES:
            idx = [i for i, r in enumerate(requests) if r.mode == mode]
            if not idx:
                continue
            group = [requests[i] for i in idx]
            beams = self.search(group, snap, slots=1 if mode == "items" else self.cfg.session_items, stats=stats)
            for i, req, q in zip(idx, group, range(len(group))):
                results[i] = self._collect(req, q, beams, snap, stats)
        self._top_up_sessions(requests, results, snap, stats)
        return [r for r in results if r is not None], stats

    def _top_up_sessions(
        self, requests: list[RecRequest], results: list[RecResult | None], snap: TrieTensors, stats: BatchStats
    ) -> None:
        """Sessions that overlap can leave fewer than num_items distinct items: fill with the best single items."""
        short = [
            i
            for i, r in enumerate(results)
            if r is not None and requests[i].mode == "session" and len(r.items) < requests[i].num_items
        ]
        if not short:
            return
        extra = []
        for i in short:
            req, have = requests[i], results[i]
            assert have is not None
            need = req.num_items - len(have.items)
            taken = [it.item for it in have.items]
            extra.append(
                RecRequest(
                    history=req.history,
                    num_items=need,
                    mode="items",
                    beam_width=max(req.beam_width, need),
                    exclude=list(req.exclude) + taken,
                    exclude_history=req.exclude_history,
                    user_id=req.user_id,
                )
            )
        beams = self.search(extra, snap, slots=1, stats=stats)
        for q, (i, req) in enumerate(zip(short, extra)):
            have = results[i]
            assert have is not None
            have.items.extend(self._collect(req, q, beams, snap, stats).items)

    @torch.no_grad()
    def search(
        self,
        requests: list[RecRequest],
        snap: TrieTensors,
        slots: int,
        stats: BatchStats | None = None,
        constrained: bool = True,
    ) -> _Beams:
        """Beam search of ``slots`` items per beam for each request (constrained by the trie unless told not)."""
        stats = stats if stats is not None else BatchStats()
        t0 = time.perf_counter()
        widths = [self._width(r) for r in requests]
        q_n, w = len(requests), max(widths)
        rows = q_n * w
        state = self.model.prepare_decoding(*self._encoder_inputs(requests, snap))
        t1 = time.perf_counter()
        stats.encode_seconds += t1 - t0

        dev, depth, n_nodes = self.device, self.cfg.depth, snap.num_nodes
        width_mask = torch.arange(w, device=dev)[None, :] < torch.tensor(widths, device=dev)[:, None]  # (Q, W)
        req_keys, req_counts = self._request_bans(requests, snap)
        dsnap = self._on_device(snap)
        static_keys = torch.cat([dsnap.dead_nodes, req_keys[req_counts >= 0]])
        banned = torch.sort(static_keys).values
        q_of_row = torch.arange(q_n, device=dev).repeat_interleave(w)  # (R,)
        row_groups = torch.stack(
            [torch.zeros_like(q_of_row), 1 + q_of_row, 1 + q_n + torch.arange(rows, device=dev)], 1
        )

        scores = torch.full((q_n, w), float("-inf"), device=dev)
        scores[:, 0] = 0.0
        node = torch.zeros(rows, dtype=torch.int64, device=dev)
        valid = torch.ones(rows, dtype=torch.bool, device=dev)
        items = torch.full((rows, slots), -1, dtype=torch.int64, device=dev)
        item_scores = torch.zeros(rows, slots, device=dev)
        steps = slots * depth
        caches = [self.model.allocate_cache(rows, steps, dev, self.dtype) for _ in range(4)]
        ck, cv, ck_spare, cv_spare = caches
        prev_codes: torch.Tensor | None = None
        offsets, child_codes, child_nodes = dsnap.offsets, dsnap.child_codes, dsnap.child_nodes
        for t in range(steps):
            level, slot = t % depth, t // depth
            x = self.model.step_input(t, prev_codes, rows)
            logits = self.model.decode_step(x, t, state, ck, cv)  # (R, V_level)
            if constrained:
                if slot > 0:  # rows were reordered since the last step: rebuild the per-row session bans
                    banned = self._with_session_bans(
                        static_keys, items[:, :slot], q_of_row, req_keys, req_counts, dsnap, q_n
                    )
                top = trie_topk(
                    logits, node, offsets, child_codes, child_nodes, w, banned, row_groups, n_nodes, at_root=level == 0
                )
                values, codes, nodes = top.values, top.codes, top.nodes
            else:
                values, codes = torch.log_softmax(logits.float(), dim=-1).topk(min(w, logits.shape[1]), dim=1)
                nodes = dsnap.child_of(node[:, None].expand_as(codes), codes)  # -1 off the trie
            k = values.shape[1]
            cand = (scores.reshape(rows, 1) + values).reshape(q_n, w * k)  # (Q, W*k)
            best, pick = cand.topk(w, dim=1)  # (Q, W), sorted
            best = best.masked_fill(~width_mask, float("-inf"))
            parent = (torch.arange(q_n, device=dev)[:, None] * w + pick // k).reshape(rows)  # (R,)
            choice = (pick % k).reshape(rows)
            new_code = codes[parent, choice].clamp(min=0)
            new_node = nodes[parent, choice]
            items, item_scores, valid = items[parent], item_scores[parent], valid[parent]
            item_scores[:, slot] += torch.where(torch.isfinite(best.reshape(rows)), values[parent, choice], 0.0)
            valid &= new_node >= 0
            node = torch.where(valid, new_node, -1)
            torch.index_select(ck, 1, parent, out=ck_spare)
            torch.index_select(cv, 1, parent, out=cv_spare)
            ck, ck_spare, cv, cv_spare = ck_spare, ck, cv_spare, cv
            scores, prev_codes = best, new_code
            if level == depth - 1:
                items[:, slot] = torch.where(valid, dsnap.node_item[node.clamp(min=0)], -1)
                node = torch.where(valid, 0, -1)
        stats.decode_seconds += time.perf_counter() - t1
        stats.rows += rows
        return _Beams(scores, items.view(q_n, w, slots), item_scores.view(q_n, w, slots))

    # ---- request preparation ------------------------------------------------------------------

    def _validate(self, req: RecRequest, i: int) -> None:
        if req.mode not in MODES:
            raise ValueError(f"request {i}: mode must be one of {MODES}, got {req.mode!r}")
        if req.beam_width < 1:
            raise ValueError(f"request {i}: beam_width must be >= 1, got {req.beam_width}")
        if req.num_items < 1:
            raise ValueError(f"request {i}: num_items must be >= 1, got {req.num_items}")

    def _width(self, req: RecRequest) -> int:
        """Items mode needs a beam per returned item; a session needs at least enough to fill num_items."""
        if req.mode == "items":
            return max(req.beam_width, req.num_items)
        return max(req.beam_width, -(-req.num_items // self.cfg.session_items))

    def _encoder_inputs(self, requests: list[RecRequest], snap: TrieTensors) -> tuple[torch.Tensor, ...]:
        cap = self.cfg.max_history
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

        The count is turned into ``-1`` where the node still has an allowed live item below it, so
        ``keys[counts >= 0]`` are exactly the blocked nodes while the counts stay available for the
        session bans.
        """
        n_nodes = snap.num_nodes
        live = snap.item_live.numpy()
        path_nodes = snap.path_nodes.numpy()
        live_count = snap.live_count.numpy()
        all_keys, all_counts = [], []
        for q, req in enumerate(requests):
            banned = set(req.exclude) | (set(req.history) if req.exclude_history else set())
            items = np.array([i for i in banned if 0 <= i < len(live) and live[i]], dtype=np.int64)
            if not len(items):
                continue
            nodes, counts = np.unique(path_nodes[items].reshape(-1), return_counts=True)
            blocked = counts >= live_count[nodes]
            all_keys.append((1 + q) * n_nodes + nodes)
            all_counts.append(np.where(blocked, counts, -counts - 1))  # negative: partly banned
        if not all_keys:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return empty, empty
        keys = torch.from_numpy(np.concatenate(all_keys)).to(self.device)
        counts = torch.from_numpy(np.concatenate(all_counts)).to(self.device)
        order = torch.argsort(keys)
        return keys[order], counts[order]

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
        row_ids = torch.arange(rows, device=self.device)[:, None, None].expand_as(anc)
        keys = (1 + q_n + row_ids[blocked]) * n_nodes + anc[blocked]
        return torch.sort(torch.cat([static_keys, keys])).values

    # ---- answers ------------------------------------------------------------------------------

    def _collect(self, req: RecRequest, q: int, beams: _Beams, snap: TrieTensors, stats: BatchStats) -> RecResult:
        banned = set(req.exclude) | (set(req.history) if req.exclude_history else set())
        live = snap.item_live
        scores = beams.scores[q].tolist()
        items = beams.items[q].tolist()
        item_scores = beams.item_scores[q].tolist()
        out: list[RecItem] = []
        seen: set[int] = set()
        for score, row_items, row_scores in zip(scores, items, item_scores):
            if score == float("-inf"):
                break
            for item, item_score in zip(row_items, row_scores):
                if item < 0 or item in banned or not bool(live[item]):
                    stats.invalid_paths += 1
                    continue
                if item in seen:
                    continue
                seen.add(item)
                value = score if req.mode == "items" else item_score
                out.append(RecItem(item, float(value), tuple(int(c) for c in snap.item_codes[item].tolist())))
                if len(out) == req.num_items:
                    return RecResult(out)
        return RecResult(out)
