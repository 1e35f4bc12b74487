"""The OneRec encoder-decoder, in one file.

Encoder: [user token, history items, candidate items] -> memory. An item is the sum of its
per-level code embeddings (so withdrawn or new items need no item table) plus a recency position
(0 = newest). With ``candidate_tokens`` = K > 0 the memory also holds K candidates: the items that
co-occur most with the newest three history items in the training sequences (weights 1, 0.5, 0.25;
the kNN baseline's recipe, with a neighbour seen before an item weighed ``candidate_backward``
times one seen after it), each as its code embeddings plus its candidate rank (and, with
``candidate_scores``, a projection of its co-occurrence score). The model holds the
neighbour lists (``set_neighbours``, saved with the weights) and the catalogue's code paths
(``set_catalogue``, from the bundle's catalogue, not saved twice); it finds a history item's
catalogue row from its code path, so its interface stays code paths only, and an item added after
training simply has no neighbours. The decoder is free to follow the candidates or not: they shape
the input, and the output is still the constrained beam search over every live item.
Decoder: causal self-attention, cross-attention to the memory, and a sparse MoE SwiGLU FFN (through
``kernels.moe``), RMSNorm everywhere, one output head per semantic-ID level. With
``tie_code_embeddings`` a level's codes have one table, read by the encoder, the decoder's input and
that level's head (T5's sharing, which TIGER inherits).
Copy head (``copy_head``, with candidates): a pointer-generator output. At every position the decoder
state also attends over the candidates whose codes agree with the item's codes generated so far, and
a learned gate mixes that pointer's distribution (each candidate's mass on its code at this level)
with the head's softmax. The model learns when and which candidate to follow; the search still
ranks every live item by the mixed probabilities, under the same trie constraint.

Decoder layout. A session of m items with D code levels is m*D decoder positions. Instead of a BOS
token per item, position t = slot*D + level carries a learned (slot, level) embedding, and its input
is the embedding of the code generated at t-1 (a learned start vector at t = 0); position t predicts
the code of (slot, level). This saves the BOS step per item (m*D steps instead of m*(D+1)). The
point-wise layout is the first D positions of the same model (one slot).

Incremental decoding (``prepare_decoding``, ``step_input``, ``decode_step``, ``DecoderLayer.step``)
serves a search whose rows sit at different positions: each row carries its own position, the
self-attention cache (K and V of all layers in one tensor) is written at it and read up to it, rows
are grouped by beam width for cross-attention, and each row reads its own level's columns of one
matmul over every level's head. The stored weights are fused at load time (``DecodeWeights``: QKV,
every layer's cross K/V, one input table, one output head) and never saved that way.

Shapes: B requests, S history length, D levels, T = m*D decoder positions, R = B*beams rows,
d = d_model, H heads, dh = d/H.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels.moe import moe

# Keys of a stored model config that were renamed: old name -> current name (``ModelConfig.from_dict``).
RENAMED_CONFIG_KEYS = {"max_history": "history_window"}
# The candidates' recipe, which is also the kNN baseline's (onerec.baselines.CooccurrenceKnn): neighbour
# lists from co-occurrence within this window, and these weights for the newest three history items.
CANDIDATE_WINDOW = 3
CANDIDATE_RECENCY = (1.0, 0.5, 0.25)
# The parts of the neighbour weights a model may keep beside them, by the option that keeps each: every part is
# the same count with other settings, a part of each weight, so each source's share enters also as its fraction.
NEIGHBOUR_PARTS = (("candidate_directions", "neighbour_forward"), ("candidate_recency", "neighbour_recent"))
# kept float32 by OneRecModel._apply
EXACT_BUFFERS = ("neighbour_items", "neighbour_weights", *(name for _, name in NEIGHBOUR_PARTS))


@dataclass
class ModelConfig:
    level_sizes: list[int] = field(default_factory=lambda: [64, 64, 64])  # code vocabulary per level
    session_items: int = 5  # m: items per generated session
    history_window: int = 50  # the encoder reads at most this many recent items
    d_model: int = 64
    n_heads: int = 4
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    d_ff: int = 128  # hidden width of the encoder FFN and of each expert
    n_experts: int = 4
    experts_top_k: int = 2
    user_buckets: int = 1000  # hashed user-id embedding table size (1: one learned user token for all)
    dropout: float = 0.1  # on attention probabilities
    catalogue_items: int = 0  # items with a neighbour list (the catalogue trained on); 0 = no candidates
    candidate_tokens: int = 0  # K co-occurrence candidates in the encoder memory (and neighbours kept per item)
    embedding_dropout: float = 0.0  # on the encoder's and the (teacher-forced) decoder's input embeddings
    candidate_scores: bool = False  # each candidate also carries its co-occurrence score (log and share of the top)
    tie_code_embeddings: bool = False  # one (V_l, d) table per level: encoder items, decoder inputs, output head
    copy_head: bool = False  # each level's distribution also mixes in a learned pointer over the candidates
    residual_dropout: float = 0.0  # on each sublayer's output (attention, FFN, MoE) before it joins the residual
    # Weight of a neighbour seen *before* an item in the candidates' co-occurrence (one seen after it weighs 1;
    # onerec.tokenizer.cooccurrence's ``backward``). 1: symmetric, the kNN baseline's count and older models'.
    candidate_backward: float = 1.0
    # The candidates' count fades each pair with its age in its sequence, exp(-age / candidate_decay) (age: items
    # after the pair's later item; onerec.tokenizer.cooccurrence's ``decay``). 0: every pair counts alike.
    candidate_decay: float = 0.0
    # With candidate_scores: each candidate's score also enters split by its source, the share each of the
    # newest three history items gave it (so "strong neighbour of the last item" differs from "weak neighbour
    # of all three" at the same sum).
    candidate_sources: bool = False
    # With candidate_scores: each candidate also carries log(1 + its own co-occurrence mass), the sum of its
    # neighbour weights, a popularity proxy that lets the model read a score relative to how common the item is.
    candidate_mass: bool = False
    # With candidate_sources: each source's share also enters divided by that history item's whole neighbour
    # mass, an estimate of P(candidate | source) that a raw count hides (a popular source gives every
    # neighbour a large count).
    candidate_transitions: bool = False
    # With candidate_sources: each source's share also enters as the fraction of it counted *after* the
    # source (the candidates' count weighs both directions, ``candidate_backward``), so "bought next" and
    # "bought before" differ at the same share. Needs the neighbour lists' forward part (``neighbour_forward``).
    candidate_directions: bool = False
    # With candidate_sources and a whole count (candidate_decay 0): each source's share also enters as the fraction
    # of it left when every pair fades with its age at this scale, exp(-age / candidate_recency), so "often, long
    # ago" and "often, lately" differ at the same share; the count that ranks candidates stays whole. Needs the
    # neighbour lists' faded part (``neighbour_recent``). 0: off, as in the recipe: on Beauty it lowered test N@10 on
    # both seeds tried (README round 32, quality_beauty_cpu_levers32.json).
    candidate_recency: float = 0.0
    # Each catalogue item also has its own learned vector (catalogue_items, d), added to its code sum wherever the
    # encoder reads it (history and candidates), as SASRec's item table does: items that share codes still
    # differ in the memory. The decoder and heads keep the code tables. An item without a catalogue row (added
    # after training) reads the code sum alone. Off: on Beauty (1.17M parameters against 0.4M) the validation loss
    # rose after epoch 5 on both seeds tried, 0.05 above the default's at that epoch (README round 33,
    # quality_beauty_cpu_levers33.json).
    item_vectors: bool = False
    # Each level's output head also has a learned bias per code: a prior (how often a code is the answer) that
    # the tied code vectors would otherwise have to hold in their dot product with every decoder state. Off: on
    # Beauty test N@10 fell on both seeds tried, R@10 rose, all inside the seed spread (README round 37, levers37.json).
    head_bias: bool = False
    # Each node of the catalogue's code trie (a code under the codes before it; at the last level, an item) has a
    # learned bias added to that code's logit: a per-item prior, as SASRec's per-item output scores hold, that the
    # code tables (one vector per code, shared by every prefix) cannot. A node the catalogue trained on lacks (an
    # item added later) has none. Off: on Beauty it learned faster but overfitted sooner, and test R@10 fell on both
    # seeds tried (README round 38, levers38.json).
    node_bias: bool = False

    @property
    def depth(self) -> int:
        return len(self.level_sizes)

    def option_conflict(self) -> str | None:
        """Why these candidate options cannot go together, or None: the one rule the model's constructor and
        the bundle's config check both apply."""
        if self.copy_head and not self.candidate_tokens:
            return "copy_head needs candidate_tokens > 0 (the candidates it points at)"
        if (self.candidate_sources or self.candidate_mass) and not (self.candidate_tokens and self.candidate_scores):
            return "candidate_sources and candidate_mass need candidate_tokens > 0 and candidate_scores"
        for key in ("candidate_transitions", "candidate_directions", "candidate_recency"):
            if getattr(self, key) and not self.candidate_sources:
                return f"{key} needs candidate_sources (it divides or splits each source's share)"
        for key, what in (
            ("item_vectors", "catalogue rows its vectors are indexed by"),
            ("node_bias", "catalogue whose trie nodes it biases"),
        ):
            if getattr(self, key) and not self.candidate_tokens:
                return f"{key} needs candidate_tokens > 0 (the {what})"
        if self.candidate_recency and self.candidate_decay:
            return "candidate_recency needs a whole count (candidate_decay 0): it is the faded part of each weight"
        return None

    def neighbour_parts(self) -> list[str]:
        """The buffers of the neighbour weights' parts this model keeps, in the order their fractions enter."""
        return [name for key, name in NEIGHBOUR_PARTS if getattr(self, key)]

    def neighbour_part_counts(self) -> dict[str, tuple[float, float]]:
        """(backward, decay) of the co-occurrence count behind each part this model keeps, by buffer name."""
        counts = part_counts(self.candidate_backward, self.candidate_decay, self.candidate_directions,
                             self.candidate_recency)  # fmt: skip
        return dict(zip(self.neighbour_parts(), counts, strict=True))

    @property
    def session_positions(self) -> int:
        return self.session_items * self.depth

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """The config of a manifest, old or new: ``history_window`` was called ``max_history`` by the
        first published versions, whose manifests still load."""
        data = dict(data)
        for old, new in RENAMED_CONFIG_KEYS.items():
            if old in data:
                if new in data:
                    raise ValueError(f"model config has both {old!r} and its new name {new!r}")
                data[new] = data.pop(old)
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.float() * scale).to(x.dtype) * self.weight


class Attention(nn.Module):
    """Multi-head attention with separate q and kv inputs (self- or cross-attention)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h = cfg.n_heads
        self.dh = cfg.d_model // cfg.n_heads
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
        self.o = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.h, self.dh).transpose(1, 2)  # (b, H, n, dh)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(x).chunk(2, dim=-1)  # (b, n, d) each
        return self.split(k), self.split(v)  # (b, H, n, dh) each

    def forward(
        self, x: torch.Tensor, kv_src: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        # x: (b, n, d); kv_src: (b, s, d); mask: (b, 1, 1|n, s) True = attend
        q = self.split(self.q(x))
        k, v = self.project_kv(kv_src)
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=causal)
        return self.o(out.transpose(1, 2).reshape(x.shape))  # (b, n, d)


class SwiGLU(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate = nn.Linear(d, f, bias=False)
        self.up = nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoEFFN(nn.Module):
    """E SwiGLU experts behind a top-k softmax gate; compute goes through ``kernels.moe``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, d, f = cfg.n_experts, cfg.d_model, cfg.d_ff
        self.top_k = cfg.experts_top_k
        self.kernel_backend: str | None = None  # passed to kernels.moe; set by OneRecModel.use_kernel_backend
        self.router = nn.Parameter(torch.randn(e, d) * 0.02)  # (E, d)
        self.w_gate = nn.Parameter(torch.randn(e, d, f) / math.sqrt(d))  # (E, d, f)
        self.w_up = nn.Parameter(torch.randn(e, d, f) / math.sqrt(d))  # (E, d, f)
        self.w_down = nn.Parameter(torch.randn(e, f, d) / math.sqrt(f))  # (E, f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (tokens, d)
        return moe(
            flat, self.router, self.w_gate, self.w_up, self.w_down, self.top_k, backend=self.kernel_backend
        ).view(shape)

    def balance_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Switch-style load balancing: E * sum_e (share of tokens routed to e) * (mean gate prob of e)."""
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax((flat @ self.router.t()).float(), dim=-1)  # (tokens, E)
        chosen = probs.topk(self.top_k, dim=-1).indices
        share = F.one_hot(chosen, probs.shape[-1]).float().sum(1).mean(0) / self.top_k  # (E,)
        return probs.shape[-1] * (share * probs.mean(0)).sum()


class SublayerDropout(nn.Dropout):
    """Residual dropout on a sublayer's output, as SASRec's blocks have; when it is off (inference, or
    p = 0) it calls no op at all, where ``nn.Dropout`` would, so the decode step's op count does not grow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if self.training and self.p > 0.0 else x


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n1, self.attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.n2, self.ffn = RMSNorm(cfg.d_model), SwiGLU(cfg.d_model, cfg.d_ff)
        self.drop = SublayerDropout(cfg.residual_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        norm = norm_for(self.training)
        h = norm(self.n1, x)
        x = x + self.drop(self.attn(h, h, mask))
        return x + self.drop(self.ffn(norm(self.n2, x)))


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, cross-attention to the memory, and the MoE FFN, each residual.

    Training (``forward``: every position at once, teacher-forced) and incremental decoding (``step``:
    one position per row, against a cache) differ only in how the two attentions are computed;
    ``_blocks`` is the layer's one structure, and both paths run through it.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n1, self.self_attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.n2, self.cross_attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.n3, self.moe = RMSNorm(cfg.d_model), MoEFFN(cfg)
        self.drop = SublayerDropout(cfg.residual_dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mem_mask: torch.Tensor) -> torch.Tensor:
        return self.forward_with_router_input(x, memory, mem_mask)[0]

    def forward_with_router_input(
        self, x: torch.Tensor, memory: torch.Tensor, mem_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's output and what its MoE router saw: n3 of the input *after* both attention blocks.

        x: (B, T, d) every decoder position at once; memory: (B, S+1, d); mem_mask: (B, 1, 1, S+1).
        """
        return self._blocks(
            x,
            _module_norm,
            lambda h: self.self_attn(h, h, causal=True),
            lambda h: self.cross_attn(h, memory, mem_mask),
        )

    def step(self, x: torch.Tensor, i: int, qkv_weight: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """One decoder position for every row of ``batch``; the same math as ``forward`` at that position.

        x: (R, d); i: this layer's index in the cache; qkv_weight: (3d, d) fused [q / sqrt(dh); k; v].
        Norms take ``rms`` (one fused op) where training keeps the module's own ops.
        """
        return self._blocks(
            x,
            rms,
            lambda h: self._cached_self_attention(h, i, qkv_weight, batch),
            lambda h: self._grouped_cross_attention(h, i, batch),
        )[0]

    def _blocks(
        self,
        x: torch.Tensor,
        norm: Callable[[RMSNorm, torch.Tensor], torch.Tensor],
        self_attend: Callable[[torch.Tensor], torch.Tensor],
        cross_attend: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual structure of the layer: returns its output and the MoE router's input.

        Residual dropout (training only) regularises every sublayer; at inference it is the identity.
        """
        x = x + self.drop(self_attend(norm(self.n1, x)))
        x = x + self.drop(cross_attend(norm(self.n2, x)))
        routed = norm(self.n3, x)
        return x + self.drop(self.moe(routed)), routed

    def _cached_self_attention(
        self, h: torch.Tensor, i: int, qkv_weight: torch.Tensor, batch: StepBatch
    ) -> torch.Tensor:
        """Self-attention of one new position per row, (R, d) -> (R, d), output projection included.

        It writes the row's K/V at its own position and reads positions <= it (an additive mask, since
        rows sit at different positions). With one query per row it is done elementwise (multiply, sum
        over dh, softmax over positions): on CPU that beats SDPA, whose kernels are tuned for long
        sequences, 2-3x at 32-512 rows.
        """
        rows, d = h.shape
        sa = self.self_attn
        heads, dh, t_hi = sa.h, sa.dh, batch.t_hi
        qkv = F.linear(h, qkv_weight)  # (R, 3d)
        cache = batch.cache[:, i]  # (R, 2, T, d)
        cache[batch.rows, :, batch.pos] = qkv[:, d:].view(rows, 2, d)
        k, v = cache[:, 0, :t_hi].view(rows, t_hi, heads, dh), cache[:, 1, :t_hi].view(rows, t_hi, heads, dh)
        score = (qkv[:, :d].view(rows, 1, heads, dh) * k).sum(-1)  # (R, t_hi, H)
        if batch.self_mask is not None:
            score = score + batch.self_mask
        prob = torch.softmax(score, dim=1, dtype=torch.float32)  # (R, t_hi, H)
        prob = prob if prob.dtype == h.dtype else prob.to(h.dtype)
        att = (prob[..., None] * v).sum(1)  # (R, H, dh)
        return F.linear(att.view(rows, d), sa.o.weight)

    def _grouped_cross_attention(self, h: torch.Tensor, i: int, batch: StepBatch) -> torch.Tensor:
        """Cross-attention of one position per row, (R, d) -> (R, d): each request's beams sit on the
        query axis against that request's memory K/V, one SDPA call per beam-width group."""
        d = h.shape[1]
        ca = self.cross_attn
        q = F.linear(h, ca.q.weight)  # (R, d)
        outs = []
        for g in batch.groups:
            n_req = (g.stop - g.start) // g.width
            qg = q[g.start : g.stop].view(n_req, g.width, ca.h, ca.dh).transpose(1, 2)  # (Q_w, H, w, dh)
            att = F.scaled_dot_product_attention(qg, g.k[i], g.v[i], attn_mask=g.mask)  # (Q_w, H, w, dh)
            outs.append(att.transpose(1, 2).reshape(g.stop - g.start, d))
        return F.linear(outs[0] if len(outs) == 1 else torch.cat(outs), ca.o.weight)


@dataclass
class NextItemTargets:
    """The auxiliary item-level softmax of a training batch (``OneRecModel.next_item_logits``)."""

    catalogue_codes: torch.Tensor  # (I, D) every item's code path, the softmax's classes in order
    targets: torch.Tensor  # (B,) each sample's next item, a row of catalogue_codes
    weight: float  # its share in the loss (added to the per-code cross-entropy)


@dataclass
class CandidateCopy:
    """What the copy head reads of each request's K candidates (``OneRecModel.copy_source``)."""

    keys: torch.Tensor  # (B, K, d) the pointer's key of each candidate (from its encoder output)
    codes: torch.Tensor  # (B, K, D) each candidate's code path
    valid: torch.Tensor  # (B, K) False where the slot holds no candidate


@dataclass
class CopyRows:
    """The copy head's inputs at one decode step, one row per (request, beam)."""

    keys: torch.Tensor  # (R, K, d) the row's request's candidate keys
    codes: torch.Tensor  # (R, K) each candidate's code at the row's level
    match: torch.Tensor  # (R, K) a real candidate whose codes equal the row's item so far


@dataclass
class EncoderState:
    """What decoding needs from the encoder: per-request cross-attention K/V, shared by all beams.

    K and V of every decoder layer sit in one tensor, so a request's whole encoder state is one slice
    (``cross_kv[:, :, b]``) that a search can keep, pad or select without a per-layer loop.
    """

    cross_kv: torch.Tensor  # (layers, 2, B, H, S+1, dh): [k, v] per decoder layer
    mask: torch.Tensor  # (B, 1, 1, S+1) True = attend
    copy: CandidateCopy | None = None  # with ``copy_head``


@dataclass
class DecodeWeights:
    """Inference-time fusions of the stored weights, built at load time and never saved.

    The safetensors names and shapes stay those of the modules; these are concatenated copies, so a
    decode step does one projection where the modules would do two or three. ``stale()`` says when the
    module weights were changed in place afterwards (a training step), so the holder rebuilds them.
    """

    qkv: list[torch.Tensor]  # per decoder layer (3d, d): self-attention [q / sqrt(dh); k; v] output rows
    cross_kv: torch.Tensor  # (layers*2*d, d): every layer's cross-attention [k; v], one matmul over memory
    table: torch.Tensor  # (1 + sum V + T, d): [start vector; level 0 codes; level 1 codes; ...; positions]
    code_offset: list[int]  # row of level l's code 0 in ``table``
    pos_offset: int  # row of position 0 in ``table``
    head: torch.Tensor  # (sum V, d): every level's output head, one matmul for rows at any levels
    head_columns: torch.Tensor  # (D, V_max) int64: level l's columns of ``head``'s output (clamped past V_l)
    head_valid: torch.Tensor  # (D, V_max) bool: column c < V_l
    head_bias: torch.Tensor | None = None  # (sum V,) every level's per-code bias (``head_bias``), else None
    sources: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # (parameter, its version when fused)

    def stale(self) -> bool:
        return any(p._version != v for p, v in self.sources)


@dataclass
class StepBatch:
    """Where the rows of one decode step sit; built by the search, read by every decoder layer.

    Rows are grouped by beam width (contiguous groups, a request's beams contiguous inside its group),
    and each row carries its own position, so requests of both modes and any width share the step.
    """

    cache: torch.Tensor  # (R, layers, 2, T, d) self-attention K/V, row r written at pos[r]
    rows: torch.Tensor  # (R,) int64 arange, the row index of the cache write
    pos: torch.Tensor  # (R,) int64 decoder position t of each row
    t_hi: int  # max(pos) + 1: positions any row reads
    self_mask: torch.Tensor | None  # (R, t_hi, 1) additive: 0 at positions <= pos[r], -inf after; None if all equal
    groups: list[CrossGroup]
    level: torch.Tensor  # (R,) int64 code level of each row's position
    copy: CopyRows | None = None  # with ``copy_head``
    prefix: torch.Tensor | None = None  # (R,) int64 path key of the codes before ``level`` (with ``node_bias``)


@dataclass
class CrossGroup:
    """Requests of one beam width: their beams sit on the query axis against their own memory."""

    start: int  # first row of the group
    stop: int  # one past its last row
    width: int  # beams per request
    kv: torch.Tensor  # (layers, 2, Q_w, H, S_w, dh) memory K/V, padded to the group's longest history
    mask: torch.Tensor  # (Q_w, 1, 1, S_w) True = attend
    k: list[torch.Tensor] = field(init=False)  # per layer (Q_w, H, S_w, dh), views of kv made once
    v: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.k = list(self.kv[:, 0].unbind(0))
        self.v = list(self.kv[:, 1].unbind(0))


def rms(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` in one fused op where the dtype allows (the module spells it out in five)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return norm(x)


def _module_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` by the module's own ops: what training differentiates (``rms`` is for decoding)."""
    return norm(x)


def norm_for(training: bool) -> Callable[[RMSNorm, torch.Tensor], torch.Tensor]:
    """The encoder's norm: the module's own ops in training, one fused op (``rms``) at inference."""
    return _module_norm if training else rms


def part_counts(backward: float, decay: float, directions: bool, recency: float) -> list[tuple[float, float]]:
    """(backward, decay) of the count behind each neighbour part kept, in ``NEIGHBOUR_PARTS`` order: the forward
    part is the count with backward 0, the recent part the whole count faded at ``recency``. The one definition
    the served model's buffers (``ModelConfig.neighbour_part_counts``) and the training candidates share."""
    return [(0.0, decay)] * directions + [(backward, recency)] * (recency > 0)


def candidate_score_features(cfg: ModelConfig) -> int:
    """How many numbers describe a candidate's score: log and share of the top, plus one per source."""
    per_source = len(CANDIDATE_RECENCY) * (
        int(cfg.candidate_sources) + int(cfg.candidate_transitions) + len(cfg.neighbour_parts())
    )
    return 2 + per_source + int(cfg.candidate_mass)


def candidate_score_inputs(score: torch.Tensor, mass: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K) scores, or (B, K, R) per-source shares (then optionally R transition estimates and R fractions
    per neighbour part after them, each in [0, 1]), and optionally (B, K) each candidate's own co-occurrence mass
    -> (B, K, F) the inputs of ``cand_score``."""
    r = len(CANDIDATE_RECENCY)
    shares = score[..., :r] if score.dim() == 3 else score
    total = shares.sum(-1) if score.dim() == 3 else score  # (B, K)
    share = total / total[:, :1].clamp(min=1e-6)  # the strongest candidate's score is first
    features = [torch.log1p(total)[..., None], share[..., None]]
    if score.dim() == 3:
        features.append(torch.log1p(shares))
        features.append(score[..., r:])  # (B, K, R * n) transitions and the parts' fractions, or nothing
    if mass is not None:
        features.append(torch.log1p(mass)[..., None])
    return torch.cat(features, dim=-1)


class OneRecModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}")
        if conflict := cfg.option_conflict():
            raise ValueError(conflict)
        self.cfg = cfg
        d = cfg.d_model
        self.enc_codes = nn.ModuleList(nn.Embedding(v, d) for v in cfg.level_sizes)
        self.enc_pos = nn.Embedding(cfg.history_window + 1, d)  # 0 = user token, 1.. = recency
        self.user = nn.Embedding(cfg.user_buckets, d)
        if cfg.candidate_tokens:
            if not cfg.catalogue_items:
                raise ValueError("candidate_tokens needs catalogue_items (the items with neighbour lists)")
            self.cand_rank = nn.Embedding(cfg.candidate_tokens, d)  # rank 0 = the strongest candidate
            if cfg.item_vectors:
                self.item_vectors = nn.Embedding(cfg.catalogue_items, d)  # catalogue row -> its own vector
            if cfg.candidate_scores:
                # [log(1 + score), score / top score] (+ log(1 + each source's share)) -> d
                self.cand_score = nn.Linear(candidate_score_features(cfg), d, bias=False)
            if cfg.copy_head:
                self.copy_query = nn.Linear(d, d, bias=False)  # decoder state -> pointer query
                self.copy_key = nn.Linear(d, d, bias=False)  # candidate's encoder output -> pointer key
                self.copy_gate = nn.Linear(d, 1)  # decoder state -> logit of the pointer's share
            # Neighbour lists (item indices, -1 = none, and weights), saved with the weights; float32 keeps
            # indices < 2**24 exact, which bundle.CONFIG_LIMITS guarantees for catalogue_items. They stay
            # float32 when the model is cast to half precision (``_apply``).
            shape = (cfg.catalogue_items, cfg.candidate_tokens)
            self.register_buffer("neighbour_items", torch.full(shape, -1.0))
            self.register_buffer("neighbour_weights", torch.zeros(shape))
            for name in cfg.neighbour_parts():  # forward: counted after the item (backward 0); recent: faded
                self.register_buffer(name, torch.zeros(shape))
            self.register_buffer("path_strides", path_strides(cfg.level_sizes), persistent=False)
            self.register_buffer("catalogue_keys", torch.zeros(0, dtype=torch.long), persistent=False)
            self.register_buffer("catalogue_rows", torch.zeros(0, dtype=torch.long), persistent=False)
            self.register_buffer("catalogue_codes", torch.zeros(0, cfg.depth, dtype=torch.long), persistent=False)
            if cfg.node_bias:
                # one bias per node of the catalogue's trie, nodes in ``node_keys`` order (at most n per level)
                self.node_bias = nn.Parameter(torch.zeros(cfg.depth * cfg.catalogue_items))
                self.register_buffer("node_keys", torch.zeros(0, dtype=torch.long), persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.enc_norm = RMSNorm(d)
        self.dec_codes = nn.ModuleList(nn.Embedding(v, d) for v in cfg.level_sizes)
        self.dec_start = nn.Parameter(torch.zeros(d))
        self.dec_pos = nn.Embedding(cfg.session_positions, d)  # (slot, level) of position t
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        self.dec_norm = RMSNorm(d)
        self.heads = nn.ModuleList(nn.Linear(d, v, bias=cfg.head_bias) for v in cfg.level_sizes)
        if cfg.tie_code_embeddings:
            # T5's (and TIGER's) sharing: a code has one vector, read by the encoder, fed to the decoder
            # and scored by the head, so what the decoder attends to in the memory (a candidate's codes)
            # is directly what its head scores. The state dict keeps every name (same tensor).
            for lvl, emb in enumerate(self.enc_codes):
                self.dec_codes[lvl].weight = emb.weight
                self.heads[lvl].weight = emb.weight
        self.apply(self._init)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> OneRecModel:
        """Every ``.to`` / ``.half`` / ``.cuda`` passes here: the neighbour lists follow the device but
        keep float32. They are data, not weights: float16 holds integers exactly only up to 2048 (bfloat16
        up to 256), so the generator's float16 cast on CUDA pointed Beauty's candidates at the wrong items,
        and co-occurrence weights past 65504 would become inf."""
        exact = {name: self._buffers[name] for name in EXACT_BUFFERS if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, before in exact.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    def use_kernel_backend(self, backend: str | None) -> None:
        """The kernel backend every MoE layer asks ``kernels.moe`` for ("torch", "triton", None = auto).

        The holder of the setting (the generator, given it by the engine) passes it down here; the
        dispatcher then decides alone, from it and the tensors.
        """
        for module in self.modules():
            if isinstance(module, MoEFFN):
                module.kernel_backend = backend

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:  # the copy gate's and the heads' (head_bias): no preference until the data has one
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    @torch.no_grad()
    def set_catalogue(self, codes: torch.Tensor) -> None:
        """The code paths of the catalogue trained on, (catalogue_items, D), in catalogue order: the
        candidates' codes, and the lookup from a history item's path to its catalogue row."""
        n = self.cfg.catalogue_items
        if codes.dim() != 2 or codes.shape[0] != n or codes.shape[1] != self.cfg.depth:
            raise ValueError(f"catalogue: want codes of shape ({n}, {self.cfg.depth}), got {tuple(codes.shape)}")
        codes = codes.to(self.path_strides.device, torch.long)
        keys, order = torch.sort((codes * self.path_strides).sum(-1))  # (n,)
        if n > 1 and bool((keys[1:] == keys[:-1]).any()):
            raise ValueError("catalogue: two items share a code path")
        self.catalogue_keys, self.catalogue_rows, self.catalogue_codes = keys, order, codes
        if self.cfg.node_bias:
            levels = torch.arange(self.cfg.depth, device=codes.device)
            prefixes = torch.cumsum(codes * self.path_strides, 1)  # (n, D): key of each item's first l+1 codes
            self.node_keys = torch.unique(prefixes * self.cfg.depth + levels)  # sorted, (nodes,)

    def node_bias_logits(self, prefix: torch.Tensor, level: torch.Tensor, width: int) -> torch.Tensor:
        """The trie-node biases of codes 0..width-1 at ``level`` under ``prefix``, (..., width); 0 off the trie.

        prefix: (...) int64 key (``path_strides``) of the codes before ``level``; level: (...) int64.
        """
        keys = self.node_keys
        if keys.numel() == 0:
            raise RuntimeError("catalogue not set: call set_catalogue(catalogue codes) first")
        codes = torch.arange(width, device=prefix.device)
        step = self.path_strides[level][..., None]  # (..., 1)
        wanted = (prefix[..., None] + codes * step) * self.cfg.depth + level[..., None]  # (..., width)
        at = torch.searchsorted(keys, wanted).clamp_(max=keys.numel() - 1)
        return torch.where(keys[at] == wanted, self.node_bias[at], 0.0)

    @torch.no_grad()
    def set_neighbours(
        self, items: torch.Tensor, weights: torch.Tensor, parts: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Each catalogue item's strongest co-occurring items, strongest first: (catalogue_items, K)
        item indices (-1 = none) and their weights (from ``onerec.tokenizer.top_neighbours``); ``parts``: the
        weights' parts this model keeps (``ModelConfig.neighbour_parts``, from ``onerec.build.candidate_part``)
        by buffer name, e.g. ``neighbour_forward`` with ``candidate_directions``."""
        shape = tuple(self.neighbour_items.shape)
        if tuple(items.shape) != shape or tuple(weights.shape) != shape:
            raise ValueError(f"neighbours: want {shape}, got {tuple(items.shape)} and {tuple(weights.shape)}")
        parts = dict(parts or {})
        if sorted(parts) != sorted(self.cfg.neighbour_parts()):
            want = self.cfg.neighbour_parts()
            raise ValueError(f"neighbours: this model's weight parts are {want}, got {sorted(parts)}")
        self.neighbour_items.copy_(items.float())
        self.neighbour_weights.copy_(torch.where(items >= 0, weights.float(), 0.0))
        for name, part in parts.items():
            if tuple(part.shape) != shape:
                raise ValueError(f"neighbours: want {name} of shape {shape}, got {tuple(part.shape)}")
            self._buffers[name].copy_(torch.where(items >= 0, part.float(), 0.0))  # type: ignore[union-attr]
        self.check_neighbours()

    def check_neighbours(self) -> None:
        """Refuse neighbour lists that would index outside the catalogue (e.g. from an edited weights file)."""
        items, n = self.neighbour_items, self.cfg.catalogue_items
        if bool(((items < -1) | (items >= n) | (items != items.round())).any()):
            raise ValueError(f"neighbour_items must hold item indices in [-1, {n})")
        for name in ("neighbour_weights", *self.cfg.neighbour_parts()):
            if not bool(torch.isfinite(self._buffers[name]).all()):  # type: ignore[arg-type]
                raise ValueError(f"{name} must be finite")

    def catalogue_index(self, hist_codes: torch.Tensor) -> torch.Tensor:
        """hist_codes (B, S, D) -> catalogue rows (B, S); -1 for a path the catalogue trained on lacks."""
        keys = self.catalogue_keys
        if keys.numel() == 0:
            raise RuntimeError("catalogue not set: call set_catalogue(catalogue codes) first")
        wanted = (hist_codes * self.path_strides).sum(-1)  # (B, S)
        at = torch.searchsorted(keys, wanted).clamp_(max=keys.numel() - 1)
        return torch.where(keys[at] == wanted, self.catalogue_rows[at], torch.full_like(at, -1))

    def candidates(self, hist_codes: torch.Tensor, hist_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K strongest co-occurrence candidates of each history: (B, K) catalogue rows (-1 = none)
        and their scores (0 = none), strongest first: (B, K), or with ``candidate_sources`` (B, K, R), the
        share of each of the newest R = 3 history items (summing to the score), followed with
        ``candidate_transitions`` by each share over its source's whole neighbour mass and then by each share's
        fraction in each part the model keeps (``candidate_directions``: counted after its source;
        ``candidate_recency``: left when the count fades).

        Score of item j: sum over the newest three history items h of weight(h's recency) *
        co-occurrence(h, j); items of the history itself are never candidates.
        """
        k, n = self.cfg.candidate_tokens, self.cfg.catalogue_items
        index = torch.where(hist_mask, self.catalogue_index(hist_codes), -1)  # (B, S)
        recency = CANDIDATE_RECENCY[: index.shape[1]]
        split = self.cfg.candidate_sources
        # One score row per source when split, else one shared row (B, n+1); column n is "none".
        shares = hist_codes.new_zeros((len(recency) if split else 1, index.shape[0], n + 1), dtype=torch.float32)
        masses = hist_codes.new_zeros((index.shape[0], len(CANDIDATE_RECENCY)), dtype=torch.float32)  # (B, R)
        parts = [(self._buffers[name], torch.zeros_like(shares)) for name in self.cfg.neighbour_parts()]
        for r, weight in enumerate(recency):
            row = index[:, r]  # (B,)
            known = (row >= 0)[:, None]
            cols = torch.where(known, self.neighbour_items[row.clamp(min=0)].long(), -1)  # (B, K)
            vals = torch.where(known, self.neighbour_weights[row.clamp(min=0)], 0.0)
            shares[r if split else 0].scatter_add_(1, torch.where(cols >= 0, cols, n), weight * vals)
            masses[:, r] = weight * vals.sum(-1)
            for part, part_shares in parts:  # each share's part, summed as the shares are
                got = torch.where(known, part[row.clamp(min=0)], 0.0)  # type: ignore[index]
                part_shares[r].scatter_add_(1, torch.where(cols >= 0, cols, n), weight * got)
        shares[:, :, n] = 0.0
        own = torch.where(index >= 0, index, n)[None].expand(shares.shape[0], -1, -1)
        shares.scatter_(2, own, 0.0)  # never the history's own items
        scores = shares[0].clone() if split else shares[0]  # (B, n+1)
        for share in shares[1:]:  # in recency order, as the training candidates sum them
            scores += share
        top, rows = scores[:, :n].topk(min(k, n), dim=1)  # (B, K)
        rows = torch.where(top > 0, rows, -1)
        if not split:
            return rows, top.clamp(min=0.0)

        def at_rows(per_source: torch.Tensor) -> torch.Tensor:
            """(r, B, n+1) -> (B, K, R): the chosen candidates' values, 0 for an empty slot or a missing source."""
            got = per_source.gather(2, rows.clamp(min=0)[None].expand(len(recency), -1, -1)).permute(1, 2, 0)
            got = torch.where((rows >= 0)[..., None], got.clamp(min=0.0), 0.0)
            return F.pad(got, (0, len(CANDIDATE_RECENCY) - len(recency)))

        by_source = at_rows(shares)  # (B, K, R)
        out = [by_source]
        if self.cfg.candidate_transitions:
            out.append(by_source / masses[:, None].clamp(min=1e-6))
        for _, part_shares in parts:
            fraction = torch.where(by_source > 0, at_rows(part_shares) / by_source.clamp(min=1e-9), 0.0)
            out.append(fraction.clamp(0.0, 1.0))
        return rows, torch.cat(out, dim=-1)

    # ---- encoder ------------------------------------------------------------------------------

    def encode(
        self,
        hist_codes: torch.Tensor,
        hist_mask: torch.Tensor,
        user: torch.Tensor,
        candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hist_codes: (B, S, D) newest first; hist_mask: (B, S) True = real item; user: (B,);
        candidates: (rows, scores), both (B, K) as ``candidates`` returns them, to use instead of
        computing them (training passes candidates computed without the sample's own user,
        ``onerec.train``).

        Returns the memory (B, M, d) and its attention mask (B, 1, 1, M), M = 1 + S (+ K candidates).
        """
        b, s, _ = hist_codes.shape
        items = self.item_embeddings(hist_codes)  # (B, S, d)
        if self.cfg.item_vectors:
            items = items + self.own_vectors(torch.where(hist_mask, self.catalogue_index(hist_codes), -1))
        x = torch.cat([self.user(user)[:, None], items], dim=1)  # (B, S+1, d)
        x = x + self.enc_pos(torch.arange(s + 1, device=x.device))[None]
        mask = torch.cat([torch.ones_like(hist_mask[:, :1]), hist_mask], dim=1)  # (B, S+1)
        if self.cfg.candidate_tokens:
            rows, score = self.candidates(hist_codes, hist_mask) if candidates is None else candidates  # (B, K)
            cand_mask = rows >= 0
            cand = self.item_embeddings(self.catalogue_codes[rows.clamp(min=0)])
            cand = cand + self.cand_rank.weight[None, : rows.shape[1]]
            if self.cfg.item_vectors:
                cand = cand + self.own_vectors(rows)
            if self.cfg.candidate_scores:
                mass = None
                if self.cfg.candidate_mass:  # (B, K), 0 for an empty slot
                    mass = torch.where(cand_mask, self.neighbour_weights[rows.clamp(min=0)].sum(-1), 0.0)
                cand = cand + self.cand_score(candidate_score_inputs(score, mass).to(cand.dtype))
            x, mask = torch.cat([x, cand], dim=1), torch.cat([mask, cand_mask], dim=1)  # M = S+1+K
        x = F.dropout(x, self.cfg.embedding_dropout, self.training)
        mask = mask[:, None, None, :]  # (B, 1, 1, M)
        for layer in self.encoder:
            x = layer(x, mask)
        return norm_for(self.training)(self.enc_norm, x), mask

    def own_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """Catalogue rows (...) -> each item's own vector (..., d) (``item_vectors``); 0 where the row is -1."""
        return torch.where((rows >= 0)[..., None], self.item_vectors(rows.clamp(min=0)), 0.0)

    def item_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., D) -> (..., d): an item is the sum of its per-level code embeddings."""
        return sum(emb(codes[..., lvl]) for lvl, emb in enumerate(self.enc_codes))  # type: ignore[return-value]

    # ---- training -----------------------------------------------------------------------------

    def decoder_inputs(self, target_codes: torch.Tensor) -> torch.Tensor:
        """target_codes: (B, m', D) -> teacher-forced decoder inputs (B, m'*D, d)."""
        b, slots, depth = target_codes.shape
        prev = [self.dec_start.expand(b, 1, -1)]
        flat = target_codes.reshape(b, slots * depth)
        for t in range(1, slots * depth):
            prev.append(self.dec_codes[(t - 1) % depth](flat[:, t - 1])[:, None])
        x = torch.cat(prev, dim=1)  # (B, T, d)
        x = x + self.dec_pos(torch.arange(slots * depth, device=x.device))[None]
        return F.dropout(x, self.cfg.embedding_dropout, self.training)

    def position_log_probs(
        self,
        hist_codes: torch.Tensor,
        hist_mask: torch.Tensor,
        user: torch.Tensor,
        target_codes: torch.Tensor,
        candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Teacher-forced log p(code) at every decoder position: per level (B, m', V_l), and the MoE
        balance loss. The one full-sequence path: the training loss, IPA's session log-probs and the
        tests' reference for the decode step all read it.

        target_codes: (B, m', D); candidates: see ``encode``.
        """
        log_probs, balance, _ = self._teacher_forced(hist_codes, hist_mask, user, target_codes, candidates)
        return log_probs, balance

    def _teacher_forced(
        self,
        hist_codes: torch.Tensor,
        hist_mask: torch.Tensor,
        user: torch.Tensor,
        target_codes: torch.Tensor,
        candidates: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """``position_log_probs`` plus the encoder memory (B, M, d) it decoded from, which the
        training loss's item-level softmax also reads."""
        if self.cfg.candidate_tokens and candidates is None:
            candidates = self.candidates(hist_codes, hist_mask)
        memory, mem_mask = self.encode(hist_codes, hist_mask, user, candidates)
        x = self.decoder_inputs(target_codes)
        balance = x.new_zeros((), dtype=torch.float32)
        for layer in self.decoder:
            x, routed = layer.forward_with_router_input(x, memory, mem_mask)
            balance = balance + layer.moe.balance_loss(routed)
        x = self.dec_norm(x)  # (B, T, d)
        copy = self.copy_source(memory, candidates[0]) if self.cfg.copy_head and candidates is not None else None
        depth = self.cfg.depth
        out = []
        for lvl, head in enumerate(self.heads):
            x_lvl = x[:, lvl::depth]  # (B, m', d)
            logits = head(x_lvl)  # (B, m', V_lvl)
            if self.cfg.node_bias:
                prefix = (target_codes[:, :, :lvl] * self.path_strides[:lvl]).sum(-1)  # (B, m')
                level = torch.full_like(prefix, lvl)
                logits = logits + self.node_bias_logits(prefix, level, logits.shape[-1]).to(logits.dtype)
            if copy is None:
                out.append(torch.log_softmax(logits.float(), dim=-1))
                continue
            prefix = target_codes[:, :, None, :lvl]  # (B, m', 1, lvl): the item's codes before this level
            match = copy.valid[:, None] & (copy.codes[:, None, :, :lvl] == prefix).all(-1)  # (B, m', K)
            out.append(self.copy_mix(x_lvl, logits, copy.keys[:, None], copy.codes[:, None, :, lvl], match))
        return out, balance / len(self.decoder), memory

    def forward(
        self,
        hist_codes: torch.Tensor,
        hist_mask: torch.Tensor,
        user: torch.Tensor,
        target_codes: torch.Tensor,
        target_mask: torch.Tensor | None = None,
        slot_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
        next_items: NextItemTargets | None = None,
        sample_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced next-token loss over sessions. Returns (mean cross-entropy, MoE balance loss).

        target_codes: (B, m', D); target_mask: (B, m') True where the slot holds a real item (a user's
        last session can be shorter than m). slot_weights (length >= m') weighs each slot's codes in the
        mean (default: all 1); next-item quality reads slot 1 only, so training may favour it.
        label_smoothing is passed to the cross-entropy of every code. candidates: see ``encode``.
        next_items adds its weight times the item-level softmax loss of ``next_item_logits`` (training only).
        sample_weights: (B,) each sample's weight in the code-level mean (default: all 1).
        """
        log_probs, balance, memory = self._teacher_forced(hist_codes, hist_mask, user, target_codes, candidates)
        depth = self.cfg.depth
        b, slots = target_codes.shape[:2]
        flat = target_codes.reshape(b, -1)  # (B, T)
        if target_mask is None:
            target_mask = torch.ones(target_codes.shape[:2], dtype=torch.bool, device=flat.device)
        weight = target_mask.float()  # (B, m')
        if slot_weights is not None:
            if len(slot_weights) < slots:
                raise ValueError(f"{len(slot_weights)} slot weights for {slots} slots")
            weight = weight * torch.tensor(list(slot_weights)[:slots], dtype=torch.float32, device=flat.device)
        if sample_weights is not None:
            weight = weight * sample_weights[:, None]
        weight = weight.flatten()  # (B*m',)
        loss = weight.new_zeros(())
        for lvl, logp in enumerate(log_probs):
            # logp is already normalised, so cross_entropy's own log-softmax leaves it as it is
            ce = F.cross_entropy(
                logp.flatten(0, 1),
                flat[:, lvl::depth].flatten(),
                reduction="none",
                label_smoothing=label_smoothing,
            )
            loss = loss + (ce * weight).sum() / weight.sum().clamp(min=1e-6)
        loss = loss / depth
        if next_items is not None and next_items.weight > 0:
            logits = self.next_item_logits(memory, next_items.catalogue_codes)  # (B, I)
            loss = loss + next_items.weight * F.cross_entropy(logits.float(), next_items.targets)
        return loss, balance

    def next_item_logits(self, memory: torch.Tensor, catalogue_codes: torch.Tensor) -> torch.Tensor:
        """Item-level scores of every catalogue item from the user token's encoder output: (B, I).

        Why: the code-level loss never compares whole items, so nothing asks two items that follow the
        same histories to have close embeddings (the sum of their codes' vectors). This auxiliary
        softmax, SASRec's full cross-entropy, asks exactly that of the encoder and the code tables the
        decoder shares; serving never calls it. memory: (B, M, d); catalogue_codes: (I, D).
        """
        return memory[:, 0] @ self.item_embeddings(catalogue_codes).T  # (B, d) @ (d, I)

    # ---- copy head ----------------------------------------------------------------------------

    def copy_source(self, memory: torch.Tensor, rows: torch.Tensor) -> CandidateCopy:
        """The pointer's keys and the code paths of the candidates, which sit last in the memory.

        memory: (B, M, d) from ``encode`` with candidates; rows: (B, K) their catalogue rows (-1 = none).
        """
        k = rows.shape[1]
        return CandidateCopy(self.copy_key(memory[:, -k:]), self.catalogue_codes[rows.clamp(min=0)], rows >= 0)

    def copy_mix(
        self, x: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor, codes: torch.Tensor, match: torch.Tensor
    ) -> torch.Tensor:
        """log((1 - g) softmax(logits) + g pointer) over one level's codes, float32 (pointer-generator).

        The pointer attends over the candidates that still match the item being generated and puts
        each one's weight on its code at this level; g = sigmoid(gate(x)), and g = 0 where no
        candidate matches. x: (..., d); logits: (..., V); keys: (..., K, d); codes, match: (..., K).
        """
        score = (self.copy_query(x).float().unsqueeze(-2) * keys.float()).sum(-1) * x.shape[-1] ** -0.5  # (..., K)
        # a large finite fill, not -inf: a row with no match must not turn the softmax's gradient to NaN
        point = torch.softmax(score.masked_fill(~match, -1e9), dim=-1) * match  # (..., K), 0 off the matches
        mass = point.new_zeros((*point.shape[:-1], logits.shape[-1]))
        mass.scatter_add_(-1, codes.expand(point.shape), point)  # (..., V) the pointer's mass per code
        gate = self.copy_gate(x).float().squeeze(-1)  # (...,) logit of g
        found = match.any(-1)  # (...,)
        keep = torch.where(found, F.logsigmoid(-gate), 0.0)  # log(1 - g)
        generated = torch.log_softmax(logits.float(), dim=-1) + keep[..., None]
        copied = torch.log(mass.clamp(min=1e-30)) + F.logsigmoid(gate)[..., None]
        return torch.logaddexp(generated, torch.where(found[..., None], copied, float("-inf")))

    # ---- incremental decoding -----------------------------------------------------------------

    @torch.no_grad()
    def decode_weights(self) -> DecodeWeights:
        """Fuse the stored weights for decoding (concatenated copies; state_dict is untouched)."""
        sources = [p for layer in self.decoder for p in (layer.self_attn.q.weight, layer.self_attn.kv.weight)]
        sources += [layer.cross_attn.kv.weight for layer in self.decoder]
        sources += [self.dec_start, self.dec_pos.weight, *(e.weight for e in self.dec_codes)]
        sources += [h.weight for h in self.heads]
        biases = [h.bias for h in self.heads if h.bias is not None]
        sources += biases
        scale = (self.cfg.d_model // self.cfg.n_heads) ** -0.5  # SDPA's 1/sqrt(dh), folded into q
        qkv = [torch.cat([layer.self_attn.q.weight * scale, layer.self_attn.kv.weight]) for layer in self.decoder]
        cross_kv = torch.cat([layer.cross_attn.kv.weight for layer in self.decoder])
        table = torch.cat([self.dec_start[None], *(e.weight for e in self.dec_codes), self.dec_pos.weight])
        sizes = [0, *self.cfg.level_sizes]
        code_offset = [1 + sum(sizes[: lvl + 1]) for lvl in range(self.cfg.depth)]
        pos_offset = 1 + sum(self.cfg.level_sizes)
        head = torch.cat([h.weight for h in self.heads])
        v = torch.tensor(self.cfg.level_sizes)
        starts = torch.cumsum(v, 0) - v  # (D,) first column of each level
        span = torch.arange(int(v.max()))  # (V_max,)
        columns = (starts[:, None] + span[None, :]).clamp(max=head.shape[0] - 1)
        return DecodeWeights(
            qkv,
            cross_kv,
            table,
            code_offset,
            pos_offset,
            head,
            columns.to(head.device),
            (span[None, :] < v[:, None]).to(head.device),
            torch.cat(biases) if biases else None,
            [(p, p._version) for p in sources],
        )

    @torch.no_grad()
    def prepare_decoding(
        self,
        hist_codes: torch.Tensor,
        hist_mask: torch.Tensor,
        user: torch.Tensor,
        weights: DecodeWeights | None = None,
    ) -> EncoderState:
        """Encode once per request and project every decoder layer's cross-attention K/V in one matmul."""
        candidates = self.candidates(hist_codes, hist_mask) if self.cfg.candidate_tokens else None
        memory, mem_mask = self.encode(hist_codes, hist_mask, user, candidates)  # (B, M, d), (B, 1, 1, M)
        b, s1, d = memory.shape
        cfg = self.cfg
        w = weights.cross_kv if weights is not None else torch.cat([la.cross_attn.kv.weight for la in self.decoder])
        kv = F.linear(memory, w).view(b, s1, cfg.n_decoder_layers, 2, cfg.n_heads, d // cfg.n_heads)
        copy = self.copy_source(memory, candidates[0]) if cfg.copy_head and candidates is not None else None
        return EncoderState(kv.permute(2, 3, 0, 4, 1, 5).contiguous(), mem_mask, copy)

    def step_input(self, tokens: torch.Tensor, weights: DecodeWeights) -> torch.Tensor:
        """Decoder input of each row, (R, d): one gather-sum over the fused table.

        tokens: (R, 2) int64 rows of ``weights.table``: [previous code (or the start vector), position].
        Position t's input is the embedding of the code generated at t-1 (the start vector at t = 0)
        plus the (slot, level) embedding of t.
        """
        return F.embedding_bag(tokens, weights.table, mode="sum")

    @torch.no_grad()
    def decode_step(self, x: torch.Tensor, batch: StepBatch, weights: DecodeWeights) -> torch.Tensor:
        """One position for every row; returns logits (R, V_max) over each row's own level.

        Columns past a row's level are -inf and never read. All levels' heads are one matmul, and each
        row gathers its level's columns, so a step costs the same ops whether its rows sit at one level
        or at all of them (a per-level loop cost about 25 ops per level present), and a row's logits
        come from the same ops alone or beside rows at other levels. With ``batch.copy`` the logits are
        the copy head's mixed log-probs (float32).
        """
        for i, layer in enumerate(self.decoder):
            x = layer.step(x, i, weights.qkv[i], batch)
        x = rms(self.dec_norm, x)  # (R, d)
        off_level = ~weights.head_valid.index_select(0, batch.level)  # (R, V_max)
        logits = F.linear(x, weights.head, weights.head_bias)  # (R, sum V)
        logits = logits.gather(1, weights.head_columns.index_select(0, batch.level))
        if batch.prefix is not None:
            logits = logits + self.node_bias_logits(batch.prefix, batch.level, logits.shape[1]).to(logits.dtype)
        logits = logits.masked_fill(off_level, float("-inf"))  # (R, V_max)
        copy = batch.copy
        if copy is None:
            return logits
        mixed = self.copy_mix(x, logits, copy.keys, copy.codes, copy.match)
        return mixed.masked_fill(off_level, float("-inf"))  # the pointer's floor would fill them

    def allocate_cache(self, rows: int, positions: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Self-attention cache, (rows, layers, 2, positions, d): K and V of all layers in one tensor.

        Rows first, so one ``index_select`` reorders (and compacts) every layer's K and V at once;
        positions last but one, so a row's keys of one layer are one block that attention reads in order.
        """
        cfg = self.cfg
        return torch.zeros(rows, cfg.n_decoder_layers, 2, positions, cfg.d_model, device=device, dtype=dtype)


def path_strides(level_sizes: Sequence[int]) -> torch.Tensor:
    """Mixed-radix strides that make a code path one int64 key: key = sum(code[l] * stride[l])."""
    strides, span = [], 1
    for size in reversed(level_sizes):
        strides.append(span)
        span *= int(size)
    if span >= 1 << 62:
        raise ValueError(f"level sizes {list(level_sizes)} make {span} code paths: too many for int64 keys")
    return torch.tensor(strides[::-1], dtype=torch.long)


def hash_user(user_id: str, buckets: int) -> int:
    """Stable bucket of a user id (FNV-1a: Python's hash() is salted per process)."""
    h = 0xCBF29CE484222325
    for byte in user_id.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h % buckets
