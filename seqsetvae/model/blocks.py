"""Attention blocks for sets of events and for the causal sequence of sets.

Dimension legend (the letters of seqsetvae.batch, plus the ones set blocks need):
    M sets given to a set block (in the model: the valid sets of a batch, M <= B*S)
    N elements per set, E real elements of all M sets, I inducing points or pooling seeds
    B subjects, S sets per subject, D width, H heads

Every mask marks real elements with True, as `event_mask` and `set_mask` do. Set
blocks follow the Set Transformer of Lee et al. (2019, "Set Transformer: A
Framework for Attention-based Permutation-Invariant Neural Networks"), with
padding masks added so that padded elements never change the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def key_padding_mask(key_mask: Tensor) -> Tensor:
    """Turn a key padding mask [M, N] into a boolean SDPA mask [M, 1, 1, N].

    A row without any real key would make softmax return NaN, so such rows may
    attend to every key instead. Their output is finite but meaningless, and the
    caller must ignore it (PMA zeroes it).
    """
    empty = ~key_mask.any(dim=-1, keepdim=True)  # [M, 1]
    return (key_mask | empty)[:, None, None, :]  # [M, 1, 1, N]


def rowwise(module: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    """Apply a position-wise `module` to the real rows of `x` [M, N, D] only.

    Padded rows of the output are 0. Sets are padded to the largest set of the
    batch, so padded rows are often most of the rows, and position-wise layers
    are most of the cost of set blocks. `mask=None` applies `module` to every row.
    """
    if mask is None:
        return module(x)
    rows = module(x[mask])  # [E, D']
    return rows.new_zeros(*mask.shape, rows.shape[-1]).index_put((mask,), rows)  # [M, N, D']


SET_FF_EXPANSION = 2
"""Hidden width of the set blocks' feed-forward layers, in multiples of D.

Half the usual transformer width of 4, because set blocks run on every event
and inducing point of a batch and their feed-forward layers dominate the cost.
"""


class MultiHeadAttention(nn.Module):
    """Multi-head attention from queries to a separate key/value input.

    Scores are scaled by 1 / sqrt(D / H), the width of one head, which is the
    default of `scaled_dot_product_attention`.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"expected d_model divisible by n_heads={n_heads}, got d_model={d_model}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(
        self,
        query: Tensor,
        key_value: Tensor,
        attn_mask: Tensor | None,
        query_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from `query` [M, N, D] or [1, N, D] to `key_value` [M, N', D].

        A query of batch size 1, such as learned inducing points, is projected
        once and shared by all M sets. `attn_mask` broadcasts to [M, H, N, N']:
        boolean (True may attend) or additive float, which is cast to the query
        dtype. `query_mask` [M, N] and `key_mask` [M, N'] only skip the
        projections of padded rows, and masking keys is the job of `attn_mask`.
        Returns [M, N, D], 0 at padded queries when `query_mask` is given.
        """
        m_query, n_query, d = query.shape
        m, n_key, _ = key_value.shape
        d_head = d // self.n_heads

        q = rowwise(self.q_proj, query, query_mask)
        q = q.view(m_query, n_query, self.n_heads, d_head).transpose(1, 2).expand(m, -1, -1, -1)  # [M, H, N, D/H]
        k = rowwise(self.k_proj, key_value, key_mask)
        k = k.view(m, n_key, self.n_heads, d_head).transpose(1, 2)  # [M, H, N', D/H]
        v = rowwise(self.v_proj, key_value, key_mask)
        v = v.view(m, n_key, self.n_heads, d_head).transpose(1, 2)  # [M, H, N', D/H]

        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)  # a float mask must match the query dtype, bf16 under autocast
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)  # [M, H, N, D/H]
        out = out.transpose(1, 2).reshape(m, n_query, d)  # [M, N, D]
        return rowwise(self.out_proj, out, query_mask)


def feed_forward(d_model: int, expansion: int, dropout: float = 0.0) -> nn.Sequential:
    """Return the position-wise two-layer MLP of a transformer block, `expansion` * D wide inside."""
    return nn.Sequential(
        nn.Linear(d_model, expansion * d_model),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(expansion * d_model, d_model),
    )


class MAB(nn.Module):
    """Multihead attention block: H = LN(X + Att(X, Y)), output LN(H + FF(H)), FF SET_FF_EXPANSION * D wide."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(d_model, n_heads)
        self.norm_attention = nn.LayerNorm(d_model)
        self.ff = feed_forward(d_model, SET_FF_EXPANSION)
        self.norm_ff = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, y: Tensor, key_mask: Tensor | None, query_mask: Tensor | None = None) -> Tensor:
        """Attend from `x` [M or 1, N, D] to `y` [M, N', D] whose real elements `key_mask` [M, N'] marks.

        `key_mask=None` means every element of `y` is real. With `query_mask`
        [M, N], only real rows of `x` are computed and padded rows of the
        output are 0. Returns [M, N, D].
        """
        attn_mask = None if key_mask is None else key_padding_mask(key_mask)
        h = x + self.attention(x, y, attn_mask, query_mask=query_mask, key_mask=key_mask)
        return rowwise(self._feed_forward, h, query_mask)

    def _feed_forward(self, h: Tensor) -> Tensor:
        h = self.norm_attention(h)
        return self.norm_ff(h + self.ff(h))


class ISAB(nn.Module):
    """Induced set attention block: I learned inducing points summarise the set, then each element reads them.

    Costs O(N * I) per set in place of the O(N^2) of full self-attention.
    """

    def __init__(self, d_model: int, n_heads: int, n_inducing: int) -> None:
        super().__init__()
        self.inducing = nn.Parameter(torch.randn(n_inducing, d_model) * d_model**-0.5)  # [I, D]
        self.summarise = MAB(d_model, n_heads)
        self.broadcast = MAB(d_model, n_heads)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Map a padded set batch `x` [M, N, D] with real elements `mask` [M, N] to [M, N, D], 0 at padding."""
        summary = self.summarise(self.inducing[None], x, mask)  # [M, I, D]
        return self.broadcast(x, summary, None, query_mask=mask)


class PMA(nn.Module):
    """Pooling by multihead attention with one learned seed, masked to the real elements.

    Chosen over a masked mean because a mean weighs each event by 1 / N, so one
    abnormal measurement is diluted in a large set of routine ones. PMA learns a
    weight per event and is still invariant to order and to padding. An empty set
    pools to the zero vector.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.seed = nn.Parameter(torch.randn(1, 1, d_model) * d_model**-0.5)  # [1, 1, D]
        self.attend = MAB(d_model, n_heads)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Pool `x` [M, N, D] over its real elements `mask` [M, N] to [M, D]."""
        pooled = self.attend(self.seed, x, mask).squeeze(1)  # [M, D]
        return pooled * mask.any(dim=-1, keepdim=True)


def causal_attention_allowed(set_mask: Tensor) -> Tensor:
    """Return which sets each set may attend to, as a boolean [B, 1, S, S] (query, key).

    Query t may attend to keys t' <= t that are real sets. The diagonal is always
    allowed, so every query, a padded one too, has at least one key and softmax
    stays finite.
    """
    s = set_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=set_mask.device).tril()  # [S, S]
    diagonal = torch.eye(s, dtype=torch.bool, device=set_mask.device)  # [S, S]
    allowed = causal & (set_mask[:, None, :] | diagonal)  # [B, S, S]
    return allowed[:, None]  # [B, 1, S, S]


class TimeGapBias(nn.Module):
    """Additive attention mask: slope_h * log1p(|t_query - t_key|) per head h, -inf where attention is not allowed.

    Slopes start negative, from -1 to -1/8 across heads, so attention first decays
    with the time gap at several rates. Training may change their sign.
    """

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.slope = nn.Parameter(-torch.logspace(0.0, -3.0, n_heads, base=2.0))  # [H]

    def forward(self, set_times: Tensor, set_mask: Tensor) -> Tensor:
        """Build the mask for `set_times` [B, S] in hours and `set_mask` [B, S] to [B, H, S, S]."""
        gap = torch.log1p((set_times[:, :, None] - set_times[:, None, :]).abs())  # [B, S, S]
        bias = self.slope[None, :, None, None] * gap[:, None]  # [B, H, S, S]
        return bias.masked_fill(~causal_attention_allowed(set_mask), float("-inf"))


class CausalTransformerLayer(nn.Module):
    """Pre-norm transformer layer over the set sequence; causality comes from the attention mask it is given."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(d_model)
        self.attention = MultiHeadAttention(d_model, n_heads, dropout)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = feed_forward(d_model, 4, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """Update `x` [B, S, D] under the additive `attn_mask` [B, H, S, S] from TimeGapBias."""
        h = self.norm_attention(x)
        x = x + self.dropout(self.attention(h, h, attn_mask))
        return x + self.dropout(self.ff(self.norm_ff(x)))
