"""Kernel parity on the CPU: naive loops check the PyTorch kernels, the PyTorch kernels check Triton.

The Triton kernels run under ``TRITON_INTERPRET=1``. Triton reads that variable when a kernel is
decorated, so the interpreted checks run in a child process started with it set: that holds however
the suite is ordered and whatever other modules imported first. The child is
``python -m benchmarks.kernel_parity trie|moe|generator [store]``, whose ``check_*`` functions are
the comparisons (hypothesis-driven for the kernels; the demo model's recommendations for the
generator). Shapes are small (the interpreter is slow); inputs (``benchmarks.kernel_cases``) are
built so that no two allowed children tie and no token's expert choice is near a tie, so codes and
experts must match exactly.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

import kernels
from benchmarks.kernel_cases import MoECase, TrieCase, build_moe_case, build_trie_case
from benchmarks.kernel_parity import assert_trie_equal, moe_cases, trie_cases
from kernels.dispatch import KernelBackendError
from kernels.pytorch.pt_moe import pt_moe
from kernels.pytorch.pt_trie_topk import pt_trie_topk

REPO = Path(__file__).resolve().parents[1]
INTERPRETED_TIMEOUT_S = 240

# ---- naive oracles (the PyTorch implementations' reference) -------------------------------------


def oracle_trie_topk(case: TrieCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row at a time, in float64, straight from the definition."""
    banned = set(case.banned.tolist())
    rows, k = case.logits.shape[0], case.k
    values = torch.full((rows, k), float("-inf"), dtype=torch.float64)
    codes = torch.full((rows, k), -1, dtype=torch.int64)
    nodes = torch.full((rows, k), -1, dtype=torch.int64)
    for r in range(rows):
        n = int(case.node[r])
        if n < 0:
            continue
        kids = []
        for e in range(int(case.offsets[n]), int(case.offsets[n + 1])):
            code, child = int(case.child_codes[e]), int(case.child_nodes[e])
            if any(int(g) * case.num_nodes + child in banned for g in case.groups[r]):
                continue
            kids.append((float(case.logits[r, code]), code, child))
        finite = [v for v, _, _ in kids if v > float("-inf")]
        if not finite:
            continue
        top = max(finite)
        lse = top + math.log(sum(math.exp(v - top) for v in finite))
        for j, (v, code, child) in enumerate(sorted(kids, key=lambda t: -t[0])[:k]):
            if v > float("-inf"):
                values[r, j], codes[r, j], nodes[r, j] = v - lse, code, child
    return values, codes, nodes


def oracle_moe(case: MoECase) -> torch.Tensor:
    """Token by token in float64: softmax gate, top-k, renormalise, sum of the chosen SwiGLU experts."""
    x, router = case.x.double(), case.router.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(router @ x[t], dim=0)
        weights, experts = probs.topk(case.top_k)
        if case.renormalize:
            weights = weights / weights.sum()
        for w, e in zip(weights.tolist(), experts.tolist(), strict=True):
            hidden = F.silu(x[t] @ case.w_gate[e].double()) * (x[t] @ case.w_up[e].double())
            out[t] += w * (hidden @ case.w_down[e].double())
    return out


# ---- PyTorch kernels against the naive loops (in process) ---------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=trie_cases())
def test_pt_trie_topk_matches_loop_oracle(case: TrieCase) -> None:
    assert_trie_equal(pt_trie_topk(*case.args()), oracle_trie_topk(case), case.logits)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=moe_cases())
def test_pt_moe_matches_loop_oracle(case: MoECase) -> None:
    torch.testing.assert_close(pt_moe(*case.args()).double(), oracle_moe(case), rtol=1e-4, atol=1e-5)


def test_trie_oracle_sees_bans_and_dead_rows() -> None:
    """The oracle itself: a banned child never appears, a dead row is all -inf / -1."""
    case = build_trie_case(seed=3, vocab=12, num_nodes=8, rows=6, k=4, num_groups=2, ban_rate=0.3)
    values, codes, nodes = oracle_trie_topk(case)
    banned = set(case.banned.tolist())
    for r in range(6):
        for j in range(4):
            if nodes[r, j] >= 0:
                assert all(int(g) * case.num_nodes + int(nodes[r, j]) not in banned for g in case.groups[r])
        if case.node[r] < 0:
            assert torch.isinf(values[r]).all() and (codes[r] == -1).all()
    assert (codes[1] == -1).all()  # row 1 has every child banned


# ---- Triton kernels against PyTorch (interpreted, in a child process) ---------------------------


def _run_interpreted(which: str, *extra: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_parity", which, *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=INTERPRETED_TIMEOUT_S,
    )
    assert done.returncode == 0, f"interpreted {which} parity failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    assert f"PASSED {which}" in done.stdout


def test_triton_trie_topk_matches_torch_interpreted() -> None:
    _run_interpreted("trie")


def test_triton_moe_matches_torch_interpreted() -> None:
    _run_interpreted("moe")


@pytest.mark.timeout(600)  # the session's demo_store build may land on this test's setup
def test_generator_recommends_the_same_with_interpreted_triton(demo_store: Path) -> None:
    _run_interpreted("generator", str(demo_store))


# ---- dispatch ------------------------------------------------------------------------------------


def test_forcing_triton_without_cuda_or_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    trie = build_trie_case(seed=0, vocab=5, num_nodes=3, rows=2, k=2, num_groups=1)
    with pytest.raises(KernelBackendError, match="CUDA.*TRITON_INTERPRET=1"):
        kernels.trie_topk(*trie.args(), backend="triton")
    moe = build_moe_case(seed=0, tokens=3, dim=8, ffn=8, experts=2, top_k=1)
    with pytest.raises(KernelBackendError, match="CUDA.*TRITON_INTERPRET=1"):
        kernels.moe(*moe.args(), backend="triton")


def test_unknown_backend_name_is_rejected() -> None:
    trie = build_trie_case(seed=0, vocab=5, num_nodes=3, rows=2, k=2, num_groups=1)
    with pytest.raises(KernelBackendError, match="expected 'torch' or 'triton'"):
        kernels.trie_topk(*trie.args(), backend="cuda")


def test_torch_backend_forced_runs_on_cpu() -> None:
    trie = build_trie_case(seed=4, vocab=9, num_nodes=5, rows=3, k=3, num_groups=2)
    assert_trie_equal(tuple(kernels.trie_topk(*trie.args(), backend="torch")), oracle_trie_topk(trie), trie.logits)
