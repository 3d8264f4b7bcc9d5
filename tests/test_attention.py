"""Attention: the fused and explicit paths agree, GQA grouping, RoPE's properties, the KV cache."""

import pytest
import torch

from attention import (CausalSelfAttention, KVCache, apply_rope, causal_mask, math_attention, repeat_kv,
                       rope_cache, sdpa_attention)
from conftest import tiny_config


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("T,S", [(16, 16), (1, 16), (5, 16)])  # training, decoding, prefill after a cache
def test_sdpa_matches_math(n_kv_head, T, S):
    q = torch.randn(2, 4, T, 16)
    k, v = torch.randn(2, n_kv_head, S, 16), torch.randn(2, n_kv_head, S, 16)
    y_math, att = math_attention(q, k, v)
    y_sdpa = sdpa_attention(q, k, v)
    assert (y_math - y_sdpa).abs().max() < 1e-5
    assert torch.allclose(att.sum(-1), torch.ones(2, 4, T), atol=1e-6)  # rows are distributions
    assert (att[..., ~causal_mask(T, S)] == 0).all()  # nothing from the future


def test_repeat_kv_maps_query_head_h_to_kv_head_h_div_n_rep():
    kv = torch.arange(3).float().view(1, 3, 1, 1).expand(1, 3, 2, 4)  # kv head g holds the value g
    out = repeat_kv(kv, 4)  # 12 query heads
    assert out.shape == (1, 12, 2, 4)
    assert [int(out[0, h, 0, 0]) for h in range(12)] == [h // 4 for h in range(12)]


def test_causal_mask_is_bottom_right_aligned():
    m = causal_mask(2, 5)  # 2 new queries after 3 cached keys
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


def test_rope_gives_relative_positions():
    """RoFormer eq. (16): <R_m q, R_n k> depends on m - n only."""
    cos, sin = rope_cache(32, 128)
    q, k = torch.randn(32), torch.randn(32)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, 32), cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k.view(1, 1, 1, 32), cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum()

    assert torch.allclose(score(10, 3), score(57, 50), atol=1e-4)
    assert torch.allclose(score(0, 0), q @ k, atol=1e-5)  # position 0 is no rotation
    assert not torch.allclose(score(10, 3), score(10, 4), atol=1e-3)


def test_rope_preserves_norm_and_matches_theta_frequencies():
    cos, sin = rope_cache(8, 16, theta=100.0)
    # pair i rotates by pos * theta^(-2i/d): check position 1 directly
    assert torch.allclose(cos[1, :4], torch.cos(100.0 ** (-torch.arange(0, 8, 2) / 8)), atol=1e-6)
    x = torch.randn(1, 2, 16, 8)
    assert torch.allclose(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_rotate_half_equals_meta_interleaved_rope_after_permutation():
    """Meta's RoPE rotates neighbouring pairs (2i, 2i+1) as complex numbers; ours (and HF's)
    rotates (i, i + d/2). Permuting the projection's output features maps one onto the other,
    which is what Hugging Face's conversion script does to wq and wk."""
    d, T = 16, 10
    x = torch.randn(1, 1, T, d)  # a projected query, in Meta's interleaved feature order
    freqs = 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    angles = torch.outer(torch.arange(T).float(), freqs)
    meta = torch.view_as_real(torch.view_as_complex(x.view(1, 1, T, d // 2, 2)) * torch.polar(
        torch.ones_like(angles), angles)).flatten(-2)
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # interleaved -> halves
    cos, sin = rope_cache(d, T)
    ours = apply_rope(x[..., perm], cos, sin)
    assert torch.allclose(ours, meta[..., perm], atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_kv_cache_decoding_equals_full_attention(impl):
    cfg = tiny_config(attn_impl=impl)
    attn = CausalSelfAttention(cfg).eval()
    cos, sin = rope_cache(cfg.head_dim, cfg.block_size)
    x = torch.randn(2, 12, cfg.n_embd)
    full = attn(x, cos[:12], sin[:12])
    cache = KVCache(2, cfg.n_kv_head, cfg.block_size, cfg.head_dim)
    parts = [attn(x[:, :5], cos[:5], sin[:5], cache)]  # prefill 5 positions, then one at a time
    for t in range(5, 12):
        parts.append(attn(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1], cache))
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5
    assert cache.length == 12
    assert cache.k.shape == (2, cfg.n_kv_head, cfg.block_size, cfg.head_dim)  # n_kv_head heads, not n_head


def test_kv_cache_bytes_scale_with_n_kv_head():
    sizes = {g: KVCache(1, g, 256, 64).nbytes for g in (8, 2, 1)}
    assert sizes[8] == 2 * 8 * 256 * 64 * 4  # keys + values, fp32
    assert sizes[8] == 4 * sizes[2] == 8 * sizes[1]


def test_kv_cache_overflow_is_an_error():
    cache = KVCache(1, 1, 4, 8)
    cache.update(torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 3, 8))
    with pytest.raises(ValueError, match="overflow"):
        cache.update(torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8))


def test_prefix_keys_are_visible_to_every_query_and_enter_the_cache_once():
    cfg = tiny_config()
    attn = CausalSelfAttention(cfg).eval()
    P = 3
    pk, pv = torch.randn(1, cfg.n_kv_head, P, cfg.head_dim), torch.randn(1, cfg.n_kv_head, P, cfg.head_dim)
    attn.prefix = lambda B: (pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1))
    cos, sin = rope_cache(cfg.head_dim, cfg.block_size)
    x = torch.randn(1, 6, cfg.n_embd)
    full = attn(x, cos[:6], sin[:6])
    cache = KVCache(1, cfg.n_kv_head, P + cfg.block_size, cfg.head_dim)
    steps = [attn(x[:, :2], cos[:2], sin[:2], cache)] + [attn(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1], cache)
                                                         for t in range(2, 6)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    assert cache.length == P + 6
    attn.prefix = None
    assert (attn(x, cos[:6], sin[:6]) - full).abs().max() > 1e-3  # the prefix did change the output
