r"""Causal self-attention with grouped key/value heads, rotary positions and a KV cache.

Papers:
  - Attention Is All You Need (arXiv:1706.03762), section 3.2.1: softmax(QK^T / sqrt(d)) V.
  - RoFormer (arXiv:2104.09864), section 3.4: rotary position embedding (RoPE).
  - Fast Transformer Decoding (MQA, arXiv:1911.02150) and GQA (arXiv:2305.13245),
    section 2: fewer key/value heads than query heads.
  - Sparse Transformer (arXiv:1904.10509) section 4.2: strided + local attention, an
    optional mask (GPT-3 section 2.1 alternates such layers with dense ones).

Notation used in the shape comments:
  B batch, T new tokens (the queries), S keys/values visible to them (prefix + cache + new),
  C = n_embd, hd = head_dim = C // n_head, n_rep = n_head // n_kv_head.

Grouped-query attention: query head h reads key/value head h // n_rep.

    query heads   q0 q1 q2 q3   q4 q5 q6 q7      n_head    = 8
                   \  \ /  /     \  \ /  /
    kv heads          kv0           kv1          n_kv_head = 2   (GQA-2)

n_kv_head == n_head is multi-head attention (MHA), n_kv_head == 1 is multi-query (MQA).
The KV cache stores only the n_kv_head heads: that is GQA's memory saving in decoding.
"""

import math

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

# ----------------------------------------------------------------------------- RoPE
# RoFormer eq. (34): the feature pair (x_i, x_j) of a query or key at position m is
# rotated by the angle m * theta_i, theta_i = rope_theta ** (-2i / hd), i = 0 .. hd/2 - 1.
# The dot product of a rotated query (position m) and key (position n) then depends
# only on m - n: relative position falls out of attention.
#
# Layout: "rotate-half" (GPT-NeoX / Hugging Face): feature i is paired with feature
# i + hd/2. Meta's original code pairs neighbours (2i, 2i + 1) as complex numbers; the two
# are the same rotation after permuting the rows of wq and wk, which is what Hugging
# Face's conversion script does once. Since we use the Hugging Face layout, HF checkpoints
# load as they are (tests/test_attention.py shows the other layout and the permutation).


def rope_cache(head_dim, max_len, theta=10000.0):
    """cos and sin of m * theta_i for every position m < max_len: two (max_len, hd) tensors."""
    # fp32, in the same order of operations as Hugging Face, so long contexts agree too
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (hd/2,)
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (max_len, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (max_len, hd): the same angle for i and i + hd/2
    return angles.cos(), angles.sin()


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate x (B, heads, T, hd) by the angles of its T positions, cos/sin: (T, hd)."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


# ----------------------------------------------------------------------------- GQA
def repeat_kv(x, n_rep):
    """The one place that maps query heads to key/value heads.

    (B, n_kv_head, S, hd) -> (B, n_head, S, hd) where query head h = g * n_rep + r reads
    kv head g = h // n_rep. The fused path passes enable_gqa=True to
    scaled_dot_product_attention instead, which uses this same grouping without the
    copy (tests/test_attention.py checks that the two agree).
    """
    if n_rep == 1:
        return x
    return repeat(x, "b g s d -> b (g r) s d", r=n_rep)


# ----------------------------------------------------------------------------- masks
def causal_mask(T, S, device=None):
    """(T, S) boolean mask, True where query t may read key s.

    The T queries are the *last* T of the S positions (keys to their left come from a
    prefix or the KV cache), so query t sees keys s <= t + (S - T): a causal mask
    aligned to the bottom-right corner.
    """
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def sparse_causal_mask(T, S, local, stride, device=None):
    """(T, S) boolean mask of the Sparse Transformer's strided pattern (Child et al. 2019,
    arXiv:1904.10509, section 4.2), both of its heads merged into one: query i reads key
    j <= i when j is among its last `local` positions, i - j < local (the local band), or
    when i - j is a multiple of `stride` (the strided columns that carry information
    from far back). Bottom-right aligned like causal_mask; local or stride 0 turns that
    part off. Each query then reads about local + i / stride keys instead of i + 1.
    """
    i = torch.arange(S - T, S, device=device)[:, None]  # the queries' positions
    j = torch.arange(S, device=device)[None, :]
    back = i - j  # how far back key j is from query i
    causal = back >= 0
    near = back < local if local else torch.zeros_like(causal)
    strided = back % stride == 0 if stride else torch.zeros_like(causal)
    return causal & (near | strided)


# ----------------------------------------------------------------------------- two paths
def math_attention(q, k, v, mask=None, dropout_p=0.0):
    """The explicit path, for reading: softmax(Q K^T / sqrt(hd) + causal mask) V.

    q: (B, n_head, T, hd); k, v: (B, n_kv_head, S, hd). mask: (T, S) bool or None for
    the plain causal mask. Returns y (B, n_head, T, hd) and the attention weights
    (B, n_head, T, S).
    """
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, n_head, S, hd)
    T, S = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, n_head, T, S)
    if mask is None:
        mask = causal_mask(T, S, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    att = F.softmax(scores.float(), dim=-1).to(q.dtype)  # softmax in fp32, as HF does
    y = F.dropout(att, dropout_p) @ v  # (B, n_head, T, hd)
    return y, att


def sdpa_attention(q, k, v, mask=None, dropout_p=0.0):
    """The fused path: the same result without materializing the (T, S) scores on GPU
    (FlashAttention / memory-efficient kernels). Same arguments as math_attention."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if mask is None and T == S:  # plain causal: let the kernel build the mask
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    if mask is None and T == 1:  # one new token reads everything to its left
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=gqa)
    if mask is None:
        mask = causal_mask(T, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


# ----------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of one layer for incremental decoding, preallocated once.

    k, v: (B, n_kv_head, max_len, hd). `update` writes the new positions in place and
    returns views of everything written so far, so a decoding step copies only the
    new token's keys and values.
    """

    def __init__(self, batch_size, n_kv_head, max_len, head_dim, device=None, dtype=torch.float32):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions written so far

    def update(self, k, v):
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.k.shape[2]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, n_kv_head, S, hd)

    @property
    def nbytes(self):
        return self.k.nbytes + self.v.nbytes


# ----------------------------------------------------------------------------- the module
class CausalSelfAttention(nn.Module):
    """Multi-head attention with n_kv_head key/value heads (MHA, GQA or MQA), no biases."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        C = config.n_embd
        self.wq = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        self.attn_impl = config.attn_impl  # "sdpa" (fused) or "math" (explicit)
        self.dropout = config.dropout
        self.save_weights = False  # set True to keep the last attention weights (math path)
        self.weights = None
        # Prefix-tuning hook (peft.apply_prefix sets it): a callable B -> (k, v), each
        # (B, n_kv_head, P, hd), keys/values every query can read, placed left of the text;
        # its prefix_len attribute is P.
        self.prefix = None

    def forward(self, x, cos, sin, cache=None, mask=None):
        """x: (B, T, C); cos, sin: (T, hd) for the T positions; cache: KVCache or None;
        mask: (T, S) bool, True where a query may read a key, or None for plain causal.

        project -> rotate (RoPE) -> prepend the prefix / append to the cache -> attend.
        """
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if self.prefix is not None and (cache is None or cache.length == 0):
            pk, pv = self.prefix(B)  # (B, n_kv_head, P, hd), enters the cache once
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, n_kv_head, S, hd): everything so far

        dropout_p = self.dropout if self.training else 0.0
        if self.attn_impl == "math":
            y, att = math_attention(q, k, v, mask, dropout_p)
            self.weights = att.detach() if self.save_weights else None
        else:
            y = sdpa_attention(q, k, v, mask, dropout_p)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, C)
        return self.wo(y)
