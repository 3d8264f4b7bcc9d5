r"""Decoding past the bandwidth bound: speculative decoding, prompt-lookup drafting and
batched generation with left padding.

Batch-1 decoding reads every weight once per token: memory bandwidth, not arithmetic,
sets its speed. Two ways past that bound, both exact:

  - Check several tokens per weight read. Speculative decoding (Leviathan et al. 2023,
    arXiv:2211.17192, section 2.3 / algorithm 1; Chen et al. 2023, arXiv:2302.01318,
    algorithm 2): a cheap drafter proposes k tokens, the target model scores all of them
    in ONE forward pass (k + 1 positions through the KV cache), and a modified rejection
    sampling keeps a prefix of them such that the output is distributed exactly as the
    target's own samples (Leviathan appendix A.1; Chen theorem 1). Greedy: the output is
    token for token plain greedy decoding. The drafter is a small model trained on the
    same tokenizer, or prompt lookup: copy the tokens that followed the last n-gram the
    last time it appeared in the context (Saxena 2023, github.com/apoorvumang/
    prompt-lookup-decoding; the idea of Yang et al. 2023, "Inference with Reference",
    arXiv:2304.04487).

        context ... x          drafter: d1 d2 d3 d4            (k = 4 cheap steps)
        target, one pass over [x d1 d2 d3 d4]  ->  p1 p2 p3 p4 p5
        accept d1 d2, reject d3  ->  emit d1 d2 + a token drawn from norm(max(0, p3 - q3))
        both KV caches roll back to the accepted tokens (cache.length = accepted)

  - Decode many sequences per weight read: batched generation. Prompts of different
    lengths are padded on the left so their last tokens line up; a padding-aware mask
    hides the pads, and each row gets its own positions (RoPE angle 0 at its first real
    token), so every row computes what it would alone.

        row 0:  _  _  a  b  c  | next      positions  0 0 0 1 2 | 3
        row 1:  d  e  f  g  h  | next      positions  0 1 2 3 4 | 5

On a GPU a small model meets another bound first: launching its kernels one by one from
Python takes longer than running them. GraphStep records one decoding step into a CUDA
graph and replays it for every token, with the same tokens as eager decoding (gpt-fast
does this through torch.compile); for that, nothing in the step may change shape from
token to token.
"""

import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from attention import causal_mask
from cli import Number, Parser
from model import check_sampling_args, sample_next, token_probs
from quant import BitLinear, Int8Linear, NF4Linear
from runs import exit_with_error, load_run, resolve_device


# ----------------------------------------------------------------------------- the weight layout on a CPU
def column_major(w):
    """The same (out, in) matrix with strides (1, out): W^T is the contiguous one."""
    return w.t().contiguous().t()


def for_decoding(model):
    """Lay every nn.Linear weight's columns out contiguously before decoding on a CPU.

    Decoding one token multiplies a single vector by every weight matrix: the work is
    reading 4 bytes per parameter, so memory bandwidth, not FLOPs, sets the speed. The
    CPU BLAS reads a matrix faster in the x @ W^T product when W^T is the contiguous
    one (`python bench.py --only decode` measures it; README, Performance); training's
    large products do not care. Values, shapes and the state_dict stay nn.Linear's; only
    the strides change. A weight tied to the embedding stays row-major (lookups read its
    rows); on a GPU nothing changes. Returns model.
    """
    tied = model.tok_embeddings.weight
    if tied.device.type != "cpu":
        return model
    for m in model.modules():
        if type(m) is nn.Linear and m.weight is not tied and m.weight.is_contiguous():
            m.weight = nn.Parameter(column_major(m.weight.detach()), m.weight.requires_grad)
    return model


# ----------------------------------------------------------------------------- verification
def verify(p, q, drafts, generator=None):
    """The modified rejection sampling of speculative decoding, for N independent rows.

    p: (N, k + 1, V) the target's distributions at the k drafted positions and one more;
    q: (N, k, V) the drafter's distributions the drafts were drawn from; drafts: (N, k).
    Draft i is accepted with probability min(1, p_i(d_i) / q_i(d_i)) (Leviathan section
    2.3), left to right until the first rejection; at a rejection the token is drawn from
    norm(max(0, p_i - q_i)) (their eq. in section 2.3), and when all k are accepted from
    p_{k+1}. Then each emitted token is distributed as p (Leviathan appendix A.1).
    Returns (n_accepted (N,), next_token (N,)): emit drafts[:n] then next_token.
    """
    N, k = drafts.shape
    p_d = p[:, :k].gather(-1, drafts[..., None])[..., 0]  # (N, k) target prob of each draft
    q_d = q.gather(-1, drafts[..., None])[..., 0]  # (N, k)
    u = torch.rand(N, k, generator=generator, device=p.device)
    accepted = u * q_d < p_d  # u < p/q without dividing by a zero q (a draft has q > 0)
    n = accepted.long().cumprod(dim=1).sum(dim=1)  # (N,) accepted prefix length
    rows = torch.arange(N, device=p.device)
    residual = p[rows, n]  # (N, V): p_{k+1} where everything was accepted
    rejected = n < k
    if rejected.any():
        q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)  # (N, k + 1, V)
        diff = (p[rows, n] - q_pad[rows, n]).clamp(min=0)  # max(0, p - q)
        # p == q at a rejection leaves nothing (probability 0); fall back to p then
        diff = torch.where(diff.sum(-1, keepdim=True) > 0, diff, p[rows, n])
        residual = torch.where(rejected[:, None], diff, residual)
    next_token = torch.multinomial(residual / residual.sum(-1, keepdim=True), 1, generator=generator)[:, 0]
    return n, next_token


def verify_greedy(p_argmax, drafts):
    """Greedy verification: accept while the target's argmax agrees with the draft, then
    emit the target's argmax (its correction, or the bonus token after k accepted)."""
    k = len(drafts)
    n = 0
    while n < k and drafts[n] == p_argmax[n]:
        n += 1
    return n, p_argmax[n]


# ----------------------------------------------------------------------------- drafters
def prompt_lookup(tokens, k, max_ngram=3):
    """Up to k draft tokens by prompt lookup: the longest n-gram (n <= max_ngram) that ends
    the context and occurred before, continued by what followed its latest earlier
    occurrence. No match: no drafts (the step is then a plain decoding step)."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest earlier occurrence first
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + k]
    return []


def draft_with_model(draft, caches, tokens, k, temperature, top_k, top_p, generator, n_vocab):
    """k tokens from the draft model, one cheap step each. Its cache first catches up with
    the tokens it has not read (the previous round's corrected / bonus token).
    Returns (drafts: list of k ints, q: (k, V) the distributions they were drawn from)."""
    drafts, qs = [], []
    new = tokens[caches[0].length:]  # >= 1 token
    for _ in range(k):
        x = torch.tensor([new], device=caches[0].k.device)
        logits, _ = draft(x, caches=caches, start_pos=caches[0].length)
        q = token_probs(logits[0, -1:, :n_vocab], temperature, top_k, top_p)  # (1, V)
        d = int(q.argmax()) if temperature == 0 else int(torch.multinomial(q, 1, generator=generator))
        drafts.append(d)
        qs.append(q)
        new = [d]
    return drafts, torch.cat(qs) if qs else None


def rollback(caches, length):
    """Forget the cached positions >= length (rejected drafts): KVCache writes at .length,
    so moving it back is the whole rollback; the stale keys are overwritten later."""
    for cache in caches:
        cache.length = min(cache.length, length)


def check_draft(model, draft, num_speculative, model_tokenizer=None, draft_tokenizer=None):
    """One clear ValueError for a drafter that cannot work with this model."""
    if int(num_speculative) != num_speculative or num_speculative < 1:
        raise ValueError(f"num_speculative (k, the tokens drafted per step) must be an integer >= 1, "
                         f"got {num_speculative}")
    if isinstance(draft, str):
        if draft != "prompt":
            raise ValueError(f"draft must be a Transformer or 'prompt' (prompt lookup), got {draft!r}")
        return
    if draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the "
                         f"model's ({model.config.vocab_size}); train the draft on the same tokenizer")
    if model_tokenizer is not None and draft_tokenizer is not None:
        ids = range(model_tokenizer.n_vocab)
        if (model_tokenizer.n_vocab != draft_tokenizer.n_vocab
                or any(model_tokenizer.decode([i]) != draft_tokenizer.decode([i]) for i in ids)):
            raise ValueError("the draft model was trained with another tokenizer than the model (their token "
                             "tables differ); train the draft on the same dataset/tokenizer")


# ----------------------------------------------------------------------------- speculative decoding
@torch.inference_mode()
def speculative_generate(model, idx, max_new_tokens, draft="prompt", num_speculative=4, temperature=1.0,
                         top_k=None, top_p=None, eos_id=None, generator=None, n_vocab=None, max_ngram=3,
                         stats=None, lookup_first=False):
    """(1, T) prompt -> (1, T + new) tokens, drafting with `draft` (a Transformer with the
    same vocabulary, or "prompt" for prompt lookup), num_speculative = k tokens per step.
    lookup_first (with a draft model): draft by prompt lookup where the context has a
    match, which costs nothing, and with the draft model only where it has none.

    temperature 0: identical to model.generate's greedy output; otherwise distributed as
    model.generate's samples (each round's drafter is chosen from the context alone, and
    its q is the distribution the drafts came from). `stats` (a dict) receives drafted /
    accepted / target_calls, and looked_up: the drafts that came from prompt lookup.
    """
    check_sampling_args(temperature, top_k, top_p)
    check_draft(model, draft, num_speculative)
    if idx.dim() != 2 or idx.shape[0] != 1 or idx.shape[1] == 0:
        raise ValueError(f"speculative decoding takes one prompt, a (1, T) tensor with T >= 1; got shape "
                         f"{tuple(idx.shape)} (batch several prompts with batched_generate)")
    T = idx.shape[1]
    blocks = [model.config.block_size] + ([] if isinstance(draft, str) else [draft.config.block_size])
    if T + max_new_tokens > min(blocks):
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceed the context "
                         f"block_size={min(blocks)}; shorten the prompt or ask for fewer tokens")
    tokens = idx[0].tolist()
    caches = model.new_kv_caches(1)
    draft_caches = None if isinstance(draft, str) else draft.new_kv_caches(1)
    stats = {} if stats is None else stats
    stats.update(drafted=0, accepted=0, target_calls=0, looked_up=0)
    while len(tokens) - T < max_new_tokens:
        k = min(num_speculative, max_new_tokens - (len(tokens) - T) - 1)  # the last token needs no draft
        drafts = prompt_lookup(tokens, k, max_ngram) if draft_caches is None or lookup_first else []
        if drafts or draft_caches is None:
            V = n_vocab or model.config.vocab_size
            q = F.one_hot(torch.tensor(drafts, dtype=torch.long), V).float()  # (k, V): a certain draft
            stats["looked_up"] += len(drafts)
        else:
            drafts, q = draft_with_model(draft, draft_caches, tokens, k, temperature, top_k, top_p, generator,
                                         n_vocab) if k else ([], None)
        # the target reads the tokens it has not seen (one, usually) and the drafts, in one pass
        start = caches[0].length
        x = torch.tensor([tokens[start:] + drafts], device=idx.device)
        logits, _ = model(x, caches=caches, start_pos=start)
        logits = logits[0, -(len(drafts) + 1):, :n_vocab]  # (k + 1, V): p_1 .. p_{k+1}
        if temperature == 0:
            n, nxt = verify_greedy(logits.argmax(-1).tolist(), drafts)
        elif drafts:
            p = token_probs(logits, temperature, top_k, top_p)
            drafted = torch.tensor([drafts], device=p.device)
            n, nxt = (int(t[0]) for t in verify(p[None], q[None].to(p.device), drafted, generator))
        else:
            nxt = int(torch.multinomial(token_probs(logits, temperature, top_k, top_p), 1, generator=generator))
            n = 0
        new = drafts[:n] + [int(nxt)]
        stats["drafted"] += len(drafts)
        stats["accepted"] += n
        stats["target_calls"] += 1
        tokens += new
        rollback(caches, len(tokens) - 1)  # the newest token is fed next round
        if draft_caches is not None:
            rollback(draft_caches, len(tokens) - 1)
        if eos_id is not None and eos_id in new:
            tokens = tokens[:len(tokens) - len(new) + new.index(eos_id) + 1]
            break
    return torch.tensor([tokens[:T + max_new_tokens]], device=idx.device)


# ----------------------------------------------------------------------------- batched generation
def left_pad(prompts, pad_id, device=None):
    """Lists of token ids -> idx (B, L) padded on the left, real (B, L) bool, pos (B, L):
    each row's positions count from its first real token (pads get 0)."""
    L = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts], device=device)
    real = torch.tensor([[False] * (L - len(p)) + [True] * len(p) for p in prompts], device=device)
    pos = (real.long().cumsum(dim=1) - 1).clamp(min=0)
    return idx, real, pos


def padding_mask(key_real, T):
    """(B, 1, T, S) boolean mask: query t reads key s when s is causal (s <= t + S - T) and
    a real token; a pad query also reads itself, so no row of the softmax is empty (an
    all-masked row would be NaN, and pads' NaN values would leak through 0 * NaN)."""
    S = key_real.shape[1]
    causal = causal_mask(T, S, key_real.device)  # (T, S)
    itself = F.pad(torch.eye(T, dtype=torch.bool, device=key_real.device), (S - T, 0))  # (T, S)
    return ((causal & key_real[:, None, :]) | itself)[:, None]  # (B, 1, T, S)


def forward_rows(model, idx, pos, key_real, caches):
    """The model's forward with per-row positions and a padding mask (the same layers,
    norm and head as Transformer.forward). idx, pos: (B, T); key_real: (B, S), S =
    cached + T. Returns logits (B, T, V)."""
    x = model.tok_embeddings(idx)  # (B, T, C)
    cos, sin = model.rope_cos[pos][:, None], model.rope_sin[pos][:, None]  # (B, 1, T, hd): one angle per row
    mask = padding_mask(key_real, idx.shape[1])
    for layer, cache in zip(model.layers, caches):
        x = layer(x, cos, sin, cache, mask)
    return model.output(model.norm(x))


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, generator=None,
             n_vocab=None, draft_model=None, num_speculative=4, lookup_first=False):
    """model.generate, with speculative decoding when draft_model is given (a Transformer on
    the same tokenizer, or "prompt" for prompt lookup), k = num_speculative drafted tokens;
    lookup_first: prompt lookup where it finds a match, the draft model elsewhere."""
    if draft_model is None:
        return model.generate(idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, n_vocab)
    return speculative_generate(model, idx, max_new_tokens, draft_model, num_speculative, temperature, top_k, top_p,
                                eos_id, generator, n_vocab, lookup_first=lookup_first)


def check_batch(model, prompts, max_new_tokens, cuda_graph):
    """One clear error for each batch that batched generation cannot decode as asked."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    if any(not 0 <= t < model.config.vocab_size for p in prompts for t in p):
        raise ValueError(f"token ids must be in [0, {model.config.vocab_size})")
    if any(getattr(layer.attention, "prefix", None) is not None for layer in model.layers):
        raise ValueError("batched_generate does not support prefix-tuned models; use model.generate per prompt")
    if model.config.sparse_local or model.config.sparse_stride:
        raise ValueError("batched_generate does not apply sparse attention patterns; use model.generate per prompt")
    if cuda_graph and not recordable(model):
        raise ValueError("cuda_graph=True records plain and LoRA models only (not quantized or BitLinear layers, "
                         "whose Python-side caches a replay cannot see); pass cuda_graph=False")
    longest, block = max(len(p) for p in prompts), model.config.block_size
    if longest + max_new_tokens > block:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
                         f"context block_size={block}; shorten the prompts or ask for fewer tokens")


def batched_generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                     pad_id=0, generator=None, n_vocab=None, cuda_graph=False):
    """Prompts of different lengths (lists of token ids) decoded together, left-padded.

    Returns one list per prompt: the prompt, then its new tokens up to and including its
    first eos_id (a finished row keeps decoding pads that nobody reads until every row is
    done). Greedy rows equal model.generate on each prompt alone (tests/test_decode.py).
    cuda_graph: each decoding step is the model's GraphStep, replayed from a CUDA graph on a
    GPU (recorded at the first call with B prompts, reused by the next ones).
    """
    new_ids = list(batched_tokens(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id,
                                  generator, n_vocab, cuda_graph))  # (B,) per step, read back once at the end
    rows = torch.stack(new_ids, dim=1).tolist() if new_ids else [[] for _ in prompts]
    out = []
    for prompt, new in zip(prompts, rows):
        if eos_id in new:
            new = new[:new.index(eos_id) + 1]
        out.append(list(prompt) + new)
    return out


@torch.inference_mode()
def batched_tokens(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                   pad_id=0, generator=None, n_vocab=None, cuda_graph=False):
    """batched_generate one step at a time: yields each step's tokens (B,), on the device
    (sample.py streams them); a row past its eos_id yields tokens nobody should read."""
    check_sampling_args(temperature, top_k, top_p)
    check_batch(model, prompts, max_new_tokens, cuda_graph)
    device = model.tok_embeddings.weight.device
    idx, key_real, pos = left_pad(prompts, pad_id, device)
    B = idx.shape[0]
    if cuda_graph:  # the step recorded once and replayed: GraphStep, below
        step_fn = graph_step(model, B)
        if step_fn.busy:
            raise ValueError("another cuda_graph=True generation with this model and batch size is still running "
                             "(they would share one KV cache); finish it first or pass cuda_graph=False")
        logits = step_fn.prefill(idx, key_real, pos)  # (B, L, V)
    else:
        caches = model.new_kv_caches(B)
        logits = forward_rows(model, idx, pos, key_real, caches)  # prefill, (B, L, V)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    pos = pos[:, -1:]  # (B, 1) each row's last position
    try:
        if cuda_graph:
            step_fn.busy = True
        for step in range(max_new_tokens):
            next_id = sample_next(logits[:, -1, :n_vocab], temperature, top_k, top_p, generator)  # (B,)
            yield next_id
            if eos_id is not None:
                done |= next_id == eos_id
                if done.all():  # reads a value back from the device: only when there is an eos_id to watch
                    return
            if step == max_new_tokens - 1:
                return
            next_id = next_id.masked_fill(done, pad_id)
            if cuda_graph:
                logits = step_fn(next_id)[:, None]  # (B, 1, V)
                continue
            key_real = torch.cat([key_real, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
            pos = pos + 1
            logits = forward_rows(model, next_id[:, None], pos, key_real, caches)  # (B, 1, V)
    finally:
        if cuda_graph:
            step_fn.busy = False


# ----------------------------------------------------------------------------- one step, recorded once
class SlotCache:
    """A KVCache seen through a position held in a tensor: `update` writes the new keys and
    values at cache slot `slot` (a (1,) tensor) and returns the whole preallocated buffer,
    so no shape or Python number in the step changes from one token to the next."""

    def __init__(self, cache, slot):
        self.cache, self.slot = cache, slot

    def update(self, k, v):  # k, v: (B, n_kv_head, 1, hd)
        self.cache.k.index_copy_(2, self.slot, k)
        self.cache.v.index_copy_(2, self.slot, v)
        return self.cache.k, self.cache.v  # (B, n_kv_head, max_len, hd): the mask hides unwritten slots


class GraphStep:
    """One decoding step with fixed shapes, recorded into a CUDA graph once and replayed.

    Batch-1 decoding of a small model on a GPU is bound by kernel launches, not by the
    GPU: Python dispatches some ten kernels per layer, each taking microseconds to queue
    and less to run (README, Performance). A CUDA graph records the step's kernels once
    and launches all of them with one call, as gpt-fast does through torch.compile's
    "reduce-overhead" mode. A replay repeats the recorded kernels on the recorded memory,
    so every input lives in a buffer the loop overwrites in place: the token (B, 1), each
    row's RoPE position (B, 1), the cache slot (1,) the new keys go to (the same for all
    rows: left padding aligns them), and which slots hold real keys (B, max_len).
    Attention reads the whole preallocated cache behind that mask, so its shape never
    changes. The step keeps its KV caches, so one recording serves every later call with
    B prompts (graph_step). On a CPU the same step runs eagerly (tests compare it with
    plain decoding).
    """

    def __init__(self, model, batch_size):
        self.model = weakref.proxy(model)  # the step lives in _GRAPH_STEPS, keyed weakly by the model
        self.kv = model.new_kv_caches(batch_size)  # KVCache per layer, (B, n_kv_head, max_len, hd)
        B, S, device = batch_size, self.kv[0].k.shape[2], self.kv[0].k.device
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=device)  # each row's RoPE position
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the cache slot of the new token
        self.key_real = torch.zeros(B, S, dtype=torch.bool, device=device)  # slots holding real keys
        self.caches = [SlotCache(c, self.slot) for c in self.kv]
        self.graph, self.logits = None, None
        self.busy = False  # a generation is using the caches (batched_tokens)

    def prefill(self, idx, key_real, pos):
        """The left-padded prompts (B, L) through the model eagerly, into the step's caches
        (what an earlier call left there is masked out); returns their logits (B, L, V)."""
        for c in self.kv:
            c.length = 0
        logits = forward_rows(self.model, idx, pos, key_real, self.kv)
        L = idx.shape[1]
        self.key_real.zero_()
        self.key_real[:, :L] = key_real
        self.pos.copy_(pos[:, -1:])  # advanced before each step
        self.slot.fill_(L - 1)
        return logits

    def step(self):
        """What the graph records: the next token through every layer, logits (B, V)."""
        m = self.model
        self.key_real.index_fill_(1, self.slot, True)  # the new token is a key too
        mask = self.key_real[:, None, None, :]  # (B, 1, 1, S): a row's query reads its real keys
        x = m.tok_embeddings(self.token)  # (B, 1, C)
        cos, sin = m.rope_cos[self.pos][:, None], m.rope_sin[self.pos][:, None]  # (B, 1, 1, hd)
        for layer, cache in zip(m.layers, self.caches):
            x = layer(x, cos, sin, cache, mask)
        self.logits = m.output(m.norm(x))[:, -1]  # (B, V), the same buffer at every replay

    def record(self):
        """Warm up on a side stream (cuBLAS and the allocator set themselves up there), then
        record one step. The warm-up writes this step's keys at this step's slot: the replay
        writes the same values again."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # autocast must not reuse weights it cast outside the graph (torch.cuda.graph's documentation)
        autocast = torch.is_autocast_enabled("cuda")
        with torch.autocast("cuda", torch.get_autocast_dtype("cuda"), enabled=autocast, cache_enabled=False):
            with torch.cuda.graph(self.graph):
                self.step()

    def __call__(self, token):
        """token (B,): the tokens just chosen -> logits (B, V) for the position after them."""
        self.token.copy_(token[:, None])
        self.pos += 1
        self.slot += 1
        if self.token.device.type != "cuda":  # no graphs: the same step, eagerly
            self.step()
            return self.logits
        if self.graph is None:
            self.record()
        self.graph.replay()
        return self.logits


_GRAPH_STEPS = weakref.WeakKeyDictionary()  # model -> (key, its GraphStep), gone with the model


def recordable(model):
    """Whether a replay can stand for the model's forward: plain and LoRA layers only.
    A quantized layer's cached dequantized weight and BitLinear's are Python-side state
    that graph_step's key cannot see."""
    return not any(isinstance(m, (BitLinear, Int8Linear, NF4Linear)) for m in model.modules())


def settings(model):
    """What a recorded step has frozen besides tensor addresses: every module's plain Python
    settings (training, LoRA's merged and scaling, attn_impl, ...) and each tensor's dtype
    and shape."""
    flags = tuple((k, v) for m in model.modules() for k, v in vars(m).items()
                  if isinstance(v, (bool, int, float, str)))
    tensors = tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in [*model.parameters(), *model.buffers()])
    return flags, tensors


def graph_step(model, batch_size):
    """The model's GraphStep for batch_size: made and recorded once, then reused while the
    batch size, autocast and the model's settings (above) stay the same. A replay reads
    the addresses it recorded and repeats the kernels it recorded: .to(), new parameters,
    reset_rope, merging LoRA or model.train() each make a new step. Weights changed in
    place (an optimizer step, load_state_dict) are read as they are now. One step, with its
    KV caches, is kept per model while the model lives."""
    device = model.tok_embeddings.weight.device.type
    key = (batch_size, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), settings(model))
    kept = _GRAPH_STEPS.get(model)
    if kept is None or kept[0] != key:
        _GRAPH_STEPS[model] = kept = (key, GraphStep(model, batch_size))
    return kept[1]


# ----------------------------------------------------------------------------- command line
def check_draft_path(path):
    """A --draft that names no trained run: say which command makes one."""
    if path != "prompt" and not any(os.path.exists(os.path.join(path, f)) for f in ("ckpt.pt", "config.json")):
        raise ValueError(f"--draft {path}: no draft model there (no ckpt.pt); train one on the target's data and "
                         f"tokenizer with: python train.py --config demo --model demo_draft --out_dir {path} "
                         f"(or use --draft prompt: prompt lookup needs no model)")


def argument_parser():
    p = Parser("Speculative (or prompt-lookup) decoding and batched generation from a train.py run.")
    p.add_argument("--out_dir", default="out/demo", help="the target model's training out_dir")
    p.add_argument("--draft", default="", help="a draft model's out_dir, or 'prompt' for prompt lookup; empty: "
                   "no speculation (batched generation of the --prompt's)")
    p.add_argument("--num_speculative", "-k", type=Number(int, 1), default=4, help="tokens drafted per target pass")
    p.add_argument("--lookup_first", action="store_true", help="with a --draft model: prompt lookup where the "
                   "context has a match, the draft model elsewhere")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--max_new_tokens", type=Number(int, 1), default=100, help="tokens generated per prompt")
    p.add_argument("--temperature", type=Number(float, 0), default=0.0, help="0: greedy")
    p.add_argument("--seed", type=Number(int, 0), default=1337, help="seeds the sampling (temperature > 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (fp32 on both; on a GPU batched "
                   "generation replays each step from a CUDA graph)")
    return p


def parse_args(argv):
    """argv -> the options, every number checked (before any model is loaded)."""
    return argument_parser().parse_args(argv)


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.draft:
            check_draft_path(args.draft)  # before loading anything
        device = resolve_device(args.device)
        model, tokenizer, _ = load_run(args.out_dir, device)
        for_decoding(model.eval())  # on a CPU: the weight layout its BLAS reads fastest
        prompts = [tokenizer.encode(text) for text in (args.prompt or ["\n"])]
        generator = torch.Generator(device=device).manual_seed(args.seed)
        if not args.draft:
            graph = device.type == "cuda" and recordable(model)
            for ids in batched_generate(model, prompts, args.max_new_tokens, args.temperature,
                                        eos_id=tokenizer.eot_token, generator=generator, n_vocab=tokenizer.n_vocab,
                                        cuda_graph=graph):
                print(tokenizer.decode(ids), "\n---")
            return
        draft = "prompt"
        if args.draft != "prompt":
            draft, draft_tokenizer, _ = load_run(args.draft, device)
            check_draft(model, draft, args.num_speculative, tokenizer, draft_tokenizer)
            for_decoding(draft.eval())
        for ids in prompts:
            stats = {}
            out = speculative_generate(model, torch.tensor([ids], device=device), args.max_new_tokens, draft,
                                       args.num_speculative, args.temperature, eos_id=tokenizer.eot_token,
                                       generator=generator, n_vocab=tokenizer.n_vocab, stats=stats,
                                       lookup_first=args.lookup_first)
            print(tokenizer.decode(out[0].tolist()))
            print(f"--- accepted {stats['accepted']}/{stats['drafted']} drafts ({stats['looked_up']} by prompt "
                  f"lookup), {stats['target_calls']} target passes for {out.shape[1] - len(ids)} tokens")
    except (ValueError, OSError) as e:
        exit_with_error(e)


if __name__ == "__main__":
    main()
