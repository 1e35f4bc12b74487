"""The trie_topk dispatcher's per-shape choice between the Triton kernel and its PyTorch twin."""

from __future__ import annotations

import pytest
import torch

from kernels.trie_topk import _twin_is_faster


def logits(rows: int, vocab: int) -> torch.Tensor:
    return torch.empty(rows, vocab, dtype=torch.float16, device="meta")  # shape only, no memory


def test_deep_steps_of_wide_levels_go_to_the_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONEREC_KERNELS", raising=False)
    assert _twin_is_faster(logits(65536, 8192), at_root=False)
    assert not _twin_is_faster(logits(65536, 8192), at_root=True)  # the kernel is 5x faster at the root
    assert not _twin_is_faster(logits(4096, 8192), at_root=False)
    assert not _twin_is_faster(logits(65536, 1024), at_root=False)


def test_forcing_triton_overrides_the_shape_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONEREC_KERNELS", "triton")
    assert not _twin_is_faster(logits(65536, 8192), at_root=False)
