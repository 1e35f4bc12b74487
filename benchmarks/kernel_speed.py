"""Kernel benchmark: each Triton kernel against its PyTorch twin and the obvious alternatives.

Prints one JSON report (and writes it with ``--out``). On a machine without CUDA the GPU section
says it was not run and the PyTorch kernels are timed at small shapes on the CPU.

    python -m benchmarks.kernel_speed [--quick] [--tune] [--out FILE]

trie_topk (one beam-search step; rows = batch x beam, all at the dense root or all at deep nodes):
  triton         kernels.triton.triton_trie_topk (children only, nothing rows x V written)
  torch          kernels.pytorch.pt_trie_topk (the twin: rows x C gathers, searchsorted, topk)
  masked_topk    full-vocabulary masked logits + log_softmax + torch.topk, the (rows, V) bool mask
                 given for free (mask construction is not timed: an optimistic bound)
  bitmask_topk   xgrammar-style: a packed int32 bitmask (given for free) expanded by a Triton kernel
                 into a rows x V -inf-filled copy, then log_softmax + torch.topk
moe (top-2, f = 2d, fp16 as the generator serves on CUDA):
  triton         kernels.triton.triton_moe (route, align, grouped SwiGLU GEMMs, combine)
  torch          kernels.pytorch.pt_moe (the twin: argsort grouping, one GEMM chain per expert)
  per_expert     the classic loop: boolean mask per expert, gather, GEMMs, index_add
  dense          every expert on every token (batched GEMMs), combined with the sparse gates

Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). Effective
GB/s counts the bytes a kernel must move (the rows' child logits, the outputs); TFLOP/s counts the
useful expert FLOPs (6 * tokens * top_k * d * f). Ratios are alternative time / Triton time.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.kernel_cases import MoECase, TrieCase, build_moe_case, serving_trie_step
from benchmarks.report import emit
from kernels.pytorch.pt_moe import pt_moe, pt_route
from kernels.pytorch.pt_trie_topk import banned_mask, pt_trie_topk

# Datasheet peaks (dense, no sparsity) by device-name substring.
PEAKS = {
    "H200": {"hbm_GBps": 4800.0, "fp16_bf16_dense_TFLOPs": 989.0},
    "H100": {"hbm_GBps": 3350.0, "fp16_bf16_dense_TFLOPs": 989.0},
    "A100": {"hbm_GBps": 2039.0, "fp16_bf16_dense_TFLOPs": 312.0},
}


def peaks_for(name: str) -> dict[str, float] | None:
    for key, peak in PEAKS.items():
        if key in name:
            return peak
    return None


# ---- full-vocabulary alternatives to trie_topk ------------------------------------------------


def allowed_mask(case: TrieCase) -> torch.Tensor:
    """(rows, V) bool of allowed codes, built once (not timed) for the full-vocabulary alternatives."""
    logits, node, offsets, child_codes, child_nodes, _, banned, row_groups, num_nodes = case.args()
    rows, vocab = logits.shape
    start = offsets[node]
    count = offsets[node + 1] - start
    steps = torch.arange(int(count.max()), device=logits.device)
    edge = (start[:, None] + steps[None, :]).clamp(max=child_codes.numel() - 1)
    ok = (steps[None, :] < count[:, None]) & ~banned_mask(child_nodes[edge], banned, row_groups, num_nodes)
    mask = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=logits.device)
    mask.scatter_(1, torch.where(ok, child_codes[edge], vocab), True)
    return mask[:, :vocab].contiguous()


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """(rows, V) bool -> (rows, ceil(V/32)) int32, bit j of word w = code 32w + j allowed."""
    rows, vocab = mask.shape
    words = math.ceil(vocab / 32)
    padded = torch.zeros(rows, words * 32, dtype=torch.int64, device=mask.device)
    padded[:, :vocab] = mask.to(torch.int64)
    weights = (2 ** torch.arange(32, device=mask.device, dtype=torch.int64))[None, None, :]
    packed = (padded.view(rows, words, 32) * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _bitmask_fill_kernel():  # built lazily: triton is only needed on the GPU path
    import triton
    import triton.language as tl

    @triton.jit
    def fill(logits_ptr, bitmask_ptr, out_ptr, vocab, words, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = col < vocab
        word = tl.load(bitmask_ptr + row * words + col // 32, mask=ok, other=0)
        bit = (word >> (col % 32)) & 1
        x = tl.load(logits_ptr + row * vocab + col, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * vocab + col, tl.where(bit != 0, x, float("-inf")), mask=ok)

    return fill


# ---- moe alternatives ----------------------------------------------------------------------------


def moe_per_expert(x, router, w_gate, w_up, w_down, top_k, renormalize=True):  # type: ignore[no-untyped-def]
    weights, experts = pt_route(x, router, top_k, renormalize)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(router.shape[0]):
        tok, slot = torch.where(experts == e)
        rows = x[tok]
        hidden = F.silu(rows @ w_gate[e]) * (rows @ w_up[e])
        out.index_add_(0, tok, (hidden @ w_down[e]).float() * weights[tok, slot, None])
    return out.to(x.dtype)


def moe_dense(x, router, w_gate, w_up, w_down, top_k, renormalize=True):  # type: ignore[no-untyped-def]
    weights, experts = pt_route(x, router, top_k, renormalize)
    gates = torch.zeros(x.shape[0], router.shape[0], device=x.device).scatter_(1, experts, weights)
    hidden = F.silu(torch.matmul(x, w_gate)) * torch.matmul(x, w_up)  # (E, T, f)
    y = torch.matmul(hidden, w_down)  # (E, T, d)
    return torch.einsum("te,etd->td", gates.to(x.dtype), y)


def moe_inputs(tokens: int, dim: int, experts: int, dtype: torch.dtype, device: str = "cuda") -> MoECase:
    """Top-2 routing, f = 2d: the shape the generator's decoder runs."""
    return build_moe_case(tokens + dim + experts, tokens, dim, 2 * dim, experts, 2, dtype=dtype, device=device)


# ---- timing --------------------------------------------------------------------------------------


def gpu_ms(fn: Callable[[], Any], quick: bool) -> float:
    import triton

    return float(
        triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median")
    )


def cpu_ms(fn: Callable[[], Any], reps: int = 5, inner: int = 1) -> float:
    """Median over ``reps`` of the mean time of ``inner`` back-to-back calls (sub-ms ops need inner > 1)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(times)


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def trie_row(rows: int, vocab: int, scenario: str, k: int, quick: bool, peak: dict[str, float] | None) -> dict:
    """Time one trie_topk shape: the kernel, its twin and the two full-vocabulary alternatives."""
    from kernels.triton.triton_trie_topk import triton_trie_topk

    fill = _bitmask_fill_kernel()
    case, children = serving_trie_step(rows, vocab, scenario, k)
    args = case.args()
    logits = case.logits
    mask = allowed_mask(case)
    bitmask = pack_bitmask(mask)
    filled = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    words = bitmask.shape[1]

    def masked_topk() -> Any:
        return torch.log_softmax(logits.float().masked_fill(~mask, float("-inf")), dim=1).topk(k, dim=1)

    def bitmask_topk() -> Any:
        fill[(rows, math.ceil(vocab / 1024))](logits, bitmask, filled, vocab, words, BLOCK=1024)
        return torch.log_softmax(filled, dim=1).topk(k, dim=1)

    times = {
        "triton": gpu_ms(lambda: triton_trie_topk(*args), quick),
        "torch": gpu_ms(lambda: pt_trie_topk(*args), quick),
        "masked_topk": gpu_ms(masked_topk, quick),
        "bitmask_topk": gpu_ms(bitmask_topk, quick),
    }
    useful_bytes = rows * (children * logits.element_size() + k * 20)
    gbps = useful_bytes / (times["triton"] * 1e-3) / 1e9
    row: dict[str, Any] = {"rows": rows, "vocab": vocab, "scenario": scenario, "children_per_row": children}
    row.update({"k": k, "logits": str(logits.dtype)})
    row.update({f"{name}_ms": t for name, t in times.items()})
    row["triton_effective_GBps"] = gbps
    if peak:
        row["triton_pct_hbm_peak"] = 100 * gbps / peak["hbm_GBps"]
    row.update({f"speedup_vs_{name}": t / times["triton"] for name, t in times.items() if name != "triton"})
    return _rounded(row)


def bench_trie(quick: bool, peak: dict[str, float] | None) -> list[dict[str, Any]]:
    all_rows = (256, 4096) if quick else (256, 4096, 65536)
    vocabs = (256, 8192) if quick else (256, 1024, 8192)
    shapes = [(r, v, s, 32) for r in all_rows for v in vocabs for s in ("root", "deep")]
    shapes += [(4096, 8192, "root", 512)]
    out = []
    for rows, vocab, scenario, k in shapes:
        out.append(trie_row(rows, vocab, scenario, k, quick, peak))
        print(json.dumps(out[-1]), file=sys.stderr)
        torch.cuda.empty_cache()
    return out


def moe_row(tokens: int, experts: int, dim: int, quick: bool, peak: dict[str, float] | None) -> dict:
    """Time one moe shape: the kernel, its twin, the per-expert loop and dense all-experts."""
    from kernels.triton.triton_moe import triton_moe

    dtype = torch.float16
    case = moe_inputs(tokens, dim, experts, dtype)
    args = case.args()
    ffn, top_k = 2 * dim, case.top_k
    impls: dict[str, Callable[[], Any]] = {
        "triton": lambda: triton_moe(*args),
        "torch": lambda: pt_moe(*args),
        "per_expert": lambda: moe_per_expert(*args),
    }
    if 3 * experts * tokens * max(ffn, dim) * 2 < 12 * 2**30:  # dense all-experts intermediates fit
        impls["dense"] = lambda: moe_dense(*args)
    times = {name: gpu_ms(fn, quick) for name, fn in impls.items()}
    flops = 6.0 * tokens * top_k * dim * ffn
    row: dict[str, Any] = {"tokens": tokens, "experts": experts, "top_k": top_k, "d": dim, "f": ffn}
    row["dtype"] = str(dtype)
    row.update({f"{name}_ms": t for name, t in times.items()})
    row["triton_TFLOPs"] = flops / (times["triton"] * 1e-3) / 1e12
    row["torch_TFLOPs"] = flops / (times["torch"] * 1e-3) / 1e12
    if peak:
        row["triton_pct_tensor_peak"] = 100 * row["triton_TFLOPs"] / peak["fp16_bf16_dense_TFLOPs"]
    row.update({f"speedup_vs_{name}": t / times["triton"] for name, t in times.items() if name != "triton"})
    return _rounded(row)


def bench_moe(quick: bool, peak: dict[str, float] | None) -> list[dict[str, Any]]:
    all_tokens = (256, 4096) if quick else (256, 4096, 65536)
    grid = [
        (t, e, d)
        for t in all_tokens
        for e in ((8,) if quick else (8, 24))
        for d in ((512,) if quick else (128, 512, 1024))
    ]
    out = []
    for tokens, experts, dim in grid:
        out.append(moe_row(tokens, experts, dim, quick, peak))
        print(json.dumps(out[-1]), file=sys.stderr)
        torch.cuda.empty_cache()
    return out


def tune_trie_warps(quick: bool) -> list[dict[str, Any]]:
    """num_warps sweep of the trie kernel per wide block (feeds default_num_warps)."""
    from kernels.triton.triton_trie_topk import triton_trie_topk

    out = []
    for vocab in (256, 1024, 8192):
        for scenario in ("root", "deep"):
            args = serving_trie_step(4096, vocab, scenario, 32)[0].args()
            times = {
                f"warps_{w}_ms": gpu_ms(lambda a=args, w=w: triton_trie_topk(*a, num_warps=w), quick)
                for w in (2, 4, 8, 16)
            }
            out.append(_rounded({"rows": 4096, "vocab": vocab, "scenario": scenario, **times}))
            print(json.dumps(out[-1]), file=sys.stderr)
    return out


def measured_copy_GBps() -> float:
    """Device-to-device copy bandwidth (bytes read + written), the practical HBM ceiling."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = gpu_ms(lambda: dst.copy_(src), quick=False)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def cpu_moe_rows(quick: bool) -> list[dict[str, Any]]:
    """The CPU production path (grouped) against dense all-experts, at decode shapes (rows = batch x beam).

    Dense does E/k times the FLOPs but skips the sort, gather and scatter; this says where, if anywhere,
    that pays on CPU. Shapes: the demo model's decoder FFN (d 64, 4 experts) and the Beauty config's (d 128, 8).
    """
    rows = []
    for dim, experts in ((64, 4), (128, 8)):
        for tokens in (32, 2048) if quick else (32, 160, 640, 2048):
            args = moe_inputs(tokens, dim, experts, torch.float32, device="cpu").args()
            inner = max(1, 2048 // tokens) * (1 if quick else 4)
            grouped = cpu_ms(lambda args=args: pt_moe(*args), inner=inner)
            dense = cpu_ms(lambda args=args: moe_dense(*args), inner=inner)
            rows.append(
                _rounded(
                    {"tokens": tokens, "dim": dim, "ffn": 2 * dim, "experts": experts, "top_k": 2,
                     "grouped_ms": grouped, "dense_ms": dense, "grouped_over_dense": grouped / dense}
                )
            )  # fmt: skip
    return rows


def cpu_section(quick: bool = False) -> dict[str, Any]:
    trie_args = serving_trie_step(256, 256, "root", 32, dtype=torch.float32, device="cpu")[0].args()
    moe_args = moe_inputs(256, 128, 8, torch.float32, device="cpu").args()
    return {
        "pt_trie_topk_rows256_V256_k32_ms": round(cpu_ms(lambda: pt_trie_topk(*trie_args)), 3),
        "pt_moe_T256_d128_E8_top2_ms": round(cpu_ms(lambda: pt_moe(*moe_args)), 3),
        "moe_grouped_vs_dense": cpu_moe_rows(quick),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--tune", action="store_true", help="also sweep the trie kernel's num_warps")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    parser.add_argument("--only", choices=["trie_topk", "moe"], help="run one kernel's GPU section")
    opts = parser.parse_args(argv)
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "quick": opts.quick,
        "cpu": cpu_section(opts.quick),
    }
    if not torch.cuda.is_available():
        report["gpu"] = {"run": False, "reason": "CUDA is not available on this machine"}
    else:
        import triton

        name = torch.cuda.get_device_name()
        peak = peaks_for(name)
        report["gpu"] = {
            "run": True,
            "device": name,
            "triton": triton.__version__,
            "datasheet_peaks": peak,
            "measured_copy_GBps": round(measured_copy_GBps(), 1),
        }
        if opts.only != "moe":
            report["gpu"]["trie_topk"] = bench_trie(opts.quick, peak)
        if opts.only != "trie_topk":
            report["gpu"]["moe"] = bench_moe(opts.quick, peak)
        if opts.tune:
            report["gpu"]["trie_warps_sweep"] = tune_trie_warps(opts.quick)
    emit(report, opts.out)
    return report


if __name__ == "__main__":
    main()
