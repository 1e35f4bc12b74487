"""Who picks a kernel's backend: the dispatcher alone, from the argument its caller passes down.

The setting lives in the service (``ONEREC_KERNELS``), travels through the engine to the generator,
which asks each dispatcher for it; the kernels package reads no setting of its own, and a Triton
function never reroutes a call to PyTorch behind the dispatcher's back.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

from kernels.dispatch import KernelBackendError
from kernels.pytorch.pt_trie_topk import pt_trie_topk
from kernels.trie_topk import _twin_is_faster, trie_topk_backend
from onerec.generate import Generator, RecRequest
from tests.test_generator import tiny_world

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
dispatcher = sys.modules["kernels.trie_topk"]  # the module (the package re-exports its function by that name)


def logits(rows: int, vocab: int) -> torch.Tensor:
    return torch.empty(rows, vocab, dtype=torch.float16, device="meta")  # shape only, no memory


@pytest.fixture
def on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the device rule pick Triton (as on a CUDA tensor) so the shape rules can be seen on a CPU host."""
    pytest.importorskip("triton")
    monkeypatch.setattr(
        dispatcher, "choose_backend", lambda t, requested=None: "torch" if requested == "torch" else "triton"
    )


def test_deep_steps_of_wide_levels_go_to_the_twin() -> None:
    assert _twin_is_faster(logits(65536, 8192), at_root=False)
    assert not _twin_is_faster(logits(65536, 8192), at_root=True)  # the kernel is 5x faster at the root
    assert not _twin_is_faster(logits(4096, 8192), at_root=False)
    assert not _twin_is_faster(logits(65536, 1024), at_root=False)


@pytest.mark.usefixtures("on_cuda")
def test_the_dispatcher_applies_the_shape_rules_only_when_the_choice_is_left_to_it() -> None:
    assert trie_topk_backend(logits(65536, 8192), None, at_root=False) == "torch"
    assert trie_topk_backend(logits(65536, 8192), "auto", at_root=True) == "triton"
    assert trie_topk_backend(logits(65536, 8192), "triton", at_root=False) == "triton"  # forced: no shape rule
    assert trie_topk_backend(logits(8, 32768), None, at_root=True) == "torch"  # wider than the kernel's block
    assert trie_topk_backend(logits(8, 32768), "torch", at_root=True) == "torch"


@pytest.mark.usefixtures("on_cuda")
def test_forcing_triton_on_a_level_too_wide_for_the_kernel_is_refused_not_rerouted() -> None:
    with pytest.raises(KernelBackendError, match="wider than the kernel's widest block"):
        trie_topk_backend(logits(8, 32768), "triton", at_root=True)


def test_the_triton_function_never_falls_back_to_pytorch() -> None:
    pytest.importorskip("triton")
    from kernels.triton.triton_trie_topk import MAX_BLOCK, triton_trie_topk

    empty = torch.zeros(0, dtype=torch.int64)
    wide = torch.zeros(2, 2 * MAX_BLOCK)
    node, offsets = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    groups = torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="wider than the kernel's widest block"):
        triton_trie_topk(wide, node, offsets, empty, empty, 3, empty, groups, 1)
    # a trie without edges has a trivial answer (every row dead): given without a launch, and equal to PyTorch's
    args = (torch.zeros(2, 4), node, offsets, empty, empty, 3, empty, groups, 1)
    for got, want in zip(triton_trie_topk(*args), pt_trie_topk(*args), strict=True):
        assert torch.equal(got, want)


def environment_reads(source: str) -> set[str]:
    """Names read through ``os.environ[...]``, ``os.environ.get(...)`` or ``os.getenv(...)`` ('?' if not literal)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        key: ast.expr | None = None
        if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("environ"):
            key = node.slice
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith(("environ.get", "getenv")):
            key = node.args[0] if node.args else None
        else:
            continue
        found.add(key.value if isinstance(key, ast.Constant) and isinstance(key.value, str) else "?")
    return found


def test_the_kernels_package_reads_no_setting_but_tritons_own() -> None:
    reads = {name: environment_reads(path.read_text()) for name, path in ((p.name, p) for p in KERNELS.rglob("*.py"))}
    assert set().union(*reads.values()) == {"TRITON_INTERPRET"}, reads  # the backend comes down as an argument
    assert environment_reads('import os\nos.environ.get("ONEREC_KERNELS", "")\nos.getenv(name)') == {
        "ONEREC_KERNELS",
        "?",
    }


def test_the_generator_passes_its_backend_to_every_dispatcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, trie = tiny_world(n_items=9, session_items=2)
    req = [RecRequest(history=[1, 2], num_items=3, mode="session", beam_width=4, user_id="k")]
    auto = Generator(model, trie).generate(req)[0]
    forced_torch = Generator(model, trie, kernel_backend="torch")
    assert {m.kernel_backend for m in forced_torch.model.modules() if hasattr(m, "kernel_backend")} == {"torch"}
    assert forced_torch.generate(req)[0] == auto  # on a CPU host "auto" is PyTorch too
    forced_triton = Generator(model, trie, kernel_backend="triton")
    with pytest.raises(KernelBackendError, match="CUDA"):  # the MoE dispatcher sees it (and would the trie's)
        forced_triton.generate(req)
    calls: list[str | None] = []
    real = dispatcher.trie_topk_backend

    def seen(logits: torch.Tensor, backend: str | None, at_root: bool) -> str:
        calls.append(backend)
        return real(logits, backend, at_root)

    monkeypatch.setattr(dispatcher, "trie_topk_backend", seen)
    forced_triton.use_kernel_backend("torch")
    forced_triton.generate(req)
    assert calls and set(calls) == {"torch"}
