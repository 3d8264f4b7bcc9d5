"""A Llama-style decoder-only transformer, small to large: config, RMSNorm, SwiGLU, Block,
Transformer, generation; then parameter and FLOP counts and GQA uptraining.

Papers:
  - LLaMA (arXiv:2302.13971) section 2.2 and Llama 2 (arXiv:2307.09288): pre-norm RMSNorm,
    SwiGLU, RoPE, no biases; GQA in the larger Llama 2 models.
  - RMSNorm (arXiv:1910.07467) eq. 4; SwiGLU (arXiv:2002.05202) eq. 6.
  - PaLM (arXiv:2204.02311) section 2: parallel block, shared input/output embeddings;
    appendix B: model FLOPs utilization (MFU).
  - GQA (arXiv:2305.13245) section 2: uptraining MHA checkpoints to fewer kv heads.
  - TinyLlama (arXiv:2401.02385): the `tinyllama_1b` preset.
  - GPT-2 (Radford et al. 2019) section 2.3: residual projections initialized with a
    1/sqrt(number of residual layers) scale.

Glossary, one vocabulary for one idea:
  ours               Meta llama     litgpt            Hugging Face
  n_embd             dim            n_embd            hidden_size
  n_head             n_heads        n_head            num_attention_heads
  n_kv_head          n_kv_heads     n_query_groups    num_key_value_heads
  intermediate_size  (hidden_dim)   intermediate_size intermediate_size
  block_size         max_seq_len    block_size        max_position_embeddings
  norm_eps           norm_eps       norm_eps          rms_norm_eps
Module names follow Meta's llama (wq wk wv wo, w1 w2 w3); hf.py maps them to Hugging
Face's once.
"""

import math
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import quant
from cli import Number
from attention import CausalSelfAttention, KVCache, rope_cache, sparse_causal_mask


# ----------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    vocab_size: int = 32000  # rows of the token embedding (and of the LM head)
    block_size: int = 2048  # the context length
    n_layer: int = 22  # transformer blocks
    n_embd: int = 2048  # the residual stream's width d
    n_head: int = 32  # query heads; head_dim = n_embd // n_head
    n_kv_head: int = 4  # == n_head: MHA; 1: MQA; in between: GQA
    intermediate_size: int = 0  # SwiGLU hidden width; 0: Llama's 8/3 * n_embd rounded up
    multiple_of: int = 256  # the rounding of that default
    rope_theta: float = 10000.0  # RoPE's base: wavelengths from 2 pi to about 2 pi theta
    norm_eps: float = 1e-5  # RMSNorm's epsilon
    tie_embeddings: bool = False  # share the token embedding with the LM head (PaLM)
    parallel_block: bool = False  # PaLM's y = x + Attn(LN(x)) + MLP(LN(x))
    dropout: float = 0.0  # on attention and MLP outputs (training only)
    attn_impl: str = "sdpa"  # "sdpa": fused kernel; "math": explicit softmax(QK^T/sqrt(d))V
    bitlinear: bool = False  # BitNet: every linear layer inside the blocks is a quant.BitLinear
    bitlinear_groups: int = 1  # BitNet's group quantization (G groups of input features)
    bitlinear_ternary: bool = False  # BitNet b1.58: ternary {-1, 0, 1} weights instead of binary
    sparse_local: int = 0  # Sparse Transformer: each query reads its last sparse_local positions...
    sparse_stride: int = 0  # ...and every sparse_stride-th one before them; both 0: dense attention

    def __post_init__(self):
        if self.intermediate_size == 0:  # Llama: 2/3 of 4d, rounded up to a multiple (d=2048 -> 5632)
            self.intermediate_size = self.multiple_of * math.ceil(int(2 * 4 * self.n_embd / 3) / self.multiple_of)
        for name, admitted in RANGES.items():
            admitted.check(name, getattr(self, name))
        check(self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}):"
              f" each head gets n_embd // n_head features")
        check(self.n_head % self.n_kv_head == 0, f"n_head ({self.n_head}) must be divisible by n_kv_head "
              f"({self.n_kv_head}): each kv head serves a group of n_head // n_kv_head query heads")
        check(self.head_dim % 2 == 0, f"head_dim = n_embd // n_head = {self.head_dim} must be even (RoPE pairs)")
        check(self.attn_impl in ("sdpa", "math"), f"attn_impl must be 'sdpa' or 'math', got {self.attn_impl!r}")
        check(not self.bitlinear or (self.n_embd % self.bitlinear_groups == 0 and self.intermediate_size %
              self.bitlinear_groups == 0), f"bitlinear_groups={self.bitlinear_groups} must divide n_embd and "
              f"intermediate_size, the input widths of the linear layers")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name, **overrides):
        check(name in PRESETS, f"unknown model config {name!r}; known configs: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - {f.name for f in fields(cls)}
        check(not unknown, f"unknown model config fields {sorted(unknown)}")
        return cls(**d)


# the numbers each field admits: checked when a ModelConfig is made, stated by --help (cli.py)
RANGES = {**{name: Number(int, 1, text="a positive integer") for name in (
    "vocab_size", "block_size", "n_layer", "n_embd", "n_head", "n_kv_head", "multiple_of", "bitlinear_groups")},
    "intermediate_size": Number(int, 0), "rope_theta": Number(float, 0, low_open=True),
    "norm_eps": Number(float, 0, low_open=True), "dropout": Number(float, 0, 1, high_open=True),
    "sparse_local": Number(int, 0), "sparse_stride": Number(int, 0)}


def check(condition, message):
    """Bad input is one ValueError that says what was wrong and how to fix it."""
    if not condition:
        raise ValueError(message)


PRESETS = {
    # TinyLlama-1.1B (arXiv:2401.02385, table 1): 1,100,048,384 parameters.
    "tinyllama_1b": dict(vocab_size=32000, block_size=2048, n_layer=22, n_embd=2048, n_head=32, n_kv_head=4,
                         intermediate_size=5632, rope_theta=10000.0, norm_eps=1e-5),
    # over characters: the README's first run (train.py --config first; it prints its parameter count)
    "first": dict(vocab_size=128, block_size=128, n_layer=4, n_embd=128, n_head=4, n_kv_head=2),
    # A GQA model that trains on a laptop CPU (BPE vocabulary of 4096).
    "demo": dict(vocab_size=4096, block_size=256, n_layer=6, n_embd=384, n_head=6, n_kv_head=2),
    # The smallest preset: trains in seconds, for tests and smoke runs.
    "debug": dict(vocab_size=128, block_size=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=2),
    # A draft model for speculative decoding with `demo` (decode.py): the same BPE vocabulary and
    # context, 2 narrow layers (~8x fewer weight bytes to read per token).
    "demo_draft": dict(vocab_size=4096, block_size=256, n_layer=2, n_embd=128, n_head=2, n_kv_head=1),
}


# ----------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, eq. 4): a_i / RMS(a) * g_i, RMS(a) = sqrt(mean(a^2) + eps).

    No mean subtraction and no bias, unlike LayerNorm. F.rms_norm computes exactly this
    formula in one fused kernel (tests/test_model.py checks it against the formula).
    """

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # g

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020, eq. 6): w2( Swish(x w1) * (x w3) ), Swish = SiLU.

    w1 is the gate (HF gate_proj), w3 the up projection (up_proj), w2 the down (down_proj).
    """

    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block (LLaMA section 2.2): the *input* of each sub-layer is normalized.

        serial (Llama):  x = x + Attn(Norm(x));  x = x + MLP(Norm(x))
        parallel (PaLM): x = x + Attn(Norm(x)) + MLP(Norm(x))   (one norm, one pass)
    """

    def __init__(self, config):
        super().__init__()
        self.attention_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attention = CausalSelfAttention(config)
        self.ffn_norm = None if config.parallel_block else RMSNorm(config.n_embd, config.norm_eps)
        self.feed_forward = FeedForward(config)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache=None, mask=None):  # (B, T, C) -> (B, T, C)
        h = self.attention_norm(x)
        a = F.dropout(self.attention(h, cos, sin, cache, mask), self.dropout, self.training)
        if self.ffn_norm is None:
            return x + a + F.dropout(self.feed_forward(h), self.dropout, self.training)
        x = x + a
        return x + F.dropout(self.feed_forward(self.ffn_norm(x)), self.dropout, self.training)


# ----------------------------------------------------------------------------- the model
class Transformer(nn.Module):
    """Token embedding -> n_layer Blocks -> RMSNorm -> LM head (no biases anywhere)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.output = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.bitlinear:  # BitNet section 2: only the blocks' linears; embeddings and head stay
            quant.replace_linears(self.layers, lambda lin: quant.BitLinear(
                lin.in_features, lin.out_features, config.bitlinear_groups, config.bitlinear_ternary,
                device=lin.weight.device))
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.grad_checkpoint = False  # train.py --grad_checkpoint: recompute each block in backward
        self.reset_rope()
        self.reset_parameters()

    def reset_rope(self):
        """(Re)compute the RoPE tables (not saved in checkpoints: they follow from the config)."""
        cos, sin = rope_cache(self.config.head_dim, self.config.block_size, self.config.rope_theta)
        device = self.tok_embeddings.weight.device
        self.register_buffer("rope_cos", cos.to(device), persistent=False)  # (block_size, hd)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def reset_parameters(self):
        """N(0, 0.02) for every matrix; the projections that write into the residual stream
        (wo, w2) scaled by 1/sqrt(2 * n_layer) (GPT-2 section 2.3); norms at 1."""
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual = name.endswith(("wo.weight", "w2.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.config.n_layer) if residual else 0.02)
            else:
                nn.init.ones_(p)

    def forward(self, idx, targets=None, caches=None, start_pos=0, mask=None, input_embeds=None):
        """idx: (B, T) token ids at positions start_pos .. start_pos + T - 1.

        Returns logits for all T positions (B, T, vocab_size) and, given targets (B, T),
        the mean cross-entropy over targets != -100. `caches` (one KVCache per layer)
        turns on incremental decoding; `mask` (T, S) overrides the causal mask;
        `input_embeds` (B, T, C) replaces the embedding lookup (llava.py puts image
        features among the token embeddings this way).
        """
        h = self.hidden_states(idx, caches, start_pos, mask, input_embeds)  # (B, T, C)
        logits = self.output(h)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    def hidden_states(self, idx, caches=None, start_pos=0, mask=None, input_embeds=None):
        """The last layer's normalized output (B, T, C), before the LM head: a reward or
        value head (align.py) reads these instead of the logits."""
        x = self.tok_embeddings(idx) if input_embeds is None else input_embeds  # (B, T, C)
        T = x.shape[1]
        if start_pos + T > self.config.block_size:
            raise ValueError(f"positions up to {start_pos + T} exceed the context block_size="
                             f"{self.config.block_size}; crop the input to the last {self.config.block_size} tokens")
        if mask is None and (self.config.sparse_local or self.config.sparse_stride):
            mask = self.sparse_mask(T, caches[0].length if caches is not None else 0, x.device)
        x = F.dropout(x, self.config.dropout, self.training)
        cos = self.rope_cos[start_pos:start_pos + T]  # (T, hd)
        sin = self.rope_sin[start_pos:start_pos + T]
        for i, layer in enumerate(self.layers):
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                # activation checkpointing: keep only the block's input, recompute its insides
                # in the backward pass (rematerialization, PaLM arXiv:2204.02311 section 4)
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, None, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, caches[i] if caches is not None else None, mask)
        return self.norm(x)

    def sparse_mask(self, T, cached, device):
        """The (T, S) mask every layer shares: the Sparse Transformer's pattern over the text,
        and every query reads the prefix (prefix-tuning's P keys, written into the cache
        with the first tokens)."""
        prefix = self.layers[0].attention.prefix
        P = prefix.prefix_len if prefix is not None else 0
        text = T + (cached - P if cached else 0)  # text keys visible: cached ones and the new T
        sparse = sparse_causal_mask(T, text, self.config.sparse_local, self.config.sparse_stride, device)  # (T, text)
        return torch.cat([sparse.new_ones(T, P), sparse], dim=1)  # (T, P + text)

    # ------------------------------------------------------------------------- generation
    def new_kv_caches(self, batch_size, dtype=None):
        """One preallocated KVCache per layer, long enough for the context plus any prefix."""
        c, p = self.config, self.tok_embeddings.weight
        prefix_len = getattr(self.layers[0].attention.prefix, "prefix_len", 0)
        if dtype is None:
            autocast = torch.is_autocast_enabled(p.device.type)
            dtype = torch.get_autocast_dtype(p.device.type) if autocast else p.dtype
        return [KVCache(batch_size, c.n_kv_head, c.block_size + prefix_len, c.head_dim, p.device, dtype)
                for _ in range(c.n_layer)]

    @torch.inference_mode()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        eos_id=None, generator=None, n_vocab=None):
        """Yield the next token of every row, (B,), one step at a time (for streaming).

        n_vocab limits sampling to the first n_vocab ids: the tokenizer's, when the
        embedding has more rows than the tokenizer has tokens.

        The prompt is read once (prefill) into the KV cache; then each step feeds only the
        newest token. Past the context, the window slides: each step re-reads the last
        block_size tokens (as nanoGPT's uncached loop does), which is slower.
        """
        check_sampling_args(temperature, top_k, top_p)
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must be a (B, T) tensor of token ids with T >= 1, got shape {tuple(idx.shape)}")
        if idx.min() < 0 or idx.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got "
                             f"[{idx.min().item()}, {idx.max().item()}]")
        block = self.config.block_size
        if idx.shape[1] > block:
            warnings.warn(f"prompt of {idx.shape[1]} tokens is longer than the context block_size={block}; "
                          f"keeping its last {block} tokens", stacklevel=2)
            idx = idx[:, -block:]
        B, T = idx.shape
        caches = self.new_kv_caches(B)
        logits, _ = self(idx, caches=caches)  # prefill: (B, T, vocab)
        new_ids, done = [], torch.zeros(B, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            next_id = sample_next(logits[:, -1, :n_vocab], temperature, top_k, top_p, generator)  # (B,)
            yield next_id
            new_ids.append(next_id)
            if eos_id is not None:
                done |= next_id == eos_id
                if done.all():
                    return
            if step == max_new_tokens - 1:
                return
            pos = T + step  # position of next_id
            if pos < block:
                logits, _ = self(next_id[:, None], caches=caches, start_pos=pos)  # (B, 1, vocab)
            else:  # the context is full: slide the window, start a fresh cache on its last tokens
                window = torch.cat([idx] + [t[:, None] for t in new_ids], dim=1)[:, -block:]
                caches = self.new_kv_caches(B)
                logits, _ = self(window, caches=caches)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, generator=None,
                 n_vocab=None):
        """(B, T) prompt -> (B, T + new) tokens. temperature=0 is greedy decoding. (decode.py
        adds speculative decoding and batched prompts of different lengths.)"""
        new = list(self.generate_tokens(idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, n_vocab))
        return torch.cat([idx[:, -self.config.block_size:]] + [t[:, None] for t in new], dim=1)


def check_sampling_args(temperature, top_k, top_p):
    if not temperature >= 0 or temperature == float("inf"):  # also refuses NaN
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, vocab) of the last position -> next token ids (B,), drawn from token_probs."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def token_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, vocab) -> the distribution sampling draws from, (B, vocab) fp32.

    In order, as Hugging Face applies them: temperature, top-k (keep the k most likely),
    top-p (keep the smallest set of most likely tokens whose probability reaches p).
    Temperature 0 (greedy) is the one-hot of the argmax (speculative decoding needs the
    probabilities themselves, decode.py).
    """
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float() / temperature
    if not torch.isfinite(logits).all():
        raise ValueError(f"temperature {temperature} is so small that logits / temperature overflow; "
                         f"use --temperature 0 for greedy decoding")
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # keeps >= 1 token
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return F.softmax(logits, dim=-1)


# ----------------------------------------------------------------------------- parameters and FLOPs
def block_linear_shapes(config):
    """(out, in) of each linear layer of one block: the one place the block's shapes are derived."""
    C, I, q, kv = config.n_embd, config.intermediate_size, config.n_head * config.head_dim, \
        config.n_kv_head * config.head_dim
    return {"attention.wq": (q, C), "attention.wk": (kv, C), "attention.wv": (kv, C), "attention.wo": (C, q),
            "feed_forward.w1": (I, C), "feed_forward.w3": (I, C), "feed_forward.w2": (C, I)}


def count_params(config):
    """Parameter count from the config alone (no weights allocated), as many as Transformer(config) has."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    linears = sum(o * i for o, i in block_linear_shapes(config).values())
    norms = C if config.parallel_block else 2 * C
    head = 0 if config.tie_embeddings else V * C
    return V * C + L * (linears + norms) + C + head


def flops_per_token(config, seq_len=None):
    """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 * L * H * Q * T.

    N counts the parameters that take part in a matmul: everything but the embedding
    lookup and the norms, the LM head included (also when tied). The second term is
    attention's QK^T and AV over a context of T = seq_len (H * Q = n_head * head_dim).
    """
    C, L = config.n_embd, config.n_layer
    T = config.block_size if seq_len is None else seq_len
    norms = C if config.parallel_block else 2 * C
    n_matmul = count_params(config) - config.vocab_size * C - L * norms - C
    if config.tie_embeddings:
        n_matmul += config.vocab_size * C
    return 6 * n_matmul + 12 * L * config.n_head * config.head_dim * T


# ----------------------------------------------------------------------------- GQA uptraining
def convert_kv_heads(model, n_kv_head, method="mean"):
    """A copy of `model` with n_kv_head key/value heads (GQA section 2, "uptraining").

    The query heads that will share new kv head g are the ones attention maps to it,
    h // (n_head // n_kv_head) == g (attention.repeat_kv). Their current kv heads are
    pooled into it: "mean" averages them (the paper's choice, best in its Figure 4),
    "first" keeps the first, "random" starts it fresh. The rest of the model is copied.

        MHA, 8 heads:   k0 k1 k2 k3 k4 k5 k6 k7
        GQA-2 (mean):   mean(k0..k3)  mean(k4..k7)
    """
    c = model.config
    if method not in ("mean", "first", "random"):
        raise ValueError(f"method must be 'mean', 'first' or 'random', got {method!r}")
    if n_kv_head < 1 or c.n_kv_head % n_kv_head:
        raise ValueError(f"cannot pool the model's {c.n_kv_head} kv heads into n_kv_head={n_kv_head}: it must "
                         f"divide {c.n_kv_head} (and so n_head={c.n_head})")
    group = c.n_kv_head // n_kv_head  # current kv heads pooled into each new one
    p = model.tok_embeddings.weight
    new = Transformer(ModelConfig.from_dict({**c.to_dict(), "n_kv_head": n_kv_head})).to(p.device, p.dtype)
    state = model.state_dict()
    for name, w in state.items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            heads = w.reshape(n_kv_head, group, c.head_dim, c.n_embd)  # (new kv head, pooled, hd, C)
            if method == "mean":
                w = heads.mean(dim=1)
            elif method == "first":
                w = heads[:, 0]
            else:
                w = new.state_dict()[name]  # the fresh initialization of `new`
            state[name] = w.reshape(n_kv_head * c.head_dim, c.n_embd)
    new.load_state_dict(state)
    return new
