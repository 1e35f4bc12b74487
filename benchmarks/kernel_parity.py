"""Kernel parity checks: the Triton kernels against their PyTorch twins, and the demo model's answers.

    python -m benchmarks.kernel_parity trie|moe|generator [STORE]

Run with ``TRITON_INTERPRET=1`` on a machine without a GPU: Triton reads that variable when a
kernel is decorated, which is why tests/test_kernels_parity.py runs these checks in a child process
started with it set (that holds however the suite is ordered and whatever it imported first). The
``check_*`` functions are the comparisons: hypothesis-driven for the kernels (``trie``, ``moe``),
the demo model's recommendations with every kernel on Triton against PyTorch for ``generator``.
Prints ``PASSED <which>`` when the check passes. The strategies and comparisons here are shared with
tests/test_kernels_parity.py and tests/test_kernels_gpu.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from benchmarks.kernel_cases import MoECase, TrieCase, build_moe_case, build_trie_case
from kernels.pytorch.pt_moe import pt_moe
from kernels.pytorch.pt_trie_topk import pt_trie_topk

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


# ---- Triton kernels against PyTorch ----------------------------------------------------------


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


CHECKS: dict[str, Callable[[], None]] = {"trie": check_triton_trie_topk, "moe": check_triton_moe}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=[*CHECKS, "generator"], help="what to compare")
    parser.add_argument("store", nargs="?", help="generator: a model store holding the demo model")
    args = parser.parse_args(argv)
    if args.which == "generator":
        if args.store is None:
            parser.error("generator needs the model store")
        check_generator_parity(args.store)
    else:
        CHECKS[args.which]()
    print(f"PASSED {args.which}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
