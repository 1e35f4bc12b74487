"""Inputs of the kernels, built in one place for the parity tests and the speed benchmark.

* ``build_trie_case``: a small random CSR trie with every corner a search meets (dense root, empty
  nodes, dead rows, a row with every child banned) and logits with no near-tie, so codes must
  match exactly: what the parity checks draw from (tests/test_kernels_parity.py,
  tests/test_kernels_gpu.py, ``benchmarks.kernel_parity``).
* ``serving_trie_step``: one beam-search step at the sizes served (thousands of rows, an 8192-wide
  root, the generator's three ban groups), too big for the tie-free logits: what
  ``benchmarks.kernel_speed`` times.
* ``build_moe_case``: MoE inputs whose routing is far from any tie, for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class TrieCase:
    """The arguments of ``trie_topk`` by name; ``args()`` gives them in call order."""

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
    """The arguments of ``moe`` by name; ``args()`` gives them in call order."""

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


def serving_trie_step(
    rows: int,
    vocab: int,
    scenario: str,
    k: int,
    beam: int = 32,
    dtype: torch.dtype = torch.float16,
    device: str = "cuda",
) -> tuple[TrieCase, float]:
    """One decoding step at serving size, and the children a row chooses among.

    A two-level CSR trie: a root with all ``vocab`` codes, each level-1 node ~min(vocab, 128)
    children. ``scenario`` "root" puts every row at the root, "deep" each at a random level-1 node.
    Rows are ``rows // beam`` requests of ``beam`` rows under the generator's three ban groups
    (global dead nodes, each request's history, each row's own session).
    """
    gen = torch.Generator().manual_seed(rows * 7 + vocab)
    fanout = torch.randint(max(1, min(vocab, 128) // 2), min(vocab, 128) + 1, (vocab,), generator=gen)
    counts = torch.cat([torch.tensor([vocab]), fanout])
    num_inner = 1 + vocab
    offsets = torch.zeros(num_inner + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    # codes: a sorted random subset per level-1 node (a sorted prefix of a random permutation)
    keys = torch.rand(vocab, vocab, generator=gen).argsort(1)
    level1 = [keys[i, : int(c)].sort().values for i, c in enumerate(fanout)]
    child_codes = torch.cat([torch.arange(vocab)] + level1)
    child_nodes = torch.cat([torch.arange(1, vocab + 1), num_inner + torch.arange(int(fanout.sum()))])
    num_nodes = num_inner + int(fanout.sum())
    node = (
        torch.zeros(rows, dtype=torch.int64)
        if scenario == "root"
        else torch.randint(1, vocab + 1, (rows,), generator=gen)
    )
    requests = max(1, rows // beam)
    q_of_row = torch.arange(rows) // beam
    row_groups = torch.stack([torch.zeros(rows, dtype=torch.int64), 1 + q_of_row, 1 + requests + torch.arange(rows)], 1)
    dead = torch.randint(1, num_nodes, (64,), generator=gen)
    history = num_inner + torch.randint(0, num_nodes - num_inner, (requests, 50), generator=gen)  # leaf bans
    history[:, :2] = torch.randint(1, vocab + 1, (requests, 2), generator=gen)  # a couple of level-1 prefixes
    session = num_inner + torch.randint(0, num_nodes - num_inner, (rows,), generator=gen)
    banned = torch.cat(
        [dead, ((1 + torch.arange(requests))[:, None] * num_nodes + history).flatten(),
         (1 + requests + torch.arange(rows)) * num_nodes + session]
    ).unique()  # fmt: skip
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    on = torch.device(device)
    case = TrieCase(
        logits.to(on), node.to(on), offsets.to(on), child_codes.to(on), child_nodes.to(on), k,
        banned.to(on), row_groups.to(on), num_nodes,
    )  # fmt: skip
    return case, int(counts[0]) if scenario == "root" else float(fanout.float().mean())
