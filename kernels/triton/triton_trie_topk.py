"""Triton trie-constrained log-softmax + top-k: one (request, beam) row at a time per program.

Why this shape: a row only ever needs the children of its trie node (a CSR slice), so the kernel
gathers those logits straight into registers, masks banned children there, and never writes a
``rows x V`` tensor (the xgrammar-style alternative fills a full row of ``-inf`` in place and then
runs a full-vocabulary top-k). Per row:

1. Children ``offsets[n]:offsets[n+1]`` are loaded as one register block. Two block widths are
   compiled into one kernel and each row picks one by its child count: a narrow block (<= 256) for
   deep nodes, and a wide block (the level's vocabulary, up to 8192) for the dense root.
2. Bans: for all of the row's G groups at once, vectorised lower bounds find the window of
   ``banned_keys`` that can hit this node's children (``group*num_nodes + [min child, max child]``):
   a fence of every s-th key, loaded once per program into registers, narrows each bound to one
   segment, and a few binary-search steps finish it (a scalar search per group was ~100 dependent
   global loads per row and made the kernel latency-bound). Children are then looked up by a
   vectorised binary search inside the window only, which is empty for most rows (breadth-first
   node ids make a node's children a narrow id range).
3. Log-sum-exp over the allowed children (max, then sum of exp), in float32.
4. Top-k on int64 sort keys (order-preserving integer image of the logit in the high word, child
   position in the low word, so a key carries its child and its value):
   - narrow block: a bitonic ``tl.sort`` of the whole block; the first k are the answer;
   - wide block (dense root): the k-th best of 2k group maxima is a lower bound of the k-th best
     child, so only children at or above it can place; those candidates (about k for unstructured
     logits) are compacted into a per-program scratch row of ``CAND`` keys and sorted there. When
     the bound is weak (more than ``CAND`` candidates, e.g. logits sorted by code) a 32-step radix
     select on the keys picks exactly k instead.
   The kernel is persistent (a few programs per SM looping over rows), so the scratch is
   ``programs x CAND`` keys, not ``rows x V``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The widest child block compiled for the dense level: the kernel takes vocabularies up to this many
# codes (``kernels.trie_topk.trie_topk_backend`` sends wider ones to PyTorch).
MAX_BLOCK = 16384
# Child block for narrow (deep) nodes; rows whose node has more children use the wide block.
NARROW_BLOCK = 256

INT32_MIN = tl.constexpr(-2147483648)
INT64_MAX = tl.constexpr(9223372036854775807)
INT64_MIN = tl.constexpr(-9223372036854775808)


@triton.jit
def _lower_bounds(banned_ptr, num_banned, fences, stride, seg_steps, queries):
    """Vectorised lower_bound of each query in the sorted banned[0:num_banned].

    ``fences`` (every ``stride``-th key, held in registers by the program) place each query in one
    segment with no memory traffic; ``seg_steps`` binary-search steps finish inside the segment.
    This replaces ~log2(B) dependent global loads per query, which made row programs latency-bound.
    """
    n_less = tl.sum((fences[None, :] < queries[:, None]).to(tl.int32), axis=1)
    lo = tl.where(n_less == 0, 0, (n_less - 1) * stride + 1)
    hi = tl.minimum(n_less * stride, num_banned)
    for _ in range(seg_steps):
        active = lo < hi
        mid = (lo + hi) // 2
        key = tl.load(banned_ptr + mid, mask=active, other=0)
        go_right = active & (key < queries)
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right | ~active, hi, mid)
    return lo


@triton.jit
def _steps_for(span):
    """Binary-search steps that settle any query over ``span`` keys: floor(log2(span)) + 1."""
    steps = span * 0
    while span > 0:
        span = span // 2
        steps += 1
    return steps


@triton.jit
def _member(keys_ptr, lo, hi, query, valid):
    """Vectorised membership of ``query`` (block, int64) in the sorted keys[lo:hi] (int32 cursors)."""
    left = tl.zeros(query.shape, dtype=tl.int32) + lo.to(tl.int32)
    right = tl.zeros(query.shape, dtype=tl.int32) + hi.to(tl.int32)
    for _ in range(_steps_for(hi - lo)):
        active = left < right
        mid = (left + right) // 2
        key = tl.load(keys_ptr + mid, mask=active & valid, other=0)
        go_right = active & (key < query)
        left = tl.where(go_right, mid + 1, left)
        right = tl.where(go_right | ~active, right, mid)
    inside = valid & (left < hi)
    return inside & (tl.load(keys_ptr + left, mask=inside, other=0) == query)


@triton.jit
def _allowed_children(
    row,
    edge,
    inside,
    child_nodes_ptr,
    banned_ptr,
    num_banned,
    fences,
    stride,
    seg_steps,
    groups_ptr,
    stride_gr,
    num_groups,
    num_nodes,
    G_PAD: tl.constexpr,
):
    """``inside`` minus the children banned for any of the row's groups (child ids read only here)."""
    allowed = inside
    if num_banned > 0:
        nodes = tl.load(child_nodes_ptr + edge, mask=inside, other=0)
        lowest = tl.min(tl.where(inside, nodes, INT64_MAX), axis=0)
        highest = tl.max(tl.where(inside, nodes, -1), axis=0)
        gi = tl.arange(0, G_PAD)
        g_ok = gi < num_groups
        base = tl.load(groups_ptr + row * stride_gr + gi, mask=g_ok, other=0) * num_nodes
        lo = _lower_bounds(banned_ptr, num_banned, fences, stride, seg_steps, base + lowest)
        hi = _lower_bounds(banned_ptr, num_banned, fences, stride, seg_steps, base + highest + 1)
        hi = tl.where(g_ok, hi, lo)  # padding groups: empty windows
        if tl.sum(hi - lo, axis=0) > 0:
            for g in range(num_groups):
                lo_g = tl.sum(tl.where(gi == g, lo, 0), axis=0)
                hi_g = tl.sum(tl.where(gi == g, hi, 0), axis=0)
                if hi_g > lo_g:
                    base_g = tl.sum(tl.where(gi == g, base, 0), axis=0)
                    allowed = allowed & ~_member(banned_ptr, lo_g, hi_g, base_g + nodes, inside)
    return allowed


@triton.jit
def _pack(x, allowed, pos, BLOCK: tl.constexpr):
    """int64 sort keys: order-preserving image of x in the high word, BLOCK-1-pos in the low word
    (ties go to the earlier child); INT64_MIN for children that are not allowed."""
    bits = x.to(tl.int32, bitcast=True)
    skey = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    packed = (skey.to(tl.int64) << 32) | (BLOCK - 1 - pos).to(tl.int64)
    return tl.where(allowed, packed, INT64_MIN)


@triton.jit
def _radix_top(packed, k):
    """Mask of exactly k best keys (first ties kept) by a 32-step radix select on the high word."""
    skey = (packed >> 32).to(tl.int32)
    ukey = (skey ^ INT32_MIN).to(tl.uint32, bitcast=True)  # 0 for INT64_MIN lanes
    thr = tl.zeros([], dtype=tl.uint32)
    bit = tl.full([], 0x80000000, dtype=tl.uint32)
    for _ in range(32):
        cand = thr | bit
        count = tl.sum((ukey >= cand).to(tl.int32), axis=0)
        thr = tl.where(count >= k, cand, thr)
        bit = bit >> 1
    above = ukey > thr
    tied = ukey == thr
    room = k - tl.sum(above.to(tl.int32), axis=0)
    return above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= room))


@triton.jit
def _write_sorted(
    top,
    out_off,
    start,
    lse,
    k,
    child_codes_ptr,
    child_nodes_ptr,
    out_values_ptr,
    out_codes_ptr,
    out_nodes_ptr,
    BLOCK: tl.constexpr,
    LENGTH: tl.constexpr,
):
    """Store the first k of ``top`` (packed keys, best first) as log-probs, codes and child nodes."""
    j = tl.arange(0, LENGTH)
    skey = (top >> 32).to(tl.int32)
    x = (skey ^ ((skey >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    pos = (BLOCK - 1) - (top & 0x7FFFFFFF)
    alive = (top != INT64_MIN) & (x > float("-inf"))
    keep = j < k
    code = tl.load(child_codes_ptr + start + pos, mask=alive, other=-1)
    child = tl.load(child_nodes_ptr + start + pos, mask=alive, other=-1)
    tl.store(out_values_ptr + out_off + j, tl.where(alive, x - lse, float("-inf")), mask=keep)
    tl.store(out_codes_ptr + out_off + j, code, mask=keep)
    tl.store(out_nodes_ptr + out_off + j, child, mask=keep)


@triton.jit
def _row_topk(
    row,
    start,
    count,
    logits_ptr,
    stride_lr,
    child_codes_ptr,
    child_nodes_ptr,
    banned_ptr,
    num_banned,
    fences,
    stride,
    seg_steps,
    groups_ptr,
    stride_gr,
    num_groups,
    num_nodes,
    k,
    out_values_ptr,
    out_codes_ptr,
    out_nodes_ptr,
    scratch_ptr,
    BLOCK: tl.constexpr,
    K_PAD: tl.constexpr,
    DIRECT: tl.constexpr,
    GROUPS: tl.constexpr,
    CAND: tl.constexpr,
    G_PAD: tl.constexpr,
):
    pos = tl.arange(0, BLOCK)
    inside = pos < count
    allowed = _allowed_children(
        row, start + pos, inside, child_nodes_ptr, banned_ptr, num_banned, fences, stride, seg_steps,
        groups_ptr, stride_gr, num_groups, num_nodes, G_PAD,
    )  # fmt: skip
    codes = tl.load(child_codes_ptr + start + pos, mask=allowed, other=0)
    x = tl.load(logits_ptr + row * stride_lr + codes, mask=allowed, other=float("-inf")).to(tl.float32)

    # log-sum-exp over the allowed children; a row whose allowed logits are all -inf keeps lse 0
    top = tl.max(x, axis=0)
    finite_top = top > float("-inf")
    shift = tl.where(finite_top, top, 0.0)
    total = tl.sum(tl.where(allowed, tl.exp(x - shift), 0.0), axis=0)
    lse = tl.where(finite_top, shift + tl.log(tl.where(finite_top, total, 1.0)), 0.0)

    packed = _pack(x, allowed, pos, BLOCK)
    out_off = row * k
    if DIRECT:
        # narrow node: sort every child (bitonic, in registers), keep the first k
        ranked = tl.sort(packed, descending=True)
        _write_sorted(
            ranked, out_off, start, lse, k, child_codes_ptr, child_nodes_ptr,
            out_values_ptr, out_codes_ptr, out_nodes_ptr, BLOCK, BLOCK,
        )  # fmt: skip
        if K_PAD > BLOCK:  # k wider than the block: the tail is always empty
            tail = tl.arange(0, K_PAD)
            fill = (tail >= BLOCK) & (tail < k)
            tl.store(out_values_ptr + out_off + tail, tl.full([K_PAD], float("-inf"), tl.float32), mask=fill)
            tl.store(out_codes_ptr + out_off + tail, tl.full([K_PAD], -1, tl.int64), mask=fill)
            tl.store(out_nodes_ptr + out_off + tail, tl.full([K_PAD], -1, tl.int64), mask=fill)
    else:
        # wide node: the k-th best of GROUPS group maxima bounds the k-th best child from below, so
        # only children at or above it can make the top k; they are few, unless the data is adverse,
        # in which case a radix select picks exactly k.
        group_max = tl.max(tl.reshape(packed, [GROUPS, BLOCK // GROUPS]), axis=1)
        ranked_max = tl.sort(group_max, descending=True)
        bound = tl.max(tl.where(tl.arange(0, GROUPS) == k - 1, ranked_max, INT64_MIN), axis=0)
        chosen = (packed >= bound) & (packed > INT64_MIN)
        if tl.sum(chosen.to(tl.int32), axis=0) > CAND:
            chosen = _radix_top(packed, k)
        n_chosen = tl.sum(chosen.to(tl.int32), axis=0)
        slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        tl.store(scratch_ptr + slot, packed, mask=chosen)
        tl.debug_barrier()
        lane = tl.arange(0, CAND)
        picked = tl.load(scratch_ptr + lane, mask=lane < n_chosen, other=INT64_MIN)
        tl.debug_barrier()  # the scratch row is rewritten by this program's next row
        ranked = tl.sort(picked, descending=True)
        _write_sorted(
            ranked, out_off, start, lse, k, child_codes_ptr, child_nodes_ptr,
            out_values_ptr, out_codes_ptr, out_nodes_ptr, BLOCK, CAND,
        )  # fmt: skip


@triton.jit
def _trie_topk_kernel(
    logits_ptr,
    stride_lr,
    num_rows,
    node_ptr,
    offsets_ptr,
    num_offsets,
    child_codes_ptr,
    child_nodes_ptr,
    banned_ptr,
    num_banned,
    fences_ptr,
    num_fences,
    stride,
    seg_steps,
    groups_ptr,
    stride_gr,
    num_groups,
    num_nodes,
    k,
    out_values_ptr,
    out_codes_ptr,
    out_nodes_ptr,
    scratch_ptr,
    NARROW: tl.constexpr,
    WIDE: tl.constexpr,
    K_PAD: tl.constexpr,
    GROUPS: tl.constexpr,
    CAND: tl.constexpr,
    G_PAD: tl.constexpr,
    FENCE: tl.constexpr,
):
    """Persistent: program p takes rows p, p + P, ... and owns scratch row p (CAND keys)."""
    pid = tl.program_id(0)
    scratch = scratch_ptr + pid.to(tl.int64) * CAND
    fi = tl.arange(0, FENCE)
    fences = tl.load(fences_ptr + fi, mask=fi < num_fences, other=INT64_MAX)
    for r in range(pid, num_rows, tl.num_programs(0)):
        row = tl.zeros([], dtype=tl.int64) + r
        node = tl.load(node_ptr + row)
        live = (node >= 0) & (node + 1 < num_offsets)
        start = tl.load(offsets_ptr + node, mask=live, other=0)
        count = tl.load(offsets_ptr + node + 1, mask=live, other=0) - start
        if WIDE > NARROW:
            if count <= NARROW:
                _row_topk(
                    row, start, count, logits_ptr, stride_lr, child_codes_ptr, child_nodes_ptr, banned_ptr,
                    num_banned, fences, stride, seg_steps, groups_ptr, stride_gr, num_groups, num_nodes, k,
                    out_values_ptr, out_codes_ptr, out_nodes_ptr, scratch,
                    BLOCK=NARROW, K_PAD=K_PAD, DIRECT=True, GROUPS=GROUPS, CAND=CAND, G_PAD=G_PAD,
                )  # fmt: skip
            else:
                _row_topk(
                    row, start, count, logits_ptr, stride_lr, child_codes_ptr, child_nodes_ptr, banned_ptr,
                    num_banned, fences, stride, seg_steps, groups_ptr, stride_gr, num_groups, num_nodes, k,
                    out_values_ptr, out_codes_ptr, out_nodes_ptr, scratch,
                    BLOCK=WIDE, K_PAD=K_PAD, DIRECT=False, GROUPS=GROUPS, CAND=CAND, G_PAD=G_PAD,
                )  # fmt: skip
        else:
            _row_topk(
                row, start, count, logits_ptr, stride_lr, child_codes_ptr, child_nodes_ptr, banned_ptr,
                num_banned, fences, stride, seg_steps, groups_ptr, stride_gr, num_groups, num_nodes, k,
                out_values_ptr, out_codes_ptr, out_nodes_ptr, scratch,
                BLOCK=NARROW, K_PAD=K_PAD, DIRECT=True, GROUPS=GROUPS, CAND=CAND, G_PAD=G_PAD,
            )  # fmt: skip


def block_widths(vocab: int) -> tuple[int, int]:
    """(narrow, wide) child blocks for a level of ``vocab`` codes: a node has at most vocab children."""
    wide = max(16, triton.next_power_of_2(vocab))
    return min(NARROW_BLOCK, wide), wide


def wide_path_sizes(wide: int, k_pad: int) -> tuple[int, int]:
    """(GROUPS, CAND) of the wide path: 2k group maxima give the bound; room for 4k candidates."""
    groups = min(wide // 2, max(2, 2 * k_pad))
    cand = min(wide, max(256, 4 * k_pad))
    return groups, cand


def default_num_warps(narrow: int, wide: int) -> int:
    """Warps per program (H100 sweep in benchmarks/kernel_speed.py): narrow rows favour few warps, the
    dense 8192-wide root more; 8 is the compromise for wide levels, whose deep rows share the launch."""
    return 2 if wide <= 1024 else 8


_SM_COUNT: dict[int, int] = {}


def _num_programs(rows: int, device: torch.device, num_warps: int) -> int:
    """Persistent grid: a few programs per SM (rows loop inside); small under the interpreter."""
    if device.type != "cuda":
        return min(rows, 3)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return min(rows, _SM_COUNT[index] * max(1, 64 // num_warps))


def triton_trie_topk(
    logits: torch.Tensor,
    node: torch.Tensor,
    offsets: torch.Tensor,
    child_codes: torch.Tensor,
    child_nodes: torch.Tensor,
    k: int,
    banned_keys: torch.Tensor,
    row_groups: torch.Tensor,
    num_nodes: int,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See ``kernels.trie_topk.trie_topk``. No host synchronisation: block widths follow shapes.

    Assumes what the trie guarantees: the children of one node have distinct codes < V, so a node
    has at most V children. Vocabularies wider than ``MAX_BLOCK`` are refused: the dispatcher decides
    where they go, this function never reroutes a call.
    """
    rows, vocab = logits.shape
    device = logits.device
    values = torch.empty((rows, k), dtype=torch.float32, device=device)
    codes = torch.empty((rows, k), dtype=torch.int64, device=device)
    nodes = torch.empty((rows, k), dtype=torch.int64, device=device)
    if rows == 0 or k == 0:
        return values, codes, nodes
    narrow, wide = block_widths(vocab)
    if wide > MAX_BLOCK:
        raise ValueError(f"a {vocab}-code level is wider than the kernel's widest block ({MAX_BLOCK})")
    if child_codes.numel() == 0:  # a trie without edges: every row is dead, nothing to launch
        return values.fill_(float("-inf")), codes.fill_(-1), nodes.fill_(-1)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    groups = row_groups.to(torch.int64).contiguous()
    num_groups = groups.shape[1]
    if num_groups == 0:  # Triton wants a real pointer even where nothing is read
        groups = torch.zeros((rows, 1), dtype=torch.int64, device=device)
    banned = banned_keys.to(torch.int64).contiguous()
    num_banned = banned.numel()
    if num_banned == 0:
        banned = torch.zeros(1, dtype=torch.int64, device=device)
    k_pad = max(2, triton.next_power_of_2(k))
    group_count, cand = wide_path_sizes(wide, k_pad)
    warps = num_warps or default_num_warps(narrow, wide)
    programs = _num_programs(rows, device, warps)
    fence_block = min(1024, 256 * warps)  # about 8 fence keys per thread, kept in registers
    stride = max(1, -(-num_banned // fence_block))
    fences = banned if stride == 1 else banned[::stride].contiguous()
    scratch = torch.empty((programs, cand), dtype=torch.int64, device=device)
    _trie_topk_kernel[(programs,)](
        logits,
        logits.stride(0),
        rows,
        node.to(torch.int64).contiguous(),
        offsets.to(torch.int64).contiguous(),
        offsets.numel(),
        child_codes.to(torch.int64).contiguous(),
        child_nodes.to(torch.int64).contiguous(),
        banned,
        num_banned,
        fences,
        fences.numel() if num_banned else 0,
        stride,
        stride.bit_length(),
        groups,
        groups.stride(0),
        num_groups,
        num_nodes,
        k,
        values,
        codes,
        nodes,
        scratch,
        NARROW=narrow,
        WIDE=wide,
        K_PAD=k_pad,
        GROUPS=group_count,
        CAND=cand,
        G_PAD=max(2, triton.next_power_of_2(num_groups)),
        FENCE=fence_block,
        num_warps=warps,
    )
    return values, codes, nodes
