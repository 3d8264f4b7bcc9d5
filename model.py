"""A Llama-style decoder-only transformer, small to large: config, RMSNorm, SwiGLU, Block,
Transformer; then generation, FLOPs and the Hugging Face checkpoint exchange.

Papers (summaries in PAPERS.md):
  - LLaMA (arXiv:2302.13971) section 2.2 and Llama 2 (arXiv:2307.09288): pre-norm RMSNorm,
    SwiGLU, RoPE, no biases; GQA in the larger Llama 2 models.
  - RMSNorm (arXiv:1910.07467) eq. 4; SwiGLU (arXiv:2002.05202) eq. 6.
  - PaLM (arXiv:2204.02311) section 2: parallel block, shared input/output embeddings;
    appendix B: model FLOPs utilization (MFU).
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
Module names follow Meta's llama (wq wk wv wo, w1 w2 w3); `HF_NAMES` maps them to
Hugging Face's once.
"""

import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from attention import CausalSelfAttention, KVCache, rope_cache


# ----------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    vocab_size: int = 32000
    block_size: int = 2048  # the context length
    n_layer: int = 22
    n_embd: int = 2048
    n_head: int = 32
    n_kv_head: int = 4  # == n_head: MHA; 1: MQA; in between: GQA
    intermediate_size: int = 0  # SwiGLU hidden width; 0: Llama's 8/3 * n_embd rounded up
    multiple_of: int = 256  # the rounding of that default
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # share the token embedding with the LM head (PaLM)
    parallel_block: bool = False  # PaLM's y = x + Attn(LN(x)) + MLP(LN(x))
    dropout: float = 0.0
    attn_impl: str = "sdpa"  # "sdpa": fused kernel; "math": explicit softmax(QK^T/sqrt(d))V
    bitlinear: bool = False  # BitNet: every linear layer inside the blocks is a quant.BitLinear
    bitlinear_groups: int = 1  # BitNet's group quantization (G groups of input features)
    bitlinear_ternary: bool = False  # BitNet b1.58: ternary {-1, 0, 1} weights instead of binary
    sparse_local: int = 0  # Sparse Transformer: each query reads its last sparse_local positions...
    sparse_stride: int = 0  # ...and every sparse_stride-th one before them; both 0: dense attention

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "n_kv_head", "multiple_of"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                f"each head gets n_embd // n_head features; pick n_head among the divisors of {self.n_embd}")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head}): each key/value "
                f"head serves a group of n_head // n_kv_head query heads; pick n_kv_head among the divisors "
                f"of {self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = n_embd // n_head = {self.head_dim} must be even for RoPE's feature pairs")
        if self.intermediate_size < 0:
            raise ValueError(f"intermediate_size must be positive (or 0 for the default), got {self.intermediate_size}")
        if self.intermediate_size == 0:  # Llama: 2/3 of 4d, rounded up to a multiple (d=2048 -> 5632)
            self.intermediate_size = self.multiple_of * math.ceil(int(2 * 4 * self.n_embd / 3) / self.multiple_of)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attn_impl not in ("sdpa", "math"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'math', got {self.attn_impl!r}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError("rope_theta and norm_eps must be positive")
        if self.sparse_local < 0 or self.sparse_stride < 0:
            raise ValueError(f"sparse_local and sparse_stride must be >= 0 (0: dense), got "
                             f"{self.sparse_local} and {self.sparse_stride}")
        for width in (self.n_embd, self.intermediate_size):
            if self.bitlinear and (self.bitlinear_groups < 1 or width % self.bitlinear_groups):
                raise ValueError(f"bitlinear_groups={self.bitlinear_groups} must be >= 1 and divide the input "
                                 f"width of every linear layer (n_embd={self.n_embd}, intermediate_size="
                                 f"{self.intermediate_size})")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown model config {name!r}; known configs: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


PRESETS = {
    # TinyLlama-1.1B (arXiv:2401.02385, table 1): 1,100,048,384 parameters.
    "tinyllama_1b": dict(vocab_size=32000, block_size=2048, n_layer=22, n_embd=2048, n_head=32, n_kv_head=4,
                         intermediate_size=5632, rope_theta=10000.0, norm_eps=1e-5),
    # A 12.6M-parameter GQA model that trains on a laptop CPU (BPE vocabulary of 4096).
    "demo": dict(vocab_size=4096, block_size=256, n_layer=6, n_embd=384, n_head=6, n_kv_head=2),
    # A few hundred thousand parameters: trains in seconds, for tests and smoke runs.
    "debug": dict(vocab_size=128, block_size=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=2),
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
def column_major(w):
    """The same (out, in) matrix with strides (1, out): W^T is the contiguous one."""
    return w.t().contiguous().t()


def store_column_major(model):
    """Keep each nn.Linear weight's (out, in) shape but lay its columns out contiguously.

    Decoding one token multiplies a single vector by every weight matrix: the work is
    reading 4 bytes per parameter, so memory bandwidth, not FLOPs, sets the speed. The
    CPU BLAS reads a matrix about twice as fast in the x @ W^T product when W^T is the
    contiguous one (measured in bench.py); training's large matmuls do not care. The
    values, the shape and the state_dict are the same as nn.Linear's; only the strides
    differ. A weight tied to the embedding stays row-major (lookups read its rows).
    """
    tied = model.tok_embeddings.weight
    for m in model.modules():
        if type(m) is nn.Linear and m.weight is not tied and m.weight.is_contiguous():
            m.weight = nn.Parameter(column_major(m.weight.detach()), m.weight.requires_grad)
    return model



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
            import quant
            quant.replace_linears(self.layers, lambda lin: quant.BitLinear(
                lin.in_features, lin.out_features, config.bitlinear_groups, config.bitlinear_ternary,
                device=lin.weight.device))
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.reset_rope()
        self.reset_parameters()
        store_column_major(self)

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

    def forward(self, idx, targets=None, caches=None, start_pos=0, mask=None):
        """idx: (B, T) token ids at positions start_pos .. start_pos + T - 1.

        Returns logits for all T positions (B, T, vocab_size) and, given targets (B, T),
        the mean cross-entropy over targets != -100. `caches` (one KVCache per layer)
        turns on incremental decoding; `mask` (T, S) overrides the causal mask.
        """
        B, T = idx.shape
        if start_pos + T > self.config.block_size:
            raise ValueError(f"positions up to {start_pos + T} exceed the context block_size="
                             f"{self.config.block_size}; crop the input to the last {self.config.block_size} tokens")
        x = F.dropout(self.tok_embeddings(idx), self.config.dropout, self.training)  # (B, T, C)
        cos = self.rope_cos[start_pos:start_pos + T]  # (T, hd)
        sin = self.rope_sin[start_pos:start_pos + T]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, caches[i] if caches is not None else None, mask)
        logits = self.output(self.norm(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(B * T), ignore_index=-100)
        return logits, loss

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
        """(B, T) prompt -> (B, T + new) tokens. temperature=0 is greedy decoding."""
        new = list(self.generate_tokens(idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, n_vocab))
        return torch.cat([idx[:, -self.config.block_size:]] + [t[:, None] for t in new], dim=1)

    # ------------------------------------------------------------------------- checkpoints
    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_hf(cls, path, dtype=torch.float32, device="cpu"):
        """Load a Hugging Face Llama checkpoint directory or Hub id (see the end of this file)."""
        return load_hf_checkpoint(path, dtype, device)

    def save_hf(self, path, dtype=None):
        """Write config.json + model.safetensors that transformers' LlamaForCausalLM loads."""
        write_hf_checkpoint(self, path, dtype)


def check_sampling_args(temperature, top_k, top_p):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, vocab) of the last position -> next token ids (B,).

    In order, as Hugging Face applies them: temperature, top-k (keep the k most likely),
    top-p (keep the smallest set of most likely tokens whose probability reaches p).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # keeps >= 1 token
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- FLOPs
def count_params(config):
    """Parameter count from the config alone (no weights allocated)."""
    C, L, V, I = config.n_embd, config.n_layer, config.vocab_size, config.intermediate_size
    attn = C * config.n_head * config.head_dim * 2 + C * config.n_kv_head * config.head_dim * 2
    norms = C if config.parallel_block else 2 * C
    head = 0 if config.tie_embeddings else V * C
    return V * C + L * (attn + 3 * C * I + norms) + C + head


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


# ----------------------------------------------------------------------------- Hugging Face
# Our module names -> Hugging Face LlamaForCausalLM's (the glossary above, in code).
HF_NAMES = {
    "tok_embeddings": "model.embed_tokens",
    "norm": "model.norm",
    "output": "lm_head",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}


def hf_module_name(name):
    """'layers.3.attention.wq' -> 'model.layers.3.self_attn.q_proj' (also for '...wq.weight')."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+?)(\.weight)?", name)
    if m:
        return f"model.layers.{m[1]}.{HF_NAMES[m[2]]}{m[3] or ''}"
    m = re.fullmatch(r"(.+?)(\.weight)?", name)
    return HF_NAMES[m[1]] + (m[2] or "")


def config_from_hf(hf):
    """A Hugging Face config.json dict -> ModelConfig, refusing what this model cannot represent."""
    arch = hf.get("architectures") or [hf.get("model_type", "?")]
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
        raise ValueError(f"unsupported architecture {arch[0]!r} (model_type {hf.get('model_type')!r}): "
                         f"this loader reads Llama-format checkpoints (LlamaForCausalLM)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (only 'silu', SwiGLU)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("biases in attention or MLP (this model has none)")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} (only plain RoPE)")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        problems.append(f"head_dim={head_dim} with hidden_size != num_attention_heads * head_dim")
    if problems:
        raise ValueError("unsupported Llama variant: " + "; ".join(problems))
    return ModelConfig(
        vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"], n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def config_to_hf(config, dtype=torch.float32):
    if config.parallel_block:
        raise ValueError("a parallel_block model has no Hugging Face Llama equivalent; train it serial to export")
    if config.sparse_local or config.sparse_stride:
        raise ValueError("a sparse-attention model has no Hugging Face Llama equivalent (it attends to other "
                         "positions); export a dense one (sparse_local=0, sparse_stride=0)")
    if config.bitlinear:
        raise ValueError("a bitlinear (BitNet) model has no Hugging Face Llama equivalent: its linear layers "
                         "binarize weights and quantize activations in the forward pass; export a model "
                         "trained with bitlinear=False")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "max_position_embeddings": config.block_size,
        "num_hidden_layers": config.n_layer, "hidden_size": config.n_embd,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim, "intermediate_size": config.intermediate_size,
        "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None, "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": None, "eos_token_id": None,
    }


def load_hf_state_dict(path):
    """All tensors of a Hugging Face checkpoint directory, by their HF names.

    Reads model.safetensors, sharded *.safetensors listed in model.safetensors.index.json,
    or pytorch_model.bin (with weights_only=True: no code from the file runs).
    """
    from safetensors.torch import load_file

    def shards(index_name):
        with open(os.path.join(path, index_name)) as f:
            return sorted(set(json.load(f)["weight_map"].values()))

    if os.path.exists(os.path.join(path, "model.safetensors")):
        return load_file(os.path.join(path, "model.safetensors"))
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        state = {}
        for shard in shards("model.safetensors.index.json"):
            state.update(load_file(os.path.join(path, shard)))
        return state
    bins = (["pytorch_model.bin"] if os.path.exists(os.path.join(path, "pytorch_model.bin")) else
            shards("pytorch_model.bin.index.json") if os.path.exists(os.path.join(path, "pytorch_model.bin.index.json"))
            else [])
    if not bins:
        raise FileNotFoundError(f"no model.safetensors, sharded safetensors or pytorch_model.bin in {path}")
    state = {}
    for name in bins:
        state.update(torch.load(os.path.join(path, name), map_location="cpu", weights_only=True))
    return state


def _resolve_hf_path(path):
    if os.path.isdir(path):
        return path
    try:  # a Hub id such as "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T" (needs the internet)
        from huggingface_hub import snapshot_download
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    except Exception as e:
        raise FileNotFoundError(f"{path!r} is not a local Hugging Face checkpoint directory, and downloading it "
                                f"from the Hub failed ({type(e).__name__}: {e})") from None


def load_hf_checkpoint(path, dtype=torch.float32, device="cpu"):
    """Load a Llama-format Hugging Face checkpoint directory (or Hub id) as a Transformer."""
    path = _resolve_hf_path(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: a Hugging Face checkpoint directory has a config.json")
    with open(config_path) as f:
        config = config_from_hf(json.load(f))
    theirs = load_hf_state_dict(path)
    with torch.device("meta"):
        model = Transformer(config)
    ours = {}
    for name in model.state_dict():
        if config.tie_embeddings and name == "output.weight":
            continue  # the same tensor as tok_embeddings.weight
        hf = hf_module_name(name)
        if hf not in theirs:
            raise ValueError(f"{path}: tensor {hf!r} is missing from the checkpoint")
        ours[name] = theirs.pop(hf).to(dtype)
    if config.tie_embeddings:
        theirs.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    leftover = [k for k in theirs if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"{path}: unexpected tensors not in a Llama model: {leftover[:5]}")
    model.load_state_dict(ours, assign=True, strict=not config.tie_embeddings)
    del ours  # the model holds the tensors now: the relayout below then needs one matrix of extra memory, not all
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.reset_rope()
    store_column_major(model)
    return model.to(device)


def write_hf_checkpoint(model, path, dtype=None):
    """Write `model` as a Hugging Face Llama checkpoint: config.json + model.safetensors.

    Each file is written to a temporary name and renamed, so a crash never leaves a
    half-written file under the final name.
    """
    from safetensors.torch import save_file

    config = model.config
    dtype = dtype or model.tok_embeddings.weight.dtype
    hf_config = config_to_hf(config, dtype)
    tensors = {}
    for name, t in model.state_dict().items():
        if config.tie_embeddings and name == "output.weight":
            continue  # tied: Hugging Face stores the shared matrix once, as embed_tokens
        tensors[hf_module_name(name)] = t.detach().to("cpu", dtype).contiguous()
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json.tmp"), "w") as f:
        json.dump(hf_config, f, indent=2)
    os.replace(os.path.join(path, "config.json.tmp"), os.path.join(path, "config.json"))

