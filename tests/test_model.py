"""The decoder: config validation, sizes, the layers' formulas, generation, FLOPs."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from model import ModelConfig, RMSNorm, Transformer, count_params, flops_per_token, sample_next


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw,match", [
    (dict(n_embd=66, n_head=4), "n_embd .66. must be divisible by n_head .4."),
    (dict(n_head=4, n_kv_head=3), "n_head .4. must be divisible by n_kv_head .3."),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(vocab_size=-1), "vocab_size must be a positive integer"),
    (dict(attn_impl="flash"), "attn_impl must be 'sdpa' or 'math'"),
    (dict(dropout=1.0), "dropout must be in"),
])
def test_config_validation_names_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kw)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="known configs: tinyllama_1b, first, demo, debug"):
        ModelConfig.from_name("gpt5")


def test_tinyllama_1b_is_tinyllama():
    c = ModelConfig.from_name("tinyllama_1b")
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.intermediate_size, c.vocab_size, c.block_size) == \
        (22, 2048, 32, 4, 5632, 32000, 2048)
    assert count_params(c) == 1_100_048_384
    with torch.device("meta"):
        assert sum(p.numel() for p in Transformer(c).parameters()) == 1_100_048_384
    # Llama's default SwiGLU width: 256 * ceil(int(8d/3) / 256) gives the same 5632
    assert ModelConfig.from_name("tinyllama_1b", intermediate_size=0).intermediate_size == 5632


@pytest.mark.parametrize("name", ["demo", "debug"])
def test_small_presets_count(name):
    c = ModelConfig.from_name(name)
    assert sum(p.numel() for p in Transformer(c).parameters()) == count_params(c)
    assert c.n_kv_head < c.n_head  # both use GQA
    if name == "demo":
        assert 10e6 < count_params(c) < 30e6


# ----------------------------------------------------------------------------- layers
def test_rmsnorm_is_the_papers_formula():
    x = torch.randn(3, 5, 16) * 4 + 1
    norm = RMSNorm(16, eps=1e-5)
    norm.weight.data = torch.randn(16)
    by_hand = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.allclose(norm(x), by_hand, atol=1e-5)
    reference = torch.nn.RMSNorm(16, eps=1e-5)
    reference.weight.data = norm.weight.data
    assert torch.allclose(norm(x), reference(x), atol=1e-6)


def llama_forward_from_the_papers(model, idx):
    """The forward pass written out from LLaMA section 2.2, head by head and token by token,
    using only the model's weights: RMSNorm (eq. 4 of arXiv:1910.07467) before each
    sub-layer, RoPE (RoFormer eq. 34, pairs (i, i + hd/2)), causal softmax attention with
    kv head h // n_rep for query head h, SwiGLU w2(silu(x w1) * (x w3)), final norm, head."""
    c = model.config
    H, G, hd = c.n_head, c.n_kv_head, c.head_dim
    W = {k: v.detach() for k, v in model.state_dict().items()}

    def rmsnorm(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.norm_eps) * g

    def rope(v, m):  # rotate each pair (v_i, v_{i+hd/2}) of one head's vector by m * theta_i
        out = v.clone()
        for i in range(hd // 2):
            a = m * c.rope_theta ** (-2 * i / hd)
            out[i] = v[i] * math.cos(a) - v[i + hd // 2] * math.sin(a)
            out[i + hd // 2] = v[i + hd // 2] * math.cos(a) + v[i] * math.sin(a)
        return out

    B, T = idx.shape
    x = W["tok_embeddings.weight"][idx]  # (B, T, C)
    for layer in range(c.n_layer):
        p = f"layers.{layer}."
        h = rmsnorm(x, W[p + "attention_norm.weight"])
        q = (h @ W[p + "attention.wq.weight"].T).view(B, T, H, hd)
        k = (h @ W[p + "attention.wk.weight"].T).view(B, T, G, hd)
        v = (h @ W[p + "attention.wv.weight"].T).view(B, T, G, hd)
        heads = torch.zeros(B, T, H, hd)
        for b in range(B):
            for head in range(H):
                g = head // (H // G)
                for t in range(T):
                    qt = rope(q[b, t, head], t)
                    scores = torch.stack([qt @ rope(k[b, s, g], s) for s in range(t + 1)]) / math.sqrt(hd)
                    heads[b, t, head] = torch.softmax(scores, 0) @ v[b, :t + 1, g]
        x = x + heads.reshape(B, T, H * hd) @ W[p + "attention.wo.weight"].T
        h = rmsnorm(x, W[p + "ffn_norm.weight"])
        gate, up = h @ W[p + "feed_forward.w1.weight"].T, h @ W[p + "feed_forward.w3.weight"].T
        x = x + (F.silu(gate) * up) @ W[p + "feed_forward.w2.weight"].T
    return rmsnorm(x, W["norm.weight"]) @ W["output.weight"].T


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_forward_equals_the_papers_equations_written_out(attn_impl):
    """Golden test without optional packages: catches swapped SwiGLU projections, a
    misplaced norm, the other RoPE pairing, a wrong GQA grouping or non-causal attention."""
    model = Transformer(tiny_config(n_embd=32, n_head=4, n_kv_head=2, attn_impl=attn_impl)).eval()
    with torch.no_grad():  # gains away from 1, so a norm in the wrong place changes the output
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    idx = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        ours = model(idx)[0]
    assert (ours - llama_forward_from_the_papers(model, idx)).abs().max().item() < 1e-5


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_forward_shapes_and_no_biases(n_kv_head):
    model = Transformer(tiny_config(n_kv_head=n_kv_head))
    logits, loss = model(torch.randint(0, 97, (3, 20)))
    assert logits.shape == (3, 20, 97) and loss is None
    attn = model.layers[0].attention
    assert attn.wq.weight.shape == (64, 64) and attn.wk.weight.shape == (16 * n_kv_head, 64)
    assert all(p.dim() == 2 or "norm" in n for n, p in model.named_parameters())  # no bias vectors


def test_initial_loss_is_log_vocab_and_residual_projections_are_scaled():
    model = Transformer(tiny_config(n_layer=8))
    idx = torch.randint(0, 97, (8, 64))
    _, loss = model(idx, idx)
    assert abs(loss.item() - math.log(97)) < 0.1  # near-uniform predictions at init
    std = model.layers[0].attention.wo.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.layers[0].attention.wq.weight.std().item() - 0.02) < 0.002


def test_cpu_decoding_layout_keeps_values_and_state_dict():
    """decode.for_decoding changes strides only: same logits, same state_dict."""
    from decode import for_decoding
    model = Transformer(tiny_config())
    x = torch.randint(0, 97, (2, 8))
    before, state = model(x)[0], {k: v.clone() for k, v in model.state_dict().items()}
    for_decoding(model)
    wq = model.layers[0].attention.wq.weight  # (out, in) = (64, 64)
    assert wq.shape == (64, 64) and wq.stride() == (1, 64)  # columns contiguous
    assert torch.equal(model(x)[0], before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    tied = for_decoding(Transformer(tiny_config(tie_embeddings=True)))
    assert tied.output.weight.is_contiguous()  # the embedding's rows are looked up: it stays row-major


def test_tied_embeddings_share_one_tensor():
    model = Transformer(tiny_config(tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == count_params(model.config)


def test_parallel_block_is_attention_plus_mlp_of_one_norm():
    model = Transformer(tiny_config(parallel_block=True, n_layer=1)).eval()
    block = model.layers[0]
    assert block.ffn_norm is None
    x = torch.randn(2, 8, 64)
    cos, sin = model.rope_cos[:8], model.rope_sin[:8]
    h = block.attention_norm(x)
    assert torch.allclose(block(x, cos, sin), x + block.attention(h, cos, sin) + block.feed_forward(h), atol=1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(parallel_block=True), dict(n_kv_head=1, tie_embeddings=True),
                                dict(attn_impl="math")])
def test_overfits_one_batch(kw):
    model = Transformer(tiny_config(**kw))
    idx = torch.randint(0, 97, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_sdpa_and_math_models_agree():
    model = Transformer(tiny_config()).eval()
    idx = torch.randint(0, 97, (2, 30))
    a = model(idx)[0]
    for layer in model.layers:
        layer.attention.attn_impl = "math"
    assert (model(idx)[0] - a).abs().max() < 1e-5


def test_ignore_index_and_context_limit():
    model = Transformer(tiny_config())
    idx = torch.randint(0, 97, (2, 10))
    targets = idx.clone()
    targets[:, :5] = -100
    logits, loss = model(idx, targets)
    assert torch.allclose(loss, F.cross_entropy(logits[:, 5:].reshape(-1, 97), idx[:, 5:].reshape(-1)))
    with pytest.raises(ValueError, match="exceed the context block_size=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


# ----------------------------------------------------------------------------- generation
def uncached_greedy(model, idx, n):
    """nanoGPT's loop: re-read the whole (cropped) context for every new token."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_cached_greedy_equals_uncached(n_kv_head):
    model = Transformer(tiny_config(n_kv_head=n_kv_head)).eval()
    idx = torch.randint(0, 97, (2, 7))
    assert torch.equal(model.generate(idx, 40, temperature=0), uncached_greedy(model, idx, 40))


def test_generation_past_the_context_slides_the_window():
    model = Transformer(tiny_config(block_size=16)).eval()
    idx = torch.randint(0, 97, (1, 10))
    assert torch.equal(model.generate(idx, 20, temperature=0), uncached_greedy(model, idx, 20))


def test_long_prompt_is_cropped_with_a_warning():
    model = Transformer(tiny_config(block_size=16)).eval()
    with pytest.warns(UserWarning, match="longer than the context block_size=16"):
        out = model.generate(torch.randint(0, 97, (1, 30)), 3, temperature=0)
    assert out.shape == (1, 19)


def test_generate_validates_its_arguments():
    model = Transformer(tiny_config()).eval()
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate(idx, 2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        model.generate(idx, 2, temperature=-1)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        model.generate(torch.tensor([[5, 97]]), 2)


def test_eos_stops_generation():
    model = Transformer(tiny_config()).eval()
    idx = torch.randint(0, 97, (1, 5))
    first = model.generate(idx, 1, temperature=0)[0, -1].item()
    assert model.generate(idx, 10, temperature=0, eos_id=first).shape == (1, 6)


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {sample_next(logits, generator=g, **kw).item() for _ in range(300)}  # noqa: E731
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert draws(top_p=0.81) == {0, 1, 2}
    assert draws(top_p=0.1) == {0}  # the most likely token is always kept
    assert draws(temperature=1.0) == {0, 1, 2, 3}
    assert sample_next(logits, temperature=0).item() == 0


def test_seeded_sampling_is_reproducible():
    model = Transformer(tiny_config()).eval()
    idx = torch.randint(0, 97, (2, 4))
    a = model.generate(idx, 20, top_k=10, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 20, top_k=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- FLOPs
def test_flops_per_token_is_6n_plus_attention():
    c = tiny_config()
    n_matmul = sum(p.numel() for n, p in Transformer(c).named_parameters() if "norm" not in n and "tok_emb" not in n)
    assert flops_per_token(c, 32) == 6 * n_matmul + 12 * 2 * 4 * 16 * 32
    t = ModelConfig.from_name("tinyllama_1b")
    # 6 * (1.1B - 65.5M embedding - norms) + 12 * 22 * 2048 * 2048
    assert flops_per_token(t) == 6 * (1_100_048_384 - 32000 * 2048 - 45 * 2048) + 12 * 22 * 2048 * 2048


def test_activation_checkpointing_gives_the_same_gradients():
    model = Transformer(tiny_config())
    idx = torch.randint(0, 97, (2, 16))
    grads = []
    for checkpointed in (False, True):
        model.zero_grad()
        model.grad_checkpoint = checkpointed
        model(idx, idx)[1].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
