"""decode.py: speculative decoding (greedy identity, the target's distribution), prompt
lookup, batched generation == decoding alone, quantized decoding == the dequantized model."""

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import decode
import quant
from conftest import ROOT, tiny_config
from data.tokenizer import CharTokenizer
from model import Transformer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def sharp_model(seed, scale=20.0, **kw):
    """A random model whose logits are spread out (scaled LM head): no near-ties, so greedy
    argmaxes do not depend on the last bits of a float sum."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**kw)).eval()
    with torch.no_grad():
        model.output.weight.mul_(scale)
    return model


def chi2_critical(df, z=3.719):
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.719 is the standard
    normal's 1 - 1e-4 quantile, so a correct sampler fails this test once in 10,000 seeds."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts, probs):
    """Pearson's statistic of observed counts against expected probabilities (both (V,))."""
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a sample where the distribution has no mass"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# ----------------------------------------------------------------------------- greedy identity
@pytest.mark.parametrize("k", [1, 3, 6])
def test_speculative_greedy_equals_greedy_random_models(k):
    target, draft = sharp_model(0), sharp_model(1, n_layer=1, n_embd=32, n_head=2, n_kv_head=1)
    for seed in range(4):
        idx = torch.randint(97, (1, 3 + 5 * seed), generator=torch.Generator().manual_seed(seed))
        plain = target.generate(idx, 25, temperature=0)
        stats = {}
        with_draft = decode.generate(target, idx, 25, temperature=0, draft_model=draft, num_speculative=k)
        lookup = decode.speculative_generate(target, idx, 25, "prompt", k, temperature=0, stats=stats)
        assert torch.equal(with_draft, plain)
        assert torch.equal(lookup, plain)
        assert stats["target_calls"] + stats["accepted"] == 25  # each pass emits its accepted drafts + 1


def train_on_pattern(model, steps=80, seed=0):
    """A few AdamW steps on sequences of t -> (3 t + 1) mod V from random starts."""
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        x = torch.randint(V, (16, 1), generator=g)
        for _ in range(16):
            x = torch.cat([x, (3 * x[:, -1:] + 1) % V], dim=1)
        _, loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), loss.item()


def test_speculative_greedy_trained_pair_equal_and_accepted():
    torch.manual_seed(0)
    target, target_loss = train_on_pattern(Transformer(tiny_config(vocab_size=32)))
    draft, draft_loss = train_on_pattern(Transformer(tiny_config(vocab_size=32, n_layer=1, n_embd=32, n_head=2,
                                                                 n_kv_head=1)), seed=1)
    assert target_loss < 0.1 and draft_loss < 0.1  # both learned the pattern
    idx = torch.tensor([[5, 16, 17]])
    plain = target.generate(idx, 30, temperature=0)
    for k in (2, 4, 8):
        stats = {}
        out = decode.speculative_generate(target, idx, 30, draft, k, temperature=0, stats=stats)
        assert torch.equal(out, plain)
        assert stats["accepted"] / stats["drafted"] > 0.9  # a trained draft agrees with the target
        assert stats["target_calls"] <= math.ceil(30 / (k + 1)) + 2  # ~k + 1 tokens per target pass
    untrained = {}
    decode.speculative_generate(target, idx, 30, Transformer(draft.config).eval(), 4, temperature=0,
                                stats=untrained)
    assert untrained["accepted"] / untrained["drafted"] < 0.3  # and an untrained one does not


def test_prompt_lookup_copies_the_continuation():
    assert decode.prompt_lookup([1, 2, 3, 4, 9, 9, 2, 3], 3) == [4, 9, 9]  # "2 3" came before, then 4 9 9
    assert decode.prompt_lookup([1, 2, 1, 5, 2, 1], 2) == [5, 2]  # the latest earlier "2 1"
    assert decode.prompt_lookup([1, 2, 3], 4) == []  # nothing repeats
    assert decode.prompt_lookup([7, 8, 7], 4, max_ngram=1) == [8, 7]


def test_rollback_rewrites_rejected_positions():
    model = sharp_model(0)
    caches = model.new_kv_caches(1)
    x = torch.randint(97, (1, 6))
    model(x, caches=caches)
    decode.rollback(caches, 4)  # forget positions 4, 5
    model(x[:, 4:], caches=caches, start_pos=4)  # re-read them
    ref = model.new_kv_caches(1)
    model(x, caches=ref)
    assert caches[0].length == 6
    torch.testing.assert_close(caches[1].k[:, :, :6], ref[1].k[:, :, :6])


# ----------------------------------------------------------------------------- the target's distribution
def test_verify_emits_the_target_distribution():
    """Leviathan et al. appendix A.1: whatever the draft q, each emitted token is ~ p."""
    g = torch.Generator().manual_seed(0)
    V, k, N = 6, 3, 100_000
    p = torch.softmax(3 * torch.randn(1, k + 1, V, generator=g), -1).expand(N, -1, -1)
    q = torch.softmax(3 * torch.randn(1, k, V, generator=g), -1).expand(N, -1, -1)
    drafts = torch.stack([torch.multinomial(q[0, i], N, replacement=True, generator=g) for i in range(k)], 1)
    n, nxt = decode.verify(p, q, drafts, g)
    first = torch.where(n >= 1, drafts[:, 0], nxt)
    counts = torch.bincount(first, minlength=V).double()
    assert chi2(counts, p[0, 0].double()) < chi2_critical(V - 1)
    assert chi2(counts, q[0, 0].double()) > 10 * chi2_critical(V - 1)  # the test can tell p from q
    second = torch.where(n >= 2, drafts[:, 1], nxt)[n >= 1]  # after an accepted first draft
    assert chi2(torch.bincount(second, minlength=V).double(), p[0, 1].double()) < chi2_critical(V - 1)
    assert (n == k).any() and (n == 0).any()  # every branch taken: rejections and the bonus token


@pytest.mark.parametrize("lookup_first", [False, True])
def test_speculative_sampling_matches_target_joint_distribution(lookup_first):
    """End to end, with the KV caches: the first two sampled tokens' joint distribution
    (16 outcomes) is the target's, computed exactly, not the draft's. lookup_first: the
    prompt repeats a token, so the first round drafts by prompt lookup (a certain q) and
    later rounds by whichever drafter the context calls for."""
    V = 4
    target = sharp_model(0, scale=10.0, vocab_size=V, n_layer=1, n_embd=16, n_head=2, n_kv_head=1)
    draft = sharp_model(3, scale=10.0, vocab_size=V, n_layer=1, n_embd=16, n_head=2, n_kv_head=1)
    prompt = torch.tensor([[3, 1, 3]] if lookup_first else [[1, 3]])  # "3" repeats: the first round looks up

    def joint(model):  # P(a, b | prompt), (V * V,)
        with torch.no_grad():
            pa = torch.softmax(model(prompt)[0][0, -1].double(), -1)
            two = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], 1)
            pb = torch.softmax(model(two)[0][:, -1].double(), -1)  # (V, V)
        return (pa[:, None] * pb).flatten()

    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V * V, dtype=torch.float64)
    looked_up, T = [], prompt.shape[1]
    for _ in range(700):
        stats = {}
        out = decode.speculative_generate(target, prompt, 3, draft, 2, temperature=1.0, generator=g, stats=stats,
                                          lookup_first=lookup_first)
        counts[out[0, T] * V + out[0, T + 1]] += 1
        looked_up.append(stats["looked_up"])
    p, q = joint(target), joint(draft)
    assert 0.5 * (p - q).abs().sum() > 0.3  # the draft really is another distribution
    assert p.min() * counts.sum() > 5  # every outcome expected often enough for Pearson's chi-square
    assert chi2(counts, p) < chi2_critical(V * V - 1)
    assert chi2(counts + 1, q) > 10 * chi2_critical(V * V - 1)
    # every run's first round drafted its k = 2 tokens by lookup (or no run looked anything up)
    assert min(looked_up) >= 2 if lookup_first else max(looked_up) == 0


# ----------------------------------------------------------------------------- batched generation
@pytest.mark.parametrize("cuda_graph", [False, True])  # True: decode.GraphStep's fixed-shape step, run eagerly here
def test_batched_equals_alone_greedy(cuda_graph):
    model = sharp_model(0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 11, 1, 7, 11)]
    alone = [model.generate(torch.tensor([p]), 20, temperature=0)[0].tolist() for p in prompts]
    assert decode.batched_generate(model, prompts, 20, temperature=0, cuda_graph=cuda_graph) == alone
    eos = alone[1][len(prompts[1]) + 4]  # the fifth new token of row 1 ends it; the others go on
    out = decode.batched_generate(model, prompts, 20, temperature=0, eos_id=eos, cuda_graph=cuda_graph)
    for row, prompt, ref in zip(out, prompts, alone):
        new = ref[len(prompt):]
        assert row == (prompt + new[:new.index(eos) + 1] if eos in new else ref)  # cut after its own eos
    assert len(out[1]) == len(prompts[1]) + 5


def test_graph_step_writes_one_slot_and_reads_only_real_keys():
    model = sharp_model(1)
    step = decode.GraphStep(model, 2)
    step.prefill(*decode.left_pad([[1, 2, 3, 4, 6], [5]], 0))  # an earlier call's keys in slots 0-4
    idx, key_real, pos = decode.left_pad([[5, 6, 7], [8]], 0)
    step.prefill(idx, key_real, pos)
    before = step.kv[0].k.clone()
    logits = step(torch.tensor([9, 9]))
    changed = (step.kv[0].k != before).any(-1).any(1)  # (B, S): the slots written
    assert changed.nonzero().tolist() == [[0, 3], [1, 3]]
    assert step.key_real[:, :5].tolist() == [[True, True, True, True, False], [False, False, True, True, False]]
    assert step.pos.tolist() == [[3], [1]] and step.slot.tolist() == [3]
    alone = model(torch.tensor([[8, 9]]))[0][:, -1]  # row 1 alone: its pads and slot 4 are unread
    torch.testing.assert_close(logits[1:], alone, rtol=1e-5, atol=1e-5)


def test_graph_step_is_kept_and_remade_when_the_model_changes():
    import peft
    model = sharp_model(2)
    first = decode.graph_step(model, 3)
    assert decode.graph_step(model, 3) is first
    assert decode.graph_step(model, 2) is not first  # another batch size: a new step
    changes = [lambda: model.to(torch.float64),  # new parameter memory: the recorded addresses are stale
               model.reset_rope,  # new RoPE tables (a longer context, another theta)
               model.train, model.eval,  # dropout on or off
               lambda: peft.apply_lora(model, r=2, targets=("q", "v")),  # new modules
               lambda: peft.merge_lora(model)]  # same addresses, another path through LoRALinear
    for change in changes:
        before = decode.graph_step(model, 2)
        change()
        assert decode.graph_step(model, 2) is not before
    before = decode.graph_step(model, 2)
    with torch.autocast("cpu", torch.bfloat16):  # another dtype for the matmuls and the KV cache
        assert decode.graph_step(model, 2) is not before
    with torch.autocast("cpu", torch.float16):
        assert decode.graph_step(model, 2).kv[0].k.dtype == torch.float16
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6], [5]]
    alone = [model.generate(torch.tensor([p]), 12, temperature=0)[0].tolist() for p in prompts]
    first = None
    for _ in range(2):  # the second call reuses the first one's step and caches
        assert decode.batched_generate(model, prompts, 12, temperature=0, cuda_graph=True) == alone
        first = first or decode.graph_step(model, 3)
        assert decode.graph_step(model, 3) is first


def test_graph_path_refuses_what_it_cannot_replay():
    model = sharp_model(4)
    running = decode.batched_tokens(model, [[1, 2]], 5, temperature=0, cuda_graph=True)
    next(running)
    with pytest.raises(ValueError, match="still running"):  # they would share one KV cache
        next(decode.batched_tokens(model, [[3]], 5, temperature=0, cuda_graph=True))
    running.close()  # finished or dropped: the step is free again
    alone = model.generate(torch.tensor([[3]]), 2, temperature=0)[0].tolist()
    assert decode.batched_generate(model, [[3]], 2, temperature=0, cuda_graph=True) == [alone]
    with pytest.raises(ValueError, match="plain and LoRA models only"):
        decode.batched_generate(quant.quantize_model(sharp_model(4), "int8"), [[1]], 3, cuda_graph=True)
    sparse = Transformer(tiny_config(sparse_local=4, sparse_stride=4))
    with pytest.raises(ValueError, match="sparse attention"):
        decode.batched_generate(sparse, [[1, 2]], 3)
    assert decode.batched_generate(model, [[1, 2], [3]], 0) == [[1, 2], [3]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "autocast"])
def test_cuda_graph_replay_equals_eager_on_gpu(dtype):
    import sample
    model = sharp_model(0).cuda()
    if dtype == "bfloat16":
        model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 11, 1, 7)]
    with torch.autocast("cuda", torch.bfloat16, enabled=dtype == "autocast"):  # sample.py's setting
        eager = decode.batched_generate(model, prompts, 30, temperature=0)
        for _ in range(2):  # recorded, then reused
            assert decode.batched_generate(model, prompts, 30, temperature=0, cuda_graph=True) == eager
        assert decode.graph_step(model, len(prompts)).graph is not None  # a CUDA graph was recorded
        assert decode.batched_generate(model, prompts[:1], 30, temperature=0, cuda_graph=True) == eager[:1]
        eos = eager[1][len(prompts[1]) + 4]  # row 1 ends early; the finished row is fed pads in the replay
        assert decode.batched_generate(model, prompts, 30, temperature=0, eos_id=eos, cuda_graph=True) == \
            decode.batched_generate(model, prompts, 30, temperature=0, eos_id=eos)
    assert sample.fits_graph_step(model, [1] * 11, 30) and not sample.fits_graph_step(model, [1] * 11, 64)


class SpacedTokenizer:
    n_vocab = 97

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sample_streams_the_same_tokens_through_the_graph_step(monkeypatch, temperature):
    import argparse
    import io
    import sample
    model = sharp_model(3, scale=3.0)
    args = argparse.Namespace(max_new_tokens=25, temperature=temperature, top_k=20, top_p=None, eos_id=None)
    streams = []
    for graph in (False, True):
        monkeypatch.setattr(sample, "fits_graph_step", lambda *a: graph)  # on a CPU the step runs eagerly
        out = io.StringIO()
        ids = sample.stream(model, SpacedTokenizer(), [4, 8, 15], args, torch.Generator().manual_seed(5), out)
        streams.append((ids, out.getvalue()))
    assert streams[0] == streams[1] and len(streams[0][0]) == 28


def test_padding_mask_hides_pads_and_keeps_rows_finite():
    key_real = torch.tensor([[False, False, True, True], [True, True, True, True]])
    mask = decode.padding_mask(key_real, 4)[:, 0]  # (B, T, S)
    assert mask[0].tolist() == [[True, False, False, False], [False, True, False, False],
                                [False, False, True, False], [False, False, True, True]]
    assert mask[1].tolist() == torch.ones(4, 4, dtype=torch.bool).tril().tolist()


# ----------------------------------------------------------------------------- quantized decoding
def dequantized_copy(model):
    """The same model with every quantized linear replaced by an nn.Linear of its dequantized weight."""
    import copy
    dense = copy.deepcopy(model)
    for module in list(dense.modules()):
        for name, child in module.named_children():
            if isinstance(child, (quant.NF4Linear, quant.Int8Linear)):
                lin = nn.Linear(child.in_features, child.out_features, bias=False)
                lin.weight.data.copy_(child.dequantize())
                setattr(module, name, lin)
    return dense


@pytest.mark.parametrize("method", ["int8", "nf4-dq"])
def test_quantized_generate_equals_dequantized_model(method):
    model = quant.quantize_model(sharp_model(0), method)
    dense = dequantized_copy(model)
    idx = torch.randint(97, (2, 5))
    before = model.generate(idx, 20, temperature=0)  # today's path: dequantize every call
    quant.cache_dequantized(model)
    fast = model.generate(idx, 20, temperature=0)
    assert torch.equal(fast, dense.generate(idx, 20, temperature=0))
    assert torch.equal(fast, before)
    layer = model.layers[0].attention.wq
    assert layer._inference_weight.stride() == (1, layer.out_features)  # kept column-major
    # new weights (load_state_dict writes the buffers in place): the cache follows
    other = quant.quantize_model(sharp_model(5), method)
    model.load_state_dict(other.state_dict())
    assert torch.equal(model.generate(idx, 20, temperature=0), dequantized_copy(other).generate(idx, 20, temperature=0))


def test_quantized_training_path_still_recomputes():
    model = quant.quantize_model(sharp_model(0), "nf4-dq")
    quant.cache_dequantized(model)
    layer = model.layers[0].feed_forward.w1
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()  # gradients on: DequantizedMatmul, nothing cached
    assert getattr(layer, "_inference_weight", None) is None
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(3, -1))


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_one_clear_error():
    model = sharp_model(0)
    with pytest.raises(ValueError, match="draft model's vocabulary \\(50 tokens\\) differs"):
        decode.generate(model, torch.tensor([[1]]), 4, draft_model=Transformer(tiny_config(vocab_size=50)))
    for k in (0, -1, 1.5):
        with pytest.raises(ValueError, match="num_speculative .* must be an integer >= 1"):
            decode.speculative_generate(model, torch.tensor([[1]]), 4, "prompt", k)
    with pytest.raises(ValueError, match="longest prompt \\(60 tokens\\) \\+ max_new_tokens \\(10\\) exceed"):
        decode.batched_generate(model, [[1] * 60, [2]], 10)
    with pytest.raises(ValueError, match="exceed the context block_size=64"):
        decode.speculative_generate(model, torch.tensor([[1] * 60]), 10, "prompt", 2)
    with pytest.raises(ValueError, match="another tokenizer"):
        decode.check_draft(model, model, 2, CharTokenizer("abc"), CharTokenizer("abd"))
    decode.check_draft(model, model, 2, CharTokenizer("abc"), CharTokenizer("abc"))  # the same: fine


def test_cli_bad_k_is_one_line():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "decode.py"), "--draft", "prompt", "-k", "0"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["error: --num_speculative must be >= 1, got 0"]  # checked as parsed


def test_lookup_first_greedy_identity_and_both_drafters_used():
    """Prompt lookup where the context repeats, the draft model elsewhere: still token for
    token greedy, with drafts from both sources."""
    target, draft = sharp_model(0), sharp_model(1, n_layer=1, n_embd=32, n_head=2, n_kv_head=1)
    idx = torch.tensor([[4, 9, 2, 4, 9, 2, 4, 9, 7, 1]])  # "4 9" repeats: lookup has a match at first
    plain = target.generate(idx, 30, temperature=0)
    stats = {}
    out = decode.speculative_generate(target, idx, 30, draft, 3, temperature=0, stats=stats, lookup_first=True)
    assert torch.equal(out, plain)
    assert 0 < stats["looked_up"] < stats["drafted"]  # some rounds looked up, some asked the draft model
    model_only = {}
    decode.speculative_generate(target, idx, 30, draft, 3, temperature=0, stats=model_only)
    assert model_only["looked_up"] == 0
