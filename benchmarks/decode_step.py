"""Ops and time per decode step: the batch-at-a-time search as it was, against StepSearch.

For the demo configuration (``onerec.build.demo_config()``) with random weights and a random catalogue,
at several row counts (session requests of beam 32, so rows / 32 requests), prints JSON with, per path:
- aten ops per decode step, counted with ``torch.profiler`` over every step but the first (the first
  step of StepSearch also admits and encodes the requests), both the ops called from Python
  ("top-level": what the dispatcher and the interpreter pay for) and all ops including nested ones;
- microseconds per decode step over the same steps: the median of this thread's CPU time (steady on
  a shared, oversubscribed machine, where wall time mostly measures waiting for a core) and the wall
  time's median and min; and the wall time of a whole search (encode and all m*D steps). The two
  paths' runs are interleaved so both see the same load.

The "legacy" path is a copy of ``Generator.search`` and ``OneRecModel.decode_step`` as they were
before StepSearch (two caches of (layers, R, H, T, dh) reordered separately, q and kv projections
apart, the RMSNorm spelled out, one head per step), kept here so both run side by side in one run.

    .venv/bin/python -m benchmarks.decode_step > benchmarks/results/decode_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from kernels.trie_topk import trie_topk
from onerec.build import demo_config
from onerec.generate import Generator, RecRequest, StepSearch
from onerec.model import OneRecModel
from onerec.trie import TrieIndex, TrieTensors


def build(n_items: int, seed: int) -> Generator:
    cfg = demo_config().model
    torch.manual_seed(seed)
    model = OneRecModel(cfg).eval()
    rng = np.random.default_rng(seed)
    space = np.prod(cfg.level_sizes)
    flat = rng.choice(space, n_items, replace=False)
    paths = np.stack(np.unravel_index(flat, cfg.level_sizes), 1)
    return Generator(model, TrieIndex(paths, cfg.level_sizes))


def requests_for(rows: int, beam: int, n_items: int, history: int, seed: int) -> list[RecRequest]:
    rng = np.random.default_rng(seed)
    return [
        RecRequest(
            history=rng.choice(n_items, history, replace=False).tolist(),
            num_items=10,
            mode="session",
            beam_width=beam,
            user_id=f"user{q}",
        )
        for q in range(rows // beam)
    ]


# ---- the legacy path (a copy of the code StepSearch replaced) ----------------------------------


def legacy_decode_step(
    model: OneRecModel, x: torch.Tensor, t: int, cross: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
    cache_k: torch.Tensor, cache_v: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    rows = x.shape[0]
    b = mask.shape[0]
    beams = rows // b
    for i, layer in enumerate(model.decoder):
        sa = layer.self_attn
        h = layer.n1(x)
        q = sa.q(h).view(rows, sa.h, 1, sa.dh)
        k, v = sa.kv(h).chunk(2, dim=-1)
        cache_k[i, :, :, t] = k.view(rows, sa.h, sa.dh)
        cache_v[i, :, :, t] = v.view(rows, sa.h, sa.dh)
        att = F.scaled_dot_product_attention(q, cache_k[i, :, :, : t + 1], cache_v[i, :, :, : t + 1])
        x = x + sa.o(att.reshape(rows, -1))
        ca = layer.cross_attn
        q = ca.q(layer.n2(x)).view(b, beams, ca.h, ca.dh).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, cross[i][0], cross[i][1], attn_mask=mask)
        x = x + ca.o(att.transpose(1, 2).reshape(rows, -1))
        x = x + layer.moe(layer.n3(x))
    return model.heads[t % model.cfg.depth](model.dec_norm(x))


def legacy_session_bans(
    gen: Generator, static_keys: torch.Tensor, session: torch.Tensor, q_of_row: torch.Tensor,
    req_keys: torch.Tensor, req_counts: torch.Tensor, snap: TrieTensors, q_n: int,
) -> torch.Tensor:  # fmt: skip
    rows, j = session.shape
    n_nodes = snap.num_nodes
    ok = session >= 0
    anc = snap.path_nodes[session.clamp(min=0)]
    same = (anc[:, :, None, :] == anc[:, None, :, :]) & ok[:, None, :, None]
    sess_cnt = same.sum(2)
    req_cnt = torch.zeros_like(sess_cnt)
    if req_keys.numel():
        keys = (1 + q_of_row)[:, None, None] * n_nodes + anc
        pos = torch.searchsorted(req_keys, keys).clamp_(max=req_keys.numel() - 1)
        hit = req_keys[pos] == keys
        cnt = req_counts[pos]
        req_cnt = torch.where(hit, torch.where(cnt >= 0, cnt, -cnt - 1), 0)
    remaining = snap.live_count[anc] - req_cnt - sess_cnt
    blocked = (remaining <= 0) & ok[:, :, None]
    row_ids = torch.arange(rows, device=gen.device)[:, None, None].expand_as(anc)
    keys = (1 + q_n + row_ids[blocked]) * n_nodes + anc[blocked]
    return torch.sort(torch.cat([static_keys, keys])).values


@torch.no_grad()
def legacy_search(
    gen: Generator, requests: list[RecRequest], snap: TrieTensors, slots: int, on_step: Any = None
) -> torch.Tensor:
    """``Generator.search`` before StepSearch (constrained path); on_step(t) is called before step t."""
    model, cfg = gen.model, gen.cfg
    widths = [gen._width(r) for r in requests]
    q_n, w = len(requests), max(widths)
    rows = q_n * w
    codes_in, hist_mask, users = gen._encoder_inputs(requests, snap)
    memory, mask = model.encode(codes_in, hist_mask, users)
    cross = [layer.cross_attn.project_kv(memory) for layer in model.decoder]
    dev, depth, n_nodes = gen.device, cfg.depth, snap.num_nodes
    width_mask = torch.arange(w, device=dev)[None, :] < torch.tensor(widths, device=dev)[:, None]
    req_keys, req_counts = gen._request_bans(requests, snap)
    static_keys = torch.cat([snap.dead_nodes, req_keys[req_counts >= 0]])
    banned = torch.sort(static_keys).values
    q_of_row = torch.arange(q_n, device=dev).repeat_interleave(w)
    row_groups = torch.stack([torch.zeros_like(q_of_row), 1 + q_of_row, 1 + q_n + torch.arange(rows, device=dev)], 1)
    scores = torch.full((q_n, w), float("-inf"), device=dev)
    scores[:, 0] = 0.0
    node = torch.zeros(rows, dtype=torch.int64, device=dev)
    valid = torch.ones(rows, dtype=torch.bool, device=dev)
    items = torch.full((rows, slots), -1, dtype=torch.int64, device=dev)
    item_scores = torch.zeros(rows, slots, device=dev)
    steps = slots * depth
    dh = cfg.d_model // cfg.n_heads
    ck, cv, ck_spare, cv_spare = (
        torch.zeros(cfg.n_decoder_layers, rows, cfg.n_heads, steps, dh, device=dev, dtype=gen.dtype) for _ in range(4)
    )
    prev_codes: torch.Tensor | None = None
    for t in range(steps):
        if on_step is not None:
            on_step(t)
        level, slot = t % depth, t // depth
        pos = model.dec_pos.weight[t]
        if t == 0 or prev_codes is None:
            x = (model.dec_start + pos).expand(rows, -1)
        else:
            x = model.dec_codes[(t - 1) % depth](prev_codes) + pos
        logits = legacy_decode_step(model, x, t, cross, mask, ck, cv)
        if slot > 0:
            banned = legacy_session_bans(gen, static_keys, items[:, :slot], q_of_row, req_keys, req_counts, snap, q_n)
        top = trie_topk(
            logits, node, snap.offsets, snap.child_codes, snap.child_nodes, w, banned, row_groups, n_nodes,
            at_root=level == 0,
        )  # fmt: skip
        values, codes, nodes = top.values, top.codes, top.nodes
        k = values.shape[1]
        cand = (scores.reshape(rows, 1) + values).reshape(q_n, w * k)
        best, pick = cand.topk(w, dim=1)
        best = best.masked_fill(~width_mask, float("-inf"))
        parent = (torch.arange(q_n, device=dev)[:, None] * w + pick // k).reshape(rows)
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
            items[:, slot] = torch.where(valid, snap.node_item[node.clamp(min=0)], -1)
            node = torch.where(valid, 0, -1)
    return items.view(q_n, w, slots)


# ---- measurement --------------------------------------------------------------------------------


def count_ops(prof: profile) -> tuple[int, int]:
    """(top-level aten ops, all aten ops) in a profile."""
    top = total = 0
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        total += 1
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        top += parent is None
    return top, total


class StepTimer:
    """Timestamps at the start of each step, and a profiler over steps 1.. (not the first)."""

    def __init__(self, profiled: bool) -> None:
        self.marks: list[float] = []
        self.cpu_marks: list[float] = []  # this thread's CPU time: steadier than wall time on a shared box
        self.prof = profile(activities=[ProfilerActivity.CPU]) if profiled else None

    def __call__(self, t: int) -> None:
        self.marks.append(time.perf_counter())
        self.cpu_marks.append(time.thread_time())
        if t == 1 and self.prof is not None:
            self.prof.start()

    def finish(self) -> None:
        self.marks.append(time.perf_counter())
        self.cpu_marks.append(time.thread_time())
        if self.prof is not None:
            self.prof.stop()

    def step_us(self) -> list[float]:
        return [(b - a) * 1e6 for a, b in zip(self.marks[1:-1], self.marks[2:])]  # steps 1..

    def step_cpu_us(self) -> list[float]:
        return [(b - a) * 1e6 for a, b in zip(self.cpu_marks[1:-1], self.cpu_marks[2:])]


def run_legacy(gen: Generator, reqs: list[RecRequest], profiled: bool) -> tuple[StepTimer, float]:
    timer = StepTimer(profiled)
    t0 = time.perf_counter()
    legacy_search(gen, reqs, gen.trie.tensors, gen.cfg.session_items, on_step=timer)
    timer.finish()
    return timer, time.perf_counter() - t0


def run_step_search(gen: Generator, reqs: list[RecRequest], profiled: bool) -> tuple[StepTimer, float]:
    timer = StepTimer(profiled)
    t0 = time.perf_counter()
    search = StepSearch(gen)
    for key, req in enumerate(reqs):
        search.add(key, req)
    t = 0
    while len(search):
        timer(t)
        search.step()
        t += 1
    timer.finish()
    return timer, time.perf_counter() - t0


def ops(runner: Any, gen: Generator, reqs: list[RecRequest]) -> dict[str, float]:
    runner(gen, reqs, False)  # warm
    timer, _ = runner(gen, reqs, True)
    assert timer.prof is not None
    steps = len(timer.marks) - 2  # profiled steps 1..
    top, total = count_ops(timer.prof)
    return {"aten_ops_per_step": round(top / steps, 1), "aten_ops_per_step_incl_nested": round(total / steps, 1)}


def timings(step_us: list[float], cpu_us: list[float], search_ms: list[float]) -> dict[str, float]:
    return {
        "median_cpu_us_per_step": round(statistics.median(cpu_us), 1),
        "median_us_per_step": round(statistics.median(step_us), 1),
        "min_us_per_step": round(min(step_us), 1),
        "median_search_ms": round(statistics.median(search_ms), 2),
        "min_search_ms": round(min(search_ms), 2),
    }


def compare(gen: Generator, reqs: list[RecRequest], reps: int) -> dict[str, dict[str, float]]:
    """Both paths, their runs interleaved so that both see the same load on a shared machine."""
    runners = {"legacy": run_legacy, "step_search": run_step_search}
    out = {name: ops(runner, gen, reqs) for name, runner in runners.items()}
    steps: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    searches: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(reps):
        for name, runner in runners.items():
            timer, seconds = runner(gen, reqs, False)
            steps[name] += timer.step_us()
            cpu[name] += timer.step_cpu_us()
            searches[name].append(seconds * 1e3)
    for name in runners:
        out[name].update(timings(steps[name], cpu[name], searches[name]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--beam", type=int, default=32)
    ap.add_argument("--items", type=int, default=4000, help="random catalogue size")
    ap.add_argument("--history", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = build(args.items, args.seed)
    out: list[dict[str, Any]] = []
    for rows in args.rows:
        reqs = requests_for(rows, args.beam, args.items, args.history, args.seed + rows)
        both = compare(gen, reqs, args.reps)
        legacy, step = both["legacy"], both["step_search"]
        out.append(
            {
                "rows": rows,
                "requests": len(reqs),
                "legacy": legacy,
                "step_search": step,
                "speedup_per_step_cpu": round(legacy["median_cpu_us_per_step"] / step["median_cpu_us_per_step"], 2),
                "speedup_per_step_wall_median": round(legacy["median_us_per_step"] / step["median_us_per_step"], 2),
                "speedup_per_step_wall_min": round(legacy["min_us_per_step"] / step["min_us_per_step"], 2),
            }
        )
    cfg = gen.cfg
    print(
        json.dumps(
            {
                "what": "decode step of the session-mode beam search, old batch-at-a-time Generator.search "
                "(copied here) vs StepSearch; ops counted with torch.profiler over steps 1..m*D-1",
                "config": {
                    "model": "demo_config (random weights)",
                    "d_model": cfg.d_model,
                    "decoder_layers": cfg.n_decoder_layers,
                    "experts": cfg.n_experts,
                    "level_sizes": cfg.level_sizes,
                    "session_items": cfg.session_items,
                    "catalogue_items": args.items,
                    "history": args.history,
                    "beam": args.beam,
                    "mode": "session",
                },
                "host": {
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(),
                    "env_OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                },
                "results": out,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
