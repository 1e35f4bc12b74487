"""Kernel parity on the CPU: naive loops check the PyTorch kernels, the PyTorch kernels check Triton.

The Triton kernels run under ``TRITON_INTERPRET=1``. Triton reads that variable when a kernel is
decorated, so the interpreted checks run in a child process started with it set: that holds however
the suite is ordered and whatever other modules imported first. The child runs this very module
(``python -m tests.test_kernels_parity trie|moe|generator [store]``), whose ``check_*`` functions
are the comparisons (hypothesis-driven for the kernels; the demo model's recommendations for the
generator). Shapes are small (the interpreter is slow); inputs are built so that
no two allowed children tie and no token's expert choice is near a tie, so codes and experts must
match exactly. ``build_trie_case`` and ``build_moe_case`` are shared with tests/test_kernels_gpu.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kernels
from kernels.dispatch import KernelBackendError
from kernels.pytorch.pt_moe import pt_moe
from kernels.pytorch.pt_trie_topk import pt_trie_topk

REPO = Path(__file__).resolve().parents[1]
INTERPRETED_TIMEOUT_S = 240

# ---- case builders ----------------------------------------------------------------------------


@dataclass
class TrieCase:
    logits: torch.Tensor
    node: torch.Tensor
    offsets: torch.Tensor
    child_codes: torch.Tensor
    child_nodes: torch.Tensor
    k: int
    banned: torch.Tensor
    groups: torch.Tensor
    num_nodes: int

    def args(self) -> tuple:
        return (
            self.logits, self.node, self.offsets, self.child_codes, self.child_nodes,
            self.k, self.banned, self.groups, self.num_nodes,
        )  # fmt: skip


def distinct_logits(rows: int, vocab: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Logits with no near-tie within a row, so a top-k order is unique in any dtype.

    Near-ties matter as much as exact ones: two logits closer than float32's resolution at the
    log-prob (|x - lse| * 2**-24) become equal log-probs, and torch.topk may then order them
    either way. So values are drawn without replacement from grids whose gaps are wide enough.
    """
    if dtype == torch.float32:  # spacing >= 1/32 over +-vocab/16
        perm = torch.stack([torch.randperm(vocab, generator=gen) for _ in range(rows)]).float()
        return (perm - vocab / 2 + 0.5 * torch.rand(rows, vocab, generator=gen)) / 16
    # half types: every value of a few binades (relative gap 2**-10 fp16, 2**-7 bf16), both signs
    lo, hi = (0x3C00, 0x6800) if dtype == torch.float16 else (0x3D80, 0x4380)  # [1, 2048) / [1/16, 256)
    positive = torch.arange(lo, hi)
    patterns = torch.cat([positive, positive - 0x8000])  # the same magnitudes, sign bit set
    if vocab > patterns.numel():
        raise ValueError(f"at most {patterns.numel()} well-separated {dtype} logits per row")
    picks = torch.stack([patterns[torch.randperm(patterns.numel(), generator=gen)[:vocab]] for _ in range(rows)])
    return picks.to(torch.int16).view(dtype)


def build_trie_case(
    seed: int,
    vocab: int,
    num_nodes: int,
    rows: int,
    k: int,
    num_groups: int,
    ban_rate: float = 0.2,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    monotone: bool = False,
) -> TrieCase:
    """A random CSR trie whose node 0 is a dense root (all ``vocab`` codes); other nodes have 0, 1,
    a few or many children. Row 0 sits at the root, row 1 (if any) has every child banned, and some
    rows are dead (node -1). ``monotone`` sorts each row's logits by code, the worst case for the
    kernel's group-maxima bound (its exact radix-select fallback runs)."""
    gen = torch.Generator().manual_seed(seed)
    choices = torch.tensor([0, 1, 2, max(1, vocab // 3), vocab])
    counts = choices[torch.randint(0, len(choices), (num_nodes,), generator=gen)].clamp(max=vocab)
    counts[0] = vocab
    offsets = torch.zeros(num_nodes + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    codes = [torch.randperm(vocab, generator=gen)[: int(c)].sort().values for c in counts]
    child_codes = torch.cat(codes).to(torch.int64)
    child_nodes = torch.randint(0, num_nodes, (child_codes.numel(),), generator=gen)
    node = torch.randint(-1, num_nodes, (rows,), generator=gen)
    node[0] = 0
    node[rows // 2 :] = torch.where(torch.rand(rows - rows // 2, generator=gen) < 0.5, 0, node[rows // 2 :])
    groups = torch.randint(0, 4, (rows, num_groups), generator=gen)
    key_space = 4 * num_nodes
    banned = torch.nonzero(torch.rand(key_space, generator=gen) < ban_rate).flatten()
    if rows > 1 and num_groups > 0 and node[1] >= 0:  # every child of row 1 banned
        kids = child_nodes[offsets[node[1]] : offsets[node[1] + 1]]
        banned = torch.cat([banned, groups[1, 0] * num_nodes + kids])
    banned = torch.unique(banned)  # sorted
    logits = distinct_logits(rows, vocab, dtype, gen)
    if monotone:
        logits = logits.sort(dim=1).values
    on = torch.device(device)
    return TrieCase(
        logits.to(on), node.to(on), offsets.to(on), child_codes.to(on), child_nodes.to(on), k,
        banned.to(on), groups.to(on), num_nodes,
    )  # fmt: skip


@dataclass
class MoECase:
    x: torch.Tensor
    router: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    top_k: int
    renormalize: bool

    def args(self) -> tuple:
        return self.x, self.router, self.w_gate, self.w_up, self.w_down, self.top_k, self.renormalize


def build_moe_case(
    seed: int,
    tokens: int,
    dim: int,
    ffn: int,
    experts: int,
    top_k: int,
    scenario: str = "random",
    renormalize: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> MoECase:
    """Inputs whose routing is far from any tie (when dim >= experts): the router sees a planted
    preference order with gaps of 2 between ranks. ``scenario``: "random" orders, "one_expert"
    (expert 0 first for every token), "subset" (only the first max(top_k, E//2) experts get tokens)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=gen) * 0.5
    if dim >= experts:
        order = torch.stack([torch.randperm(experts, generator=gen) for _ in range(tokens)])  # (T, E)
        if scenario == "one_expert":
            order = torch.cat([torch.zeros(tokens, 1, dtype=torch.int64), order[order != 0].view(tokens, -1)], 1)
        elif scenario == "subset":
            used = max(top_k, experts // 2)
            low = torch.stack([torch.randperm(used, generator=gen) for _ in range(tokens)])
            high = used + torch.stack([torch.randperm(experts - used, generator=gen) for _ in range(tokens)])
            order = torch.cat([low, high], 1)
        score = torch.empty(tokens, experts)
        score.scatter_(1, order, -2.0 * torch.arange(experts, dtype=torch.float32).expand(tokens, -1))
        x[:, :experts] = score
        router = torch.randn(experts, dim, generator=gen) * (0.1 / math.sqrt(dim))
        router[:, :experts] = torch.eye(experts)
    else:
        router = torch.randn(experts, dim, generator=gen)
    w_gate = torch.randn(experts, dim, ffn, generator=gen) / math.sqrt(dim)
    w_up = torch.randn(experts, dim, ffn, generator=gen) / math.sqrt(dim)
    w_down = torch.randn(experts, ffn, dim, generator=gen) / math.sqrt(ffn)
    on = torch.device(device)
    cast = [t.to(on, dtype) for t in (x, router, w_gate, w_up, w_down)]
    return MoECase(*cast, top_k=top_k, renormalize=renormalize)


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


# ---- hypothesis strategies ----------------------------------------------------------------------


@st.composite
def trie_cases(draw: st.DrawFn, max_vocab: int = 40) -> TrieCase:
    vocab = draw(st.integers(1, max_vocab))
    return build_trie_case(
        seed=draw(st.integers(0, 2**31 - 1)),
        vocab=vocab,
        num_nodes=draw(st.integers(1, 24)),
        rows=draw(st.integers(1, 9)),
        k=draw(st.sampled_from([1, 2, 3, 5, 8, 13, vocab, vocab + 3])),
        num_groups=draw(st.integers(0, 3)),
        ban_rate=draw(st.sampled_from([0.0, 0.1, 0.4])),
    )


@st.composite
def moe_cases(draw: st.DrawFn) -> MoECase:
    experts = draw(st.integers(1, 6))
    return build_moe_case(
        seed=draw(st.integers(0, 2**31 - 1)),
        tokens=draw(st.integers(1, 37)),
        dim=draw(st.sampled_from([5, 8, 16, 23, 40])),
        ffn=draw(st.sampled_from([3, 16, 19, 36])),
        experts=experts,
        top_k=draw(st.integers(1, min(3, experts))),
        scenario=draw(st.sampled_from(["random", "one_expert", "subset"])),
        renormalize=draw(st.booleans()),
    )


def assert_trie_equal(got: tuple, want: tuple, logits: torch.Tensor) -> None:
    """Codes and nodes exactly; log-probs to float32 rounding of the normaliser, whose size follows
    the logits' (two correct log-sum-exps may differ by an ulp of ~max|logit|)."""
    finite = logits.float()[torch.isfinite(logits.float())]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    torch.testing.assert_close(got[0], want[0].to(got[0].dtype), rtol=1.3e-6, atol=1e-5 + 4 * 2**-23 * scale)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)


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


def _wide_root_case() -> TrieCase:
    """Dense root wider than the narrow block (so the wide block runs), k over the child count."""
    return build_trie_case(seed=11, vocab=300, num_nodes=6, rows=3, k=320, num_groups=2, ban_rate=0.3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=trie_cases())
@example(case=build_trie_case(seed=1, vocab=1, num_nodes=1, rows=1, k=1, num_groups=0))
@example(case=build_trie_case(seed=2, vocab=7, num_nodes=5, rows=4, k=9, num_groups=3, ban_rate=0.5))
@example(case=_wide_root_case())
@example(case=build_trie_case(seed=5, vocab=600, num_nodes=4, rows=2, k=37, num_groups=1, ban_rate=0.05))
@example(case=build_trie_case(seed=7, vocab=40, num_nodes=400, rows=6, k=5, num_groups=3, ban_rate=0.6))
@example(case=build_trie_case(seed=8, vocab=30, num_nodes=2000, rows=5, k=7, num_groups=3, ban_rate=0.5))
@example(case=build_trie_case(seed=6, vocab=1000, num_nodes=3, rows=1, k=37, num_groups=2, ban_rate=0.0, monotone=True))
def check_triton_trie_topk(case: TrieCase) -> None:
    from kernels.triton.triton_trie_topk import triton_trie_topk

    assert_trie_equal(triton_trie_topk(*case.args()), pt_trie_topk(*case.args()), case.logits)


def check_align_block_size(experts: torch.Tensor, num_experts: int, block_m: int) -> None:
    """Every pair once, in its expert's padded block, in token order; blocks tagged with their expert."""
    from kernels.triton.triton_moe import align_block_size

    sorted_ids, block_expert, num_padded = align_block_size(experts, num_experts, block_m)
    n_pairs = experts.numel()
    counts = torch.bincount(experts.long(), minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    assert int(num_padded) == int(padded.sum())
    start = 0
    for e in range(num_experts):
        span = sorted_ids[start : start + int(padded[e])].long()
        real = span[span < n_pairs]
        assert torch.equal(real, torch.nonzero(experts == e).flatten()), f"expert {e}"
        assert (span[len(real) :] == n_pairs).all()
        assert (block_expert[start // block_m : (start + int(padded[e])) // block_m] == e).all()
        start += int(padded[e])
    assert (block_expert[start // block_m :] == -1).all()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=moe_cases())
@example(case=build_moe_case(seed=1, tokens=1, dim=8, ffn=16, experts=1, top_k=1))
@example(case=build_moe_case(seed=2, tokens=33, dim=16, ffn=19, experts=5, top_k=2, scenario="one_expert"))
@example(
    case=build_moe_case(seed=3, tokens=29, dim=23, ffn=36, experts=6, top_k=2, scenario="subset", renormalize=False)
)
def check_triton_moe(case: MoECase) -> None:
    from kernels.pytorch.pt_moe import pt_route
    from kernels.triton.triton_moe import block_m_for, triton_moe, triton_route

    weights, experts = triton_route(case.x, case.router, case.top_k, case.renormalize)
    want_w, want_e = pt_route(case.x, case.router, case.top_k, case.renormalize)
    torch.testing.assert_close(weights, want_w)
    torch.testing.assert_close(experts.long(), want_e, rtol=0, atol=0)
    num_experts = case.router.shape[0]
    check_align_block_size(experts.view(-1), num_experts, block_m_for(experts.numel(), num_experts))
    torch.testing.assert_close(triton_moe(*case.args()), pt_moe(*case.args()), rtol=1e-4, atol=1e-5)


def check_generator_parity(store: str) -> None:
    """The demo model's recommendations with every kernel on interpreted Triton equal PyTorch's."""
    import kernels.triton.triton_moe as moe_module
    import kernels.triton.triton_trie_topk as trie_module
    from onerec.bundle import load_newest_bundle
    from onerec.generate import RecRequest

    bundle, _ = load_newest_bundle(Path(store), "demo")
    pop = bundle.popular
    requests = [
        RecRequest(history=pop[:5], num_items=5, mode="session", beam_width=4, user_id="u1"),
        RecRequest(history=pop[10:14], num_items=3, mode="items", beam_width=4, exclude=pop[:2], user_id="u2"),
        RecRequest(history=[], num_items=4, mode="session", beam_width=3),
        RecRequest(history=pop[3:9], num_items=6, mode="items", beam_width=6, exclude_history=False, user_id="u3"),
    ]
    calls = {"trie": 0, "moe": 0}
    real_trie, real_moe = trie_module.triton_trie_topk, moe_module.triton_moe

    def counted_trie(*args: object, **kwargs: object) -> tuple:
        calls["trie"] += 1
        return real_trie(*args, **kwargs)  # type: ignore[arg-type]

    def counted_moe(*args: object, **kwargs: object) -> torch.Tensor:
        calls["moe"] += 1
        return real_moe(*args, **kwargs)  # type: ignore[arg-type]

    trie_module.triton_trie_topk, moe_module.triton_moe = counted_trie, counted_moe  # type: ignore[assignment]
    answers = {}
    for backend in ("torch", "triton"):
        bundle.generator.use_kernel_backend(backend)
        answers[backend], _ = bundle.generator.generate(requests)
        if backend == "torch":
            assert calls == {"trie": 0, "moe": 0}, calls
    assert calls["trie"] > 0 and calls["moe"] > 0, calls
    assert sum(len(r.items) for r in answers["torch"]) > 0
    for got, want in zip(answers["triton"], answers["torch"], strict=True):
        assert [i.item for i in got.items] == [i.item for i in want.items]
        for a, b in zip(got.items, want.items, strict=True):
            assert a.semantic_id == b.semantic_id
            assert abs(a.score - b.score) <= 1e-4 * max(1.0, abs(b.score)), (a, b)


CHECKS = {"trie": check_triton_trie_topk, "moe": check_triton_moe}


def _run_interpreted(which: str, *extra: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.test_kernels_parity", which, *extra],
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


if __name__ == "__main__":
    if sys.argv[1] == "generator":
        check_generator_parity(sys.argv[2])
    else:
        CHECKS[sys.argv[1]]()
    print(f"PASSED {sys.argv[1]}")
