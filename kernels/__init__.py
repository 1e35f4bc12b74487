"""Compute kernels of the serving hot path.

Each kernel lives as three things side by side (the generative-recommenders layout):
``pytorch/pt_<op>.py`` (vectorised PyTorch: the CPU production path and the reference),
``triton/triton_<op>.py`` (the CUDA path) and ``<op>.py`` (the one dispatcher callers use).
This package imports nothing else of the project.
"""

from kernels.moe import moe
from kernels.trie_topk import TrieTopK, trie_topk

__all__ = ["TrieTopK", "moe", "trie_topk"]
