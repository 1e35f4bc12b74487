"""The kernel parity of tests/test_kernels_parity.py, compiled for a real GPU (skipped without CUDA).

Also checks what only a GPU can show: the serving shapes (dense 8192-wide root, k = 512, half
precision), the fp16/bf16 grouped GEMMs against an fp32 reference, and that neither kernel
synchronises with the host (``torch.cuda.set_sync_debug_mode("error")`` raises on any sync).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import kernels
from benchmarks.kernel_cases import MoECase, TrieCase, build_moe_case, build_trie_case
from benchmarks.kernel_parity import assert_trie_equal, check_align_block_size, moe_cases, trie_cases
from kernels.pytorch.pt_moe import pt_moe, pt_route
from kernels.pytorch.pt_trie_topk import pt_trie_topk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _to_cuda_trie(case: TrieCase) -> TrieCase:
    moved = [t.cuda() if isinstance(t, torch.Tensor) else t for t in case.args()]
    return TrieCase(*moved)


def _to_cuda_moe(case: MoECase) -> MoECase:
    moved = [t.cuda() for t in (case.x, case.router, case.w_gate, case.w_up, case.w_down)]
    return MoECase(*moved, top_k=case.top_k, renormalize=case.renormalize)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=trie_cases(max_vocab=300))
def test_trie_topk_compiled_matches_torch_drawn(case: TrieCase) -> None:
    from kernels.triton.triton_trie_topk import triton_trie_topk

    gpu = _to_cuda_trie(case)
    assert_trie_equal(triton_trie_topk(*gpu.args()), pt_trie_topk(*gpu.args()), gpu.logits)


@pytest.mark.parametrize(
    ("vocab", "rows", "k", "dtype"),
    [
        (256, 300, 32, torch.float16),
        (1024, 257, 64, torch.bfloat16),
        (8192, 96, 512, torch.float32),
        (8192, 130, 32, torch.float16),
        (300, 33, 320, torch.float32),
    ],
)
@pytest.mark.parametrize("monotone", [False, True])
def test_trie_topk_compiled_serving_shapes(vocab: int, rows: int, k: int, dtype: torch.dtype, monotone: bool) -> None:
    """Both wide-root paths: group-maxima bound (random logits) and radix fallback (monotone)."""
    from kernels.triton.triton_trie_topk import triton_trie_topk

    case = build_trie_case(
        monotone=monotone,
        seed=vocab + rows,
        vocab=vocab,
        num_nodes=40,
        rows=rows,
        k=k,
        num_groups=3,
        ban_rate=0.05,
        dtype=dtype,
        device="cuda",
    )
    assert_trie_equal(triton_trie_topk(*case.args()), pt_trie_topk(*case.args()), case.logits)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=moe_cases())
def test_moe_compiled_fp32_matches_torch_drawn(case: MoECase) -> None:
    from kernels.triton.triton_moe import triton_moe

    gpu = _to_cuda_moe(case)
    torch.testing.assert_close(triton_moe(*gpu.args()), pt_moe(*gpu.args()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("tokens", "dim", "experts", "scenario", "dtype"),
    [
        (256, 128, 8, "random", torch.float16),
        (4096, 512, 24, "subset", torch.bfloat16),
        (1000, 256, 8, "one_expert", torch.float16),
        (77, 1024, 24, "random", torch.bfloat16),
    ],
)
def test_moe_compiled_half_matches_fp32_reference(
    tokens: int, dim: int, experts: int, scenario: str, dtype: torch.dtype
) -> None:
    """Half-precision Triton is at least as close to the fp32 answer as PyTorch's own half path."""
    from kernels.triton.triton_moe import block_m_for, triton_moe, triton_route

    case = build_moe_case(
        seed=tokens,
        tokens=tokens,
        dim=dim,
        ffn=2 * dim,
        experts=experts,
        top_k=2,
        scenario=scenario,
        dtype=dtype,
        device="cuda",
    )
    weights, chosen = triton_route(case.x, case.router, 2)
    want_w, want_e = pt_route(case.x, case.router, 2)
    assert torch.equal(chosen.long(), want_e)
    torch.testing.assert_close(weights, want_w, rtol=2e-2, atol=2e-2)
    check_align_block_size(chosen.view(-1), experts, block_m_for(chosen.numel(), experts))

    reference = pt_moe(*[t.float() for t in case.args()[:5]], 2, True)
    ours = triton_moe(*case.args()).float()
    theirs = pt_moe(*case.args()).float()
    scale = reference.norm()
    ours_err = ((ours - reference).norm() / scale).item()
    theirs_err = ((theirs - reference).norm() / scale).item()
    assert ours_err < 1e-2, ours_err
    assert ours_err <= 2 * theirs_err + 1e-3, (ours_err, theirs_err)


def test_align_block_size_at_serving_size() -> None:
    from kernels.triton.triton_moe import align_block_size

    gen = torch.Generator(device="cuda").manual_seed(0)
    experts = torch.randint(0, 24, (65536 * 2,), device="cuda", generator=gen, dtype=torch.int32)
    experts[:5000] = 3  # a hot expert
    experts[experts == 7] = 8  # an expert with no pair
    check_align_block_size(experts, 24, 128)
    sorted_ids, block_expert, num_padded = align_block_size(experts, 24, 128)
    assert sorted_ids.numel() == 65536 * 2 + 24 * 127


def test_kernels_do_not_synchronise_with_the_host() -> None:
    from kernels.triton.triton_moe import triton_moe
    from kernels.triton.triton_trie_topk import triton_trie_topk

    moe_case = build_moe_case(
        seed=1, tokens=512, dim=256, ffn=512, experts=8, top_k=2, dtype=torch.float16, device="cuda"
    )
    trie_case = build_trie_case(
        seed=1, vocab=1024, num_nodes=30, rows=256, k=32, num_groups=3, dtype=torch.float16, device="cuda"
    )
    triton_moe(*moe_case.args())  # compile and autotune first: tuning itself times kernels
    triton_trie_topk(*trie_case.args())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        triton_moe(*moe_case.args())
        triton_trie_topk(*trie_case.args())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_dispatcher_uses_a_cuda_backend_that_agrees() -> None:
    case = build_trie_case(seed=9, vocab=512, num_nodes=20, rows=64, k=16, num_groups=2, device="cuda")
    assert_trie_equal(tuple(kernels.trie_topk(*case.args())), pt_trie_topk(*case.args()), case.logits)
    moe_case = build_moe_case(seed=9, tokens=64, dim=64, ffn=128, experts=8, top_k=2, device="cuda")
    torch.testing.assert_close(kernels.moe(*moe_case.args()), pt_moe(*moe_case.args()), rtol=1e-4, atol=1e-4)
