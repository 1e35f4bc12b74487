"""Triton sparse Mixture-of-Experts SwiGLU FFN (inference): route, group, two grouped GEMMs, combine.

Pipeline, with no host synchronisation (every size the host needs is a worst case known from
shapes, and the device-side counts only steer programs that exit early):

1. ``_route_kernel``: router logits (``x @ W_r^T`` through ``tl.dot``, rounded to the input dtype
   as the PyTorch path does), softmax, top-k by repeated argmax, optional renormalisation.
2. Grouping, in the manner of vLLM's ``moe_align_block_size`` but written here, in three launches:
   per-chunk expert histograms; one program that turns them into per-chunk bases, block-padded
   expert starts, the expert of every row block and the padded total; and a stable scatter of the
   (token, expert) pair ids into expert order (rank within a chunk from a one-hot prefix sum). The
   grouped index buffer is allocated at its worst case ``T*k + E*(BLOCK_M-1)`` and pre-filled with
   the sentinel ``T*k``; row blocks past the padded total are marked -1 and their programs return.
3. ``_gate_up_kernel``: per row block (one expert) and column tile of f, both ``x W_gate`` and
   ``x W_up`` accumulate in float32 from the same A tile, and ``silu(g) * u`` is stored once.
4. ``_down_kernel``: ``h W_down`` per row block, scaled by the pair's gate weight and written to the
   pair's own row (deterministic; no atomics).
5. ``_combine_kernel``: each token sums its k pair rows back in token order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(
    x_ptr,
    w_ptr,
    weights_ptr,
    experts_ptr,
    T,
    D,
    E,
    stride_xt,
    stride_we,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    E_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < T
    ex = tl.arange(0, E_PAD)
    ex_ok = ex < E
    acc = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        xa = tl.load(x_ptr + tok[:, None] * stride_xt + dd[None, :], mask=tok_ok[:, None] & d_ok[None, :], other=0.0)
        wb = tl.load(w_ptr + ex[None, :] * stride_we + dd[:, None], mask=d_ok[:, None] & ex_ok[None, :], other=0.0)
        acc = tl.dot(xa, wb, acc, input_precision=DOT_PRECISION)
    logits = acc.to(x_ptr.dtype.element_ty).to(tl.float32)  # the PyTorch path rounds the product too
    logits = tl.where(ex_ok[None, :], logits, float("-inf"))
    probs = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = probs / tl.sum(probs, axis=1)[:, None]

    col = tl.arange(0, K_PAD)
    kept_w = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    kept_e = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(probs, axis=1)
        pick = tl.min(tl.where(probs == best[:, None], ex[None, :], E_PAD), axis=1)  # first maximum
        kept_w = tl.where(col[None, :] == j, best[:, None], kept_w)
        kept_e = tl.where(col[None, :] == j, pick[:, None], kept_e)
        probs = tl.where(ex[None, :] == pick[:, None], -1.0, probs)
    if RENORMALIZE:
        kept_w = kept_w / tl.sum(kept_w, axis=1)[:, None]
    out = tok[:, None] * TOP_K + col[None, :]
    out_ok = tok_ok[:, None] & (col[None, :] < TOP_K)
    tl.store(weights_ptr + out, kept_w, mask=out_ok)
    tl.store(experts_ptr + out, kept_e, mask=out_ok)


@triton.jit
def _count_kernel(experts_ptr, counts_ptr, n_pairs, CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    chunk = tl.program_id(0)
    i = chunk * CHUNK + tl.arange(0, CHUNK)
    e = tl.load(experts_ptr + i, mask=i < n_pairs, other=-1)
    ex = tl.arange(0, E_PAD)
    counts = tl.sum((e[:, None] == ex[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + chunk * E_PAD + ex, counts)


@triton.jit
def _layout_kernel(
    counts_ptr,
    num_chunks,
    E,
    chunk_base_ptr,
    expert_start_ptr,
    block_expert_ptr,
    num_padded_ptr,
    max_blocks,
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,
    C_PAD: tl.constexpr,
    NB: tl.constexpr,
):
    ex = tl.arange(0, E_PAD)
    ch = tl.arange(0, C_PAD)
    grid_off = ch[:, None] * E_PAD + ex[None, :]
    grid_ok = (ch[:, None] < num_chunks) & (ex[None, :] < E_PAD)
    counts = tl.load(counts_ptr + grid_off, mask=grid_ok, other=0)  # (chunks, experts)
    inclusive = tl.cumsum(counts, axis=0)
    tl.store(chunk_base_ptr + grid_off, inclusive - counts, mask=grid_ok)
    per_expert = tl.sum(counts, axis=0)
    padded = (per_expert + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    tl.store(expert_start_ptr + ex, end - padded)
    total = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, total)
    for b0 in range(0, max_blocks, NB):
        blk = b0 + tl.arange(0, NB)
        first_row = blk * BLOCK_M
        owner = tl.sum(((end[None, :] <= first_row[:, None]) & (ex[None, :] < E)).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blk, tl.where(first_row < total, owner, -1), mask=blk < max_blocks)


@triton.jit
def _scatter_kernel(
    experts_ptr,
    chunk_base_ptr,
    expert_start_ptr,
    sorted_ids_ptr,
    n_pairs,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
):
    chunk = tl.program_id(0)
    i = chunk * CHUNK + tl.arange(0, CHUNK)
    ok = i < n_pairs
    e = tl.load(experts_ptr + i, mask=ok, other=-1)
    onehot = (e[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # stable: token order within expert
    base = tl.load(chunk_base_ptr + chunk * E_PAD + e, mask=ok, other=0)
    base += tl.load(expert_start_ptr + e, mask=ok, other=0)
    tl.store(sorted_ids_ptr + base + rank, i, mask=ok)


@triton.jit
def _gate_up_kernel(
    x_ptr,
    wg_ptr,
    wu_ptr,
    h_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    n_pairs,
    D,
    F,
    stride_xt,
    stride_we,
    stride_wd,
    stride_hm,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(F, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + rows)
    row_ok = pair < n_pairs
    tok = (pair // TOP_K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    w_base = expert.to(tl.int64) * stride_we
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < D
        a = tl.load(x_ptr + tok[:, None] * stride_xt + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_off = w_base + kk[:, None] * stride_wd + cols[None, :]
        w_ok = k_ok[:, None] & col_ok[None, :]
        acc_g = tl.dot(a, tl.load(wg_ptr + w_off, mask=w_ok, other=0.0), acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, tl.load(wu_ptr + w_off, mask=w_ok, other=0.0), acc_u, input_precision=DOT_PRECISION)
    hidden = acc_g * tl.sigmoid(acc_g) * acc_u
    h_off = rows.to(tl.int64)[:, None] * stride_hm + cols[None, :]
    tl.store(h_ptr + h_off, hidden.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr,
    wd_ptr,
    y_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    pair_weight_ptr,
    n_pairs,
    F,
    D,
    stride_hm,
    stride_we,
    stride_wf,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(D, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + rows)
    row_ok = pair < n_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    w_base = expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < F
        a = tl.load(
            h_ptr + rows.to(tl.int64)[:, None] * stride_hm + kk[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            wd_ptr + w_base + kk[:, None] * stride_wf + cols[None, :],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    acc = acc * tl.load(pair_weight_ptr + pair, mask=row_ok, other=0.0)[:, None]
    y_off = pair.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptr + y_off, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(y_ptr, out_ptr, T, D, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = (tok < T)[:, None] & (dd < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (tok.to(tl.int64)[:, None] * TOP_K + j) * D + dd[None, :], mask=ok, other=0.0)
    tl.store(out_ptr + tok.to(tl.int64)[:, None] * D + dd[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


def _configs(tiles: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": kk}, num_warps=w, num_stages=s) for n, kk, w, s in tiles]


# (BLOCK_N, BLOCK_K, warps, stages) tried per (D, F, BLOCK_M) on CUDA: few, so warm-up tuning is short.
# The gate/up kernel holds two accumulators, so its tiles are narrower than the down kernel's.
_GATE_UP_TILES = [(64, 64, 4, 3), (64, 64, 8, 4), (128, 64, 8, 3), (64, 128, 4, 3), (128, 32, 4, 4)]
_DOWN_TILES = [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 4), (256, 64, 8, 3), (128, 128, 8, 3)]
_gate_up_tuned = triton.autotune(configs=_configs(_GATE_UP_TILES), key=["D", "F", "BLOCK_M"])(_gate_up_kernel)
_down_tuned = triton.autotune(configs=_configs(_DOWN_TILES), key=["F", "D", "BLOCK_M"])(_down_kernel)


def block_m_for(n_pairs: int, num_experts: int) -> int:
    """Row block of the grouped GEMMs (and the padding unit of the grouping) from the mean rows per expert."""
    mean_rows = n_pairs / max(1, num_experts)
    if mean_rows <= 32:
        return 16
    if mean_rows <= 256:
        return 32
    if mean_rows <= 2048:
        return 64
    return 128


def triton_route(
    x: torch.Tensor, router_weight: torch.Tensor, top_k: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate weights (T, k) float32 and expert ids (T, k) int32 of each token (see ``pt_route``)."""
    tokens, dim = x.shape
    num_experts = router_weight.shape[0]
    weights = torch.empty((tokens, top_k), dtype=torch.float32, device=x.device)
    experts = torch.empty((tokens, top_k), dtype=torch.int32, device=x.device)
    if tokens == 0:
        return weights, experts
    block_t = 32
    _route_kernel[(triton.cdiv(tokens, block_t),)](
        x,
        router_weight,
        weights,
        experts,
        tokens,
        dim,
        num_experts,
        x.stride(0),
        router_weight.stride(0),
        TOP_K=top_k,
        K_PAD=max(2, triton.next_power_of_2(top_k)),
        RENORMALIZE=renormalize,
        BLOCK_T=block_t,
        BLOCK_D=min(128, max(16, triton.next_power_of_2(dim))),
        E_PAD=max(16, triton.next_power_of_2(num_experts)),
        DOT_PRECISION=_dot_precision(x.dtype),
    )
    return weights, experts


def align_block_size(
    experts: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group flat pair ids by expert into ``block_m``-padded order, all on the device.

    experts: (P,) int32 expert of each pair -> (sorted_ids (P + E*(block_m-1),) int32 with sentinel P
    in padding, block_expert (blocks,) int32 (-1 past the padded total), num_padded (1,) int32).
    """
    n_pairs = experts.numel()
    device = experts.device
    capacity = n_pairs + num_experts * (block_m - 1)
    max_blocks = triton.cdiv(capacity, block_m)
    sorted_ids = torch.full((capacity,), n_pairs, dtype=torch.int32, device=device)
    block_expert = torch.empty((max_blocks,), dtype=torch.int32, device=device)
    num_padded = torch.empty((1,), dtype=torch.int32, device=device)
    e_pad = max(2, triton.next_power_of_2(num_experts))
    chunk = min(256, max(16, triton.next_power_of_2(triton.cdiv(n_pairs, 4))))
    num_chunks = max(1, triton.cdiv(n_pairs, chunk))
    counts = torch.empty((num_chunks, e_pad), dtype=torch.int32, device=device)
    chunk_base = torch.empty_like(counts)
    expert_start = torch.empty((e_pad,), dtype=torch.int32, device=device)
    _count_kernel[(num_chunks,)](experts, counts, n_pairs, CHUNK=chunk, E_PAD=e_pad)
    _layout_kernel[(1,)](
        counts,
        num_chunks,
        num_experts,
        chunk_base,
        expert_start,
        block_expert,
        num_padded,
        max_blocks,
        BLOCK_M=block_m,
        E_PAD=e_pad,
        C_PAD=max(2, triton.next_power_of_2(num_chunks)),
        NB=256,
        num_warps=8,
    )
    _scatter_kernel[(num_chunks,)](experts, chunk_base, expert_start, sorted_ids, n_pairs, CHUNK=chunk, E_PAD=e_pad)
    return sorted_ids, block_expert, num_padded


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact products (parity with PyTorch); half types use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def triton_moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    renormalize: bool = True,
) -> torch.Tensor:
    """See ``kernels.moe.moe``: the same function, for inference, in fp16/bf16 (or fp32) inputs."""
    tokens, dim = x.shape
    num_experts, _, ffn = w_gate.shape
    if tokens == 0:
        return torch.zeros_like(x)
    x, router_weight = x.contiguous(), router_weight.contiguous()
    w_gate, w_up, w_down = w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()
    weights, experts = triton_route(x, router_weight, top_k, renormalize)
    n_pairs = tokens * top_k
    block_m = block_m_for(n_pairs, num_experts)
    sorted_ids, block_expert, _ = align_block_size(experts.view(-1), num_experts, block_m)
    max_blocks = block_expert.numel()
    hidden = torch.empty((sorted_ids.numel(), ffn), dtype=x.dtype, device=x.device)
    pair_out = torch.empty((n_pairs, dim), dtype=torch.float32, device=x.device)
    precision = _dot_precision(x.dtype)
    tuned = x.is_cuda and x.dtype != torch.float32  # float32 (tests, CPU parity) keeps one tile
    gate_up = _gate_up_tuned if tuned else _gate_up_kernel
    down = _down_tuned if tuned else _down_kernel
    fixed = {} if tuned else {"BLOCK_N": 32, "BLOCK_K": 32}
    gate_up[lambda meta: (max_blocks * triton.cdiv(ffn, meta["BLOCK_N"]),)](
        x,
        w_gate,
        w_up,
        hidden,
        sorted_ids,
        block_expert,
        n_pairs,
        dim,
        ffn,
        x.stride(0),
        w_gate.stride(0),
        w_gate.stride(1),
        hidden.stride(0),
        TOP_K=top_k,
        BLOCK_M=block_m,
        DOT_PRECISION=precision,
        **fixed,
    )
    down[lambda meta: (max_blocks * triton.cdiv(dim, meta["BLOCK_N"]),)](
        hidden,
        w_down,
        pair_out,
        sorted_ids,
        block_expert,
        weights.view(-1),
        n_pairs,
        ffn,
        dim,
        hidden.stride(0),
        w_down.stride(0),
        w_down.stride(1),
        pair_out.stride(0),
        BLOCK_M=block_m,
        DOT_PRECISION=precision,
        **fixed,
    )
    out = torch.empty_like(x)
    block_t, block_d = 16, min(256, max(16, triton.next_power_of_2(dim)))
    _combine_kernel[(triton.cdiv(tokens, block_t), triton.cdiv(dim, block_d))](
        pair_out, out, tokens, dim, TOP_K=top_k, BLOCK_T=block_t, BLOCK_D=block_d
    )
    return out
