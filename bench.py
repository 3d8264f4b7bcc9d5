"""Benchmarks: this model next to Hugging Face's LlamaForCausalLM on the same weights.

    python bench.py                  # everything that runs on this machine (a few minutes)
    python bench.py --only train     # one section: train, decode, kv, memory, tinyllama
    python bench.py --compile        # also torch.compile'd training and decoding
    python bench.py --quick          # tiny sizes, seconds (the CI smoke test)

On a GPU (`--device cuda`: train.py's bf16 autocast over fp32 weights, fused AdamW):

    python bench.py --device cuda --compile --out_dir out/bench_gpu   # a few minutes on an H100
    python bench.py --device cpu --quick --only train,tinyllama_sweep,decode_gpu   # their CPU smoke test

    train            the training step next to transformers: demo, a 370M model, tinyllama_1b
                     (tokens/s, MFU, the peak memory each needs)
    tinyllama_sweep  tinyllama_1b alone: micro-batch 1 to 16 x 2048, with and without activation
                     checkpointing, measured peak next to plan.estimate_memory; a profile
    decode_gpu       greedy decoding in bf16 (demo, tinyllama_1b; batch 1 and 16) next to
                     transformers, against the bound that memory bandwidth sets

Timings alternate between the contenders (ours, theirs, ours, theirs, ...) inside one
process and report the median of each, so a noisy machine slows both alike; the
ratios are the result, the absolute figures are for this machine only. MFU divides the
model FLOPs (model.flops_per_token, PaLM appendix B) by the peak fp32 matmul rate of this
machine, measured in the same run (plan.peak_flops); on a GPU by the datasheet's bf16
tensor-core peak. GPU kernels run asynchronously, so every timed call waits for them to
finish (torch.cuda.synchronize) before the clock is read. Results are also written to
bench.json in --out_dir, after every section (and every training case).
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import peft
import quant
from attention import KVCache
from checkpoint import lock_out_dir, unlock_out_dir, write_json
from cli import Number, Parser
from hf import config_to_hf, hf_module_name
from decode import batched_generate, column_major
from model import ModelConfig, Transformer, count_params, flops_per_token
from plan import device_spec, estimate_memory, format_bytes, peak_flops
from runs import check_out_dir, check_run_kind, exit_with_error, resolve_device
from train import TrainConfig, make_optimizer

# two training shapes: the demo preset and a larger one
TRAIN_CASES = {
    "demo (12.6M, 8x256)": (dict(ModelConfig.from_name("demo").to_dict()), 8),
    "larger (8x512 GQA 8/2, 4x512)": (dict(vocab_size=8192, block_size=512, n_layer=8, n_embd=512, n_head=8,
                                           n_kv_head=2), 4),
}
QUICK_CASE = {"debug (2x64, 4x64)": (dict(ModelConfig.from_name("debug").to_dict()), 4)}
# On a GPU: (model, micro-batch, which contenders to torch.compile with --compile). The demo
# model is so small that a step is mostly kernel launches; 64 x 256 tokens give the GPU
# some work per launch (it stays partly launch-bound: compile's fused kernels show most
# here). 370M and 1.1B at 4 x 2048 are compute-bound. Compiling a 22-layer model costs
# a minute or more, so tinyllama_1b runs eager only.
GPU_TRAIN_CASES = {
    "demo (12.6M, 64x256)": (dict(ModelConfig.from_name("demo").to_dict()), 64, ("ours", "transformers")),
    "370M (24x1024 MHA, 4x2048)": (dict(vocab_size=32000, block_size=2048, n_layer=24, n_embd=1024, n_head=16,
                                        n_kv_head=16), 4, ("ours",)),
    "tinyllama_1b (1.1B, 4x2048)": (dict(ModelConfig.from_name("tinyllama_1b").to_dict()), 4, ()),
}
FAILURES = []  # the sections and cases that failed: main reports them and exits with status 1


def hf_twin(model):
    """transformers' LlamaForCausalLM with our config and a copy of our weights (the oracle),
    created on the device our model is on."""
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device(model.tok_embeddings.weight.device):
        hf = LlamaForCausalLM(LlamaConfig(**config_to_hf(model.config), attn_implementation="sdpa"))
    state = {hf_module_name(k): v for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    hf.load_state_dict(state, strict=not model.config.tie_embeddings)
    return hf


def build(config, device):
    """Our model, its weights created and initialized on `device` (a GPU initializes 1.1B
    parameters at once; creating them on the CPU and copying takes seconds)."""
    with torch.device(device):
        return Transformer(config)


def alternate(contenders, rounds):
    """Run each contender once to warm up, then `rounds` times in turn; median seconds of each."""
    for fn in contenders.values():
        fn()
    times = {name: [] for name in contenders}
    for r in range(rounds):  # A B B A A B ...: neither goes first every time
        order = list(contenders.items())
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------- on a GPU
def synchronize(device):
    """Wait until the GPU has finished the queued kernels. A CUDA call returns as soon as its
    kernel is queued: a clock read without this measures the queueing, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured(fn, device, peaks, name, resident):
    """fn, made to return only when its GPU work is done (so alternate's clock times the work)
    and, on CUDA, to record in peaks[name] the most memory it needs: the `resident` bytes that
    stay between calls (its weights and optimizer state) plus the most allocated above the
    level at which the call began (activations, gradients, the KV cache, workspaces). The
    other contender's weights, also on the GPU, are not counted: each figure is the memory
    that contender would need alone."""
    def run():
        if device.type != "cuda":
            return fn()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peaks[name] = max(peaks.get(name, 0), resident + torch.cuda.max_memory_allocated(device) - base)
        return out
    return run


def tensor_bytes(model, optimizer=None):
    """Bytes of a model's parameters and buffers and of its optimizer's state (AdamW's moments)."""
    n = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    if optimizer is not None:
        n += sum(t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    return n


def free_memory(device):
    """Hand back what a finished (or failed) case held: collect the cycles Python still holds,
    drop torch.compile's cached graphs, return cached blocks to the GPU."""
    gc.collect()
    if "torch._dynamo" in sys.modules:  # torch.compile (or transformers) loaded it
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def try_first(fn, name, errors):
    """Run an optional contender once (torch.compile compiles here, outside the timing); True
    if it worked, else its error is recorded and it is left out."""
    try:
        fn()
        return True
    except Exception as e:
        errors[name] = f"{type(e).__name__}: {e}"[:1000]
        print(f"  {name}: failed, left out ({errors[name][:160]})")
        return False


class Budget:
    """A time budget for the optional work (compiling, transformers' static cache, the
    profile): each runs only if its estimated cost fits in what is left, else it is skipped
    with a note, so a slow compile cannot push the required measurements past the device's
    time limit. 0 seconds: no budget."""

    def __init__(self, seconds):
        self.seconds, self.start = seconds, time.perf_counter()

    def allows(self, cost, what):
        left = self.seconds - (time.perf_counter() - self.start)
        if not self.seconds or left >= cost:
            return True
        print(f"  skipped {what}: estimated {cost:.0f} s, {max(left, 0):.0f} s left of --time_budget")
        return False


def compile_cost(config):
    """Seconds to torch.compile a training step (forward and backward), a rough guess for an
    H100-class GPU: Dynamo traces every layer and Inductor generates code for each."""
    return 20 + 3 * config.n_layer


# ----------------------------------------------------------------------------- 1. training step
def train_step(model, optimizer, x, y, hf, autocast=None):
    """Forward, cross-entropy over all positions, backward, AdamW: the same work for both.
    `autocast` (train.py's bf16 autocast on a GPU) covers the forward and the loss, as in
    train.py; the weights stay fp32 master copies."""
    with autocast or nullcontext():
        logits = model(input_ids=x).logits if hf else model(x)[0]
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), y.view(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_train(cases, rounds, peak, compile_too=False, only=None, device=torch.device("cpu"), autocast=None,
                budget=Budget(0), results=None, save=lambda: None):
    """Every case: ours and transformers (and compiled variants) alternating; one case that
    runs out of GPU memory is recorded as OOM and the next one runs."""
    results = [] if results is None else results
    for name, spec in cases.items():
        if only and only not in name:
            continue
        try:
            row = train_case(name, spec, rounds, peak, compile_too, device, autocast, budget)
        except torch.cuda.OutOfMemoryError:
            row = {"case": name, "result": "OOM"}
            print("  OOM: out of GPU memory")
        except Exception as e:
            row = {"case": name, "error": f"{type(e).__name__}: {e}"[:1000]}
            FAILURES.append(f"train: {name}")
            print(f"  failed: {row['error'][:300]}")
        free_memory(device)  # after the except block: its traceback no longer holds the case's tensors
        results.append(row)
        save()
    return results


def train_case(name, spec, rounds, peak, compile_too, device, autocast, budget):
    model_args, batch, *compiled = spec  # CPU cases have no third entry: compile ours
    compiled = compiled[0] if compiled else ("ours",)
    torch.manual_seed(0)
    config = ModelConfig(**model_args)
    print(f"train step | {name} | {count_params(config):,} params")
    ours = build(config, device)
    theirs = hf_twin(ours)
    T = config.block_size
    x = torch.randint(config.vocab_size, (batch, T), device=device)
    y = torch.randint(config.vocab_size, (batch, T), device=device)
    tc = TrainConfig()
    opt_ours = make_optimizer(ours, tc, device)
    opt_theirs = make_optimizer(theirs, tc, device)
    # name -> (what is called, its optimizer, transformers' call convention?, the module that holds the weights)
    contenders = {"ours": (ours, opt_ours, False, ours), "transformers": (theirs, opt_theirs, True, theirs)}
    errors = {}
    for who in compiled if compile_too else ():
        _, opt, hf, module = contenders[who]
        label, step = f"{who} + torch.compile", torch.compile(module)  # shares the weights and the optimizer
        if budget.allows(compile_cost(config), f"{label} ({name})") and \
                try_first(lambda: train_step(step, opt, x, y, hf, autocast), label, errors):
            contenders[label] = (step, opt, hf, module)
    for _, opt, _, _ in contenders.values():  # a failed compile may have left gradients behind
        opt.zero_grad(set_to_none=True)
    for m, o, hf in ((ours, opt_ours, False), (theirs, opt_theirs, True)):
        train_step(m, o, x, y, hf, autocast)  # creates AdamW's state: the resident bytes are known from here
    peaks = {}
    timed = {who: measured(lambda m=m, o=o, hf=hf: train_step(m, o, x, y, hf, autocast), device, peaks, who,
                           tensor_bytes(module, o))
             for who, (m, o, hf, module) in contenders.items()}
    t = alternate(timed, rounds)
    return train_row(name, config, batch, t, peak, peaks, errors)


def train_row(name, config, batch, t, peak, peaks, errors):
    """The case's figures (JSON) and its lines (printed)."""
    T = config.block_size
    tokens = batch * T
    flops = flops_per_token(config, T) * tokens
    row = {"case": name, "params": count_params(config), "tokens_per_step": tokens}
    width = max(22, *map(len, t))
    for who, sec in t.items():
        mfu = flops / sec / peak if peak else None
        row[who] = {"ms": 1000 * sec, "tok_s": tokens / sec, "mfu": mfu}
        line = f"  {who:{width}s} {1000 * sec:8.1f} ms  {tokens / sec:9,.0f} tok/s  " + \
            (f"MFU {100 * mfu:5.1f}%" if mfu is not None else "MFU   n/a")
        if who in peaks:
            row[who]["peak_memory_bytes"] = peaks[who]
            line += f"  peak {peaks[who] / 2**30:5.1f} GiB"
        print(line)
    row["speedup_vs_transformers"] = t["transformers"] / t["ours"]
    print(f"  ours / transformers: {row['speedup_vs_transformers']:.2f}x faster")
    gains = {who: t[who] / t[f"{who} + torch.compile"] for who in ("ours", "transformers")
             if f"{who} + torch.compile" in t}
    if gains:
        row["compile_speedup"] = gains
        print("  torch.compile: " + ", ".join(f"{who} {g:.2f}x" for who, g in gains.items()))
    if errors:
        row["errors"] = errors
    return row


# ----------------------------------------------------------------------------- 2. greedy decoding
def uncached_greedy(model, idx, max_new_tokens):
    """nanoGPT's loop: re-read the whole sequence for every new token (no KV cache)."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@torch.no_grad()
def bench_decode(model_args, prompt_len, new_tokens, rounds, compile_too=False):
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(**model_args)).eval()
    theirs = hf_twin(ours).eval()
    idx = torch.randint(ours.config.vocab_size, (1, prompt_len))
    a = ours.generate(idx, new_tokens, temperature=0)
    b = theirs.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens, do_sample=False,
                        min_new_tokens=new_tokens, pad_token_id=0)
    same = torch.equal(a, b)
    t = alternate({"ours (KV cache)": lambda: ours.generate(idx, new_tokens, temperature=0),
                   "transformers generate": lambda: theirs.generate(
                       idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens, do_sample=False,
                       min_new_tokens=new_tokens, pad_token_id=0),
                   "ours without cache": lambda: uncached_greedy(ours, idx, new_tokens),
                   **({"ours + torch.compile": compiled_decoder(ours, idx, new_tokens)} if compile_too else {})},
                  rounds)
    print(f"greedy decoding | batch 1, prompt {prompt_len}, {new_tokens} new tokens | identical tokens: {same}")
    for who, sec in t.items():
        print(f"  {who:22s} {new_tokens / sec:8,.0f} tok/s")
    ratio = t["transformers generate"] / t["ours (KV cache)"]
    print(f"  ours / transformers: {ratio:.2f}x faster; "
          f"cache / no cache: {t['ours without cache'] / t['ours (KV cache)']:.2f}x")
    return {"tok_s": {who: new_tokens / sec for who, sec in t.items()}, "speedup_vs_transformers": ratio,
            "identical_tokens": same}


def compiled_decoder(model, idx, new_tokens):
    """A copy of `model` whose forward is torch.compile'd (dynamic shapes: the cache grows)."""
    import copy
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, dynamic=True)
    compiled.generate(idx, new_tokens, temperature=0)  # compile outside the timing
    return lambda: compiled.generate(idx, new_tokens, temperature=0)


def weight_read_rates(shape, rounds=3):
    """Bytes per second at which F.linear reads an (out, in) fp32 weight for one token, stored
    row-major and column-major: enough copies to overflow every cache, layouts alternated."""
    copies = max(2, int(256e6 // (4 * shape[0] * shape[1])))
    row_major = [torch.randn(shape) for _ in range(copies)]
    layouts = {"row-major": row_major, "column-major": [column_major(w) for w in row_major]}
    x = torch.randn(1, 1, shape[1])
    best = {name: float("inf") for name in layouts}
    for r in range(rounds):
        for name, weights in layouts.items() if r % 2 == 0 else reversed(layouts.items()):
            t0 = time.perf_counter()
            for w in weights:
                F.linear(x, w)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: copies * 4 * shape[0] * shape[1] / sec for name, sec in best.items()}


def bench_roofline(model_args):
    """Why batch-1 decoding is a memory problem: each token multiplies one vector by every
    weight matrix, reading all of them once. For each weight shape of the model: the rate
    at which it is read in each layout; then the tokens/s those reads alone would allow."""
    with torch.device("meta"):
        shapes = [tuple(m.weight.shape) for m in Transformer(ModelConfig(**model_args)).modules()
                  if type(m) is torch.nn.Linear]
    print(f"weight reads in decoding: {sum(o * i for o, i in shapes) * 4 / 1e6:.1f} MB of fp32 weights per token")
    rows, seconds = [], {"row-major": 0.0, "column-major": 0.0}
    for shape in sorted(set(shapes)):
        rates, count = weight_read_rates(shape), shapes.count(shape)
        for layout, rate in rates.items():
            seconds[layout] += count * 4 * shape[0] * shape[1] / rate  # per token
        rows.append({"shape": shape, "count": count, **{k: v / 1e9 for k, v in rates.items()}})
        print(f"  (out, in) = {str(shape):13s} x{count:3d}: row-major {rates['row-major'] / 1e9:5.1f} GB/s, "
              f"column-major {rates['column-major'] / 1e9:5.1f} GB/s")
    bound = {layout: 1 / sec for layout, sec in seconds.items()}
    print(f"  tokens/s if reading the weights were all: {bound['row-major']:,.0f} row-major, "
          f"{bound['column-major']:,.0f} column-major")
    return {"shapes": rows, "bound_tok_s": bound}


# ----------------------------------------------------------------------------- 3. KV cache size
def bench_kv(model_names):
    """Bytes per cached token (all layers, K and V, fp32) for n_kv_head = n_head, n_head / 4, 1."""
    rows = []
    for name in model_names:
        base = ModelConfig.from_name(name)
        print(f"KV cache per token, {name} ({base.n_layer} layers, {base.n_head} query heads of {base.head_dim}, fp32)")
        for n_kv in sorted({base.n_head, max(base.n_head // 4, 1), base.n_kv_head, 1}, reverse=True):
            one_position = KVCache(1, n_kv, 1, base.head_dim)  # the cache class itself, one position long
            per_token = base.n_layer * one_position.nbytes
            full = per_token * base.block_size
            rows.append({"model": name, "n_kv_head": n_kv, "bytes_per_token": per_token, "bytes_full_context": full})
            print(f"  n_kv_head {n_kv:3d}: {per_token:10,} bytes/token, {format_bytes(full)} at {base.block_size} "
                  f"tokens{'  (the preset)' if n_kv == base.n_kv_head else ''}")
    return rows


# ----------------------------------------------------------------------------- 4./6. memory
def peak_rss_of(args):
    """Run `python bench.py --child ...` and return its JSON report (peak RSS measured inside)."""
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    if out.returncode != 0:
        raise RuntimeError(f"child run failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(args):
    """Two optimizer steps in a fresh process; peak RSS above the process's RSS before the model."""
    def rss():  # current resident set size, bytes (Linux)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak_rss():  # this process image's high-water mark. Not getrusage's ru_maxrss: Linux carries
        with open("/proc/self/status") as f:  # that across fork + exec, so it would include the parent's
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    # warm up torch's own one-time allocations (kernels, thread pools) on a tiny model first
    warm = Transformer(ModelConfig.from_name("debug"))
    train_step(warm, make_optimizer(warm, TrainConfig(), torch.device("cpu")), *[torch.zeros(1, 8, dtype=torch.long)] * 2,
               False)
    del warm
    torch.manual_seed(0)
    config = ModelConfig.from_name(args["model"], **args.get("overrides", {}))
    before = rss()
    t0 = time.perf_counter()
    model = qlora_model(config) if args.get("qlora") else Transformer(config)
    t_init = time.perf_counter() - t0
    optimizer = make_optimizer(model, TrainConfig(peft="qlora" if args.get("qlora") else ""), torch.device("cpu"))
    x = torch.randint(config.vocab_size, (args["batch"], args["seq"]))
    train_step(model, optimizer, x, x, False)  # the first step creates AdamW's state...
    t1 = time.perf_counter()
    train_step(model, optimizer, x, x, False)  # ...the second is a steady-state step
    t2 = time.perf_counter()
    print(json.dumps({"peak_bytes": peak_rss() - before, "init_s": t_init, "step_s": t2 - t1}))


def qlora_model(config, r=8):
    """QLoRA's setting (section 4) built one block at a time, so the fp32 base never exists
    whole: each block is created, initialized, its linears stored in NF4 + double
    quantization, then the next; LoRA r on all projections; embeddings and head fp32."""
    with torch.device("meta"):
        model = Transformer(config)
    for module in [model.tok_embeddings, model.norm, model.output, *model.layers]:
        module.to_empty(device="cpu")
        for p in module.parameters():
            torch.nn.init.normal_(p, 0.0, 0.02) if p.dim() == 2 else torch.nn.init.ones_(p)
        if module in model.layers:
            quant.replace_linears(module, lambda lin: quant.NF4Linear.from_linear(lin, double_quant=True))
    model.reset_rope()
    return peft.apply_lora(model, r=r, alpha=2 * r, targets="all")


def bench_memory(cases):
    """estimate_memory (train.py) against the measured peak of one full fine-tuning step."""
    rows = []
    print("memory of one training step (fp32, AdamW): estimate vs measured peak RSS")
    for model, batch, seq, overrides in cases:
        config = ModelConfig.from_name(model, **overrides)
        est = estimate_memory(config, batch, seq)["full"]["total"]
        got = peak_rss_of({"model": model, "batch": batch, "seq": seq, "overrides": overrides})
        rows.append({"model": model, "batch": batch, "seq": seq, "estimate": est, "measured": got["peak_bytes"],
                     "step_s": got["step_s"]})
        print(f"  {model:14s} {batch}x{seq}: estimate {format_bytes(est)}, measured {format_bytes(got['peak_bytes'])} "
              f"({est / got['peak_bytes'] - 1:+.0%}), step {got['step_s']:.1f} s")
    return rows


# ----------------------------------------------------------------------------- 7. tinyllama_1b sweep (GPU)
def bench_sweep(model_name, seq, batches, device, dtype, peak, budget, warmup=2, steps=3, save=lambda rows: None,
                compile_batches=()):
    """Ours alone, full training (fp32 master weights, autocast, fused AdamW): tokens/s, MFU
    and peak memory for each micro-batch, without and with activation checkpointing; the
    measured peak next to plan.estimate_memory's. compile_batches: the same under
    torch.compile at those micro-batches (one compile each). Then one profiled (eager)
    step at the fastest eager setting."""
    torch.manual_seed(0)
    config = ModelConfig.from_name(model_name)
    model = build(config, device)
    optimizer = make_optimizer(model, TrainConfig(), device)
    autocast, bf16 = autocast_for(device, dtype), dtype == torch.bfloat16
    print(f"training sweep | {model_name} ({count_params(config):,} params), T = {seq}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, fused AdamW, {steps} timed steps after {warmup}")
    rows = []

    def measure(step_model, batch, ckpt=False, compiled=False):
        est = estimate_memory(config, batch, seq, activation_bytes=2 if bf16 else 4, grad_checkpoint=ckpt)
        row = {"batch": batch, "seq": seq, "grad_checkpoint": ckpt, "estimate_bytes": est["full"]["total"],
               **({"compiled": True} if compiled else {})}
        try:  # with torch.compile the warm-up steps compile
            row.update(sweep_point(step_model, optimizer, batch, seq, device, autocast, peak, warmup, steps))
        except torch.cuda.OutOfMemoryError:
            row["result"] = "OOM"
        except Exception as e:
            if not compiled:
                raise
            row["result"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        if "result" in row:  # out of the except block: the failed step's tensors are free now
            optimizer.zero_grad(set_to_none=True)
            free_memory(device)
        rows.append(row)
        save(rows)
        print_sweep_row(row)

    for ckpt in (False, True):
        model.grad_checkpoint = ckpt  # train.py --grad_checkpoint: model.py checkpoints every block
        for batch in batches:
            measure(model, batch, ckpt)
    model.grad_checkpoint = False
    compiled = torch.compile(model, dynamic=False)  # shares the weights and the optimizer
    for batch in compile_batches:
        if not budget.allows(compile_cost(config), f"torch.compile at {batch}x{seq}"):
            break
        measure(compiled, batch, compiled=True)
    fastest = max((r for r in rows if "tok_s" in r and not r.get("compiled")), key=lambda r: r["tok_s"],
                  default=None)
    if fastest is None or not budget.allows(20, "the profile"):
        return {"rows": rows}
    where = f"{fastest['batch']}x{seq}{', checkpointed' if fastest['grad_checkpoint'] else ''}"
    model.grad_checkpoint = fastest["grad_checkpoint"]
    try:  # the profile is extra: if the profiler cannot run here, the sweep's figures stand
        table = profile_step(model, optimizer, fastest["batch"], seq, device, autocast)
    except Exception as e:
        print(f"  profile at {where} failed: {type(e).__name__}: {str(e)[:300]}")
        return {"rows": rows, "profile_error": f"{type(e).__name__}: {e}"}
    print(f"profile of one step at {where} (top 15 by self {'CUDA' if device.type == 'cuda' else 'CPU'} time):")
    print(table)
    return {"rows": rows, "profile": {"batch": fastest["batch"], "grad_checkpoint": fastest["grad_checkpoint"],
                                      "table": table}}


def sweep_point(model, optimizer, batch, seq, device, autocast, peak, warmup, steps):
    """Warm-up steps (the first creates AdamW's state and the allocator's blocks), then the
    timed ones, each waited for; the peak is the whole footprint: weights, gradients,
    AdamW's two moments, activations."""
    x = torch.randint(model.config.vocab_size, (batch, seq), device=device)
    y = torch.randint(model.config.vocab_size, (batch, seq), device=device)
    for _ in range(warmup):
        train_step(model, optimizer, x, y, False, autocast)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train_step(model, optimizer, x, y, False, autocast)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    tokens = batch * seq
    out = {"ms": 1000 * sec, "tok_s": tokens / sec,
           "mfu": flops_per_token(model.config, seq) * tokens / sec / peak if peak else None}
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def print_sweep_row(r):
    kind = "compiled" if r.get("compiled") else "checkpointed" if r["grad_checkpoint"] else "plain"
    head = f"  {r['batch']:2d}x{r['seq']} {kind:12s}"
    estimate = f"estimate {format_bytes(r['estimate_bytes'])}"
    if "result" in r:
        print(f"{head} {r['result']} ({estimate})")
        return
    mfu = f"MFU {100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "MFU   n/a"
    peak = f"peak {format_bytes(r['peak_memory_bytes'])}" if "peak_memory_bytes" in r else "peak n/a"
    print(f"{head} {r['ms']:8.1f} ms  {r['tok_s']:9,.0f} tok/s  {mfu}  {peak} ({estimate})")


def profile_step(model, optimizer, batch, seq, device, autocast, rows=15):
    """torch.profiler over one warm training step: the kernels that take the time."""
    from torch.profiler import ProfilerActivity, profile
    x = torch.randint(model.config.vocab_size, (batch, seq), device=device)
    train_step(model, optimizer, x, x, False, autocast)  # warm: no first-call allocations in the trace
    synchronize(device)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        train_step(model, optimizer, x, x, False, autocast)
        synchronize(device)
    return prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                     row_limit=rows, max_name_column_width=48)


# ----------------------------------------------------------------------------- 8. greedy decoding (GPU)
def copy_bandwidth(device, nbytes, repeats=10):
    """Memory bandwidth measured here: copying a buffer reads and writes each byte once, so
    2 x nbytes cross the memory bus per copy. Best of 3 runs of `repeats` copies."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes * repeats / best


def bytes_per_step(config, batch, context, dtype_bytes=2):
    """Bytes a decoding step must read at least: every weight once (the batch shares them),
    except the embedding table (a lookup reads only the batch's rows), plus each sequence's
    KV cache over `context` positions."""
    weights = count_params(config) - (0 if config.tie_embeddings else config.vocab_size * config.n_embd)
    kv = 2 * config.n_layer * config.n_kv_head * config.head_dim * context * batch
    return dtype_bytes * (weights + kv)


def hf_bf16(hf):
    """transformers' model in bf16 like ours: a plain .to() would round RoPE's inverse
    frequencies to bf16 too (and the angles m * theta with them); keep those fp32, so both
    models compute cos and sin in fp32 and round only the results to bf16."""
    rope = hf.model.rotary_emb
    inv_freq = rope.inv_freq.clone()
    hf.to(torch.bfloat16)
    rope.inv_freq = inv_freq
    return hf


def first_divergence(a, b, start):
    """The first generated position where two (B, T) token tensors differ in any row, None if
    they agree (bf16 rounds differently in the two implementations: ties can flip an argmax)."""
    n = min(a.shape[1], b.shape[1])
    diff = (a[:, :n] != b[:, :n]).any(0).nonzero()
    return int(diff[0]) - start if len(diff) else (None if a.shape == b.shape else n - start)


def bench_decode_gpu(names, batches, prompt_len, new_tokens, rounds, device, bandwidth, budget,
                     static_batches=(1,), save=lambda rows: None):
    """Greedy decoding in bf16, ours (KV cache) against transformers' generate (its dynamic
    cache, and, at static_batches, its static cache, which generate torch.compiles on a
    GPU: a compile per batch size), for each model and batch size; tokens/s next to the
    bound that reading the weights and the KV cache sets (bytes_per_step). A case that fails
    is recorded, the next runs."""
    rows = []
    for name in names:
        torch.manual_seed(0)
        ours = build(ModelConfig.from_name(name), device).eval()
        theirs = hf_bf16(hf_twin(ours).eval())
        ours.to(torch.bfloat16)  # RoPE tables, computed in fp32, are rounded as apply_rope rounds them
        for batch in batches:
            try:
                rows.append(decode_case(name, ours, theirs, batch, prompt_len, new_tokens, rounds, device, bandwidth,
                                        budget if batch in static_batches else None))
            except Exception as e:  # out of memory included
                rows.append({"model": name, "batch": batch, "error": f"{type(e).__name__}: {e}"[:1000]})
                FAILURES.append(f"decode_gpu: {name}, batch {batch}")
                print(f"greedy decoding | {name}, batch {batch} | failed: {rows[-1]['error'][:300]}")
            free_memory(device)
            save(rows)
        del ours, theirs
        free_memory(device)
    return rows


def static_cost(config):
    """Seconds for transformers to torch.compile a decoding step with CUDA graphs (a guess)."""
    return 15 + 2 * config.n_layer


def decode_case(name, ours, theirs, batch, prompt_len, new_tokens, rounds, device, bandwidth, budget):
    config = ours.config
    idx = torch.randint(config.vocab_size, (batch, prompt_len), device=device)
    hf_args = dict(attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0)
    prompts = idx.tolist()
    calls = {"ours (KV cache)": lambda: ours.generate(idx, new_tokens, temperature=0),
             "ours (CUDA graph)": lambda: torch.tensor(batched_generate(ours, prompts, new_tokens, temperature=0,
                                                                       cuda_graph=True), device=device),
             "transformers": lambda: theirs.generate(idx, **hf_args)}
    errors = {}
    static = lambda: theirs.generate(idx, cache_implementation="static", **hf_args)
    if budget is not None and budget.allows(static_cost(config), f"transformers static ({name}, batch {batch})") \
            and try_first(static, "transformers static", errors):
        calls["transformers static"] = static
    tokens = {who: fn() for who, fn in calls.items()}  # also each one's warm-up
    # resident bytes: the weights of the model each contender runs (its KV cache is made in the call;
    # CUDA graphs' memory pools, and the KV cache decode.GraphStep keeps between calls, are not counted)
    peaks, weights = {}, {"ours": tensor_bytes(ours), "transformers": tensor_bytes(theirs)}
    t = alternate({who: measured(fn, device, peaks, who, weights[who.split(" ")[0]]) for who, fn in calls.items()},
                  rounds)
    return decode_row(name, config, batch, prompt_len, new_tokens, t, tokens, peaks, bandwidth, errors)


def decode_row(name, config, batch, prompt_len, new_tokens, t, tokens, peaks, bandwidth, errors):
    step_bytes = bytes_per_step(config, batch, prompt_len + new_tokens // 2)  # the mean context
    bound = {src: bw * batch / step_bytes for src, bw in bandwidth.items() if bw}  # tokens/s
    row = {"model": name, "params": count_params(config), "batch": batch, "prompt": prompt_len,
           "new_tokens": new_tokens, "bytes_per_step": step_bytes, "bound_tok_s": bound, "contenders": {}}
    print(f"greedy decoding | {name}, bf16 | batch {batch}, prompt {prompt_len}, {new_tokens} new | bound "
          + ", ".join(f"{b:,.0f} tok/s ({src})" for src, b in bound.items()))
    width = max(22, *map(len, t))
    for who, sec in t.items():
        tok_s = batch * new_tokens / sec
        c = row["contenders"][who] = {"tok_s": tok_s, "of_bound": {src: tok_s / b for src, b in bound.items()}}
        line = f"  {who:{width}s} {tok_s:9,.0f} tok/s  " + \
            "  ".join(f"{100 * f:4.0f}% of {src}" for src, f in c["of_bound"].items())
        if who in peaks:
            c["peak_memory_bytes"] = peaks[who]
            line += f"  peak {peaks[who] / 2**30:.2f} GiB"
        if who != "ours (KV cache)":
            c["first_divergence"] = first_divergence(tokens["ours (KV cache)"], tokens[who], prompt_len)
            first = c["first_divergence"]
            line += "  same tokens" if first is None else f"  differs from new token {first}"
        print(line)
    row["speedup_vs_transformers"] = t["transformers"] / t["ours (KV cache)"]
    row["graph_vs_transformers"] = t["transformers"] / t["ours (CUDA graph)"]
    print(f"  ours / transformers: {row['speedup_vs_transformers']:.2f}x faster; with CUDA graphs "
          f"{row['graph_vs_transformers']:.2f}x")
    if errors:
        row["errors"] = errors
    return row


# ----------------------------------------------------------------------------- main
SECTIONS = ("train", "decode", "kv", "memory", "tinyllama", "tinyllama_sweep", "decode_gpu")
CPU_SECTIONS = {"decode", "memory", "tinyllama"}  # measure the CPU: peak RSS, CPU weight-read rates
GPU_SECTIONS = {"tinyllama_sweep", "decode_gpu"}  # sized for a GPU; on a CPU only with --quick (debug preset)


def autocast_for(device, dtype):
    """train.py's mixed precision: fp32 weights, matmuls in bf16 under autocast (None: fp32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else None


def run_section(name, fn, report, path, device):
    """One section; if it fails, say so in one line, keep its traceback in the report, and go
    on with the next. The report is written after every section."""
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:
        FAILURES.append(name)
        report.setdefault("errors", {})[name] = traceback.format_exc()
        print(f"section {name} failed: {type(e).__name__}: {str(e)[:500]}")
    free_memory(device)
    report.setdefault("seconds", {})[name] = time.perf_counter() - t0
    if device.type == "cuda":
        print(f"({name}: {time.perf_counter() - t0:.0f} s)")
    write_json(report, path)


def argument_parser():
    p = Parser(__doc__)
    p.add_argument("--only", help="comma-separated sections: train, decode, kv, memory, tinyllama (needs ~20 GB "
                   "RAM), tinyllama_sweep, decode_gpu (GPU). Default: train,decode,kv,memory on a CPU; "
                   "train,tinyllama_sweep,decode_gpu on a GPU")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for the smoke test")
    p.add_argument("--rounds", type=Number(int, 1), help="timed rounds per contender (default 5 on a CPU, 3 on a "
                   "GPU, 2 with --quick)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd training (on a GPU: ours on "
                   "demo and 370M, transformers on demo) and, on a CPU, decoding")
    p.add_argument("--case", help="only the training cases whose name contains this (e.g. demo)")
    p.add_argument("--out_dir", default="out", help="where bench.json goes")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="training: auto is train.py's (bf16 autocast on a GPU, fp32 on a CPU)")
    p.add_argument("--time_budget", type=Number(float, 0), help="seconds for the whole run; optional work "
                   "(compiling, transformers' static cache, the profile) is skipped when it would not fit; 0: no "
                   "budget (default 360 on a GPU, none on a CPU)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def parse_args(argv=None):
    return argument_parser().parse_args(argv)


def check_sections(args, device):
    """The sections to run, or one line saying why not."""
    sections = set((args.only or ("train,decode,kv,memory" if device.type == "cpu" else
                                  "train,tinyllama_sweep,decode_gpu")).split(","))
    if sections - set(SECTIONS):
        raise ValueError(f"unknown section(s) {sorted(sections - set(SECTIONS))}; choose from {', '.join(SECTIONS)}")
    if device.type != "cpu" and sections & CPU_SECTIONS:
        raise ValueError(f"section(s) {sorted(sections & CPU_SECTIONS)} measure the CPU; on a GPU run train, kv, "
                         f"tinyllama_sweep, decode_gpu")
    if device.type == "cpu" and not args.quick and sections & GPU_SECTIONS:
        raise ValueError(f"section(s) {sorted(sections & GPU_SECTIONS)} are sized for a GPU; on a CPU add --quick "
                         f"to smoke-test them on the debug preset")
    return sections


def quiet_transformers():
    """transformers' warnings off (generate notes its defaults at every call): the device run
    returns only the end of its output."""
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    except ImportError:  # the kv section runs without transformers
        pass


def versions():
    try:
        import transformers
        return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__}
    except ImportError:
        return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": None}


def header(device, dtype):
    """The first line (versions, the machine, the MFU denominator) and the report's start."""
    if device.type == "cpu":  # the peak is measured: fp32 matmuls on this CPU
        peak = peak_flops(device, torch.float32)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, measured fp32 matmul peak "
              f"{peak / 1e9:.0f} GFLOP/s")
        return peak, {"peak_flops": peak, "threads": torch.get_num_threads(), "versions": versions()}
    key, spec = device_spec(device)
    peak = peak_flops(device, dtype)
    name, total = torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).total_memory
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {versions()['transformers']}, {name} "
          f"({total / 2**30:.0f} GiB), " + (f"datasheet {key}: {spec['peak_flops'] / 1e12:.0f} TFLOP/s bf16, "
                                            f"{spec['memory_bandwidth'] / 1e12:.2f} TB/s" if spec else "not in "
                                            "plan.DEVICES: MFU not reported"))
    return peak, {"peak_flops": peak, "device": name, "device_memory": total, "dtype": str(dtype),
                  "datasheet": {key: spec} if spec else None, "versions": versions()}


def main(argv=None):
    try:
        args = parse_args(argv)
    except ValueError as e:
        exit_with_error(e)
    args.quick = args.quick or bool(os.environ.get("NANO_QUICK"))  # the documentation test
    if args.child:
        return child(json.loads(args.child))
    try:  # before any long run: a bad device or an unwritable out_dir is one line now, not at the end
        device = resolve_device(args.device)
        sections = check_sections(args, device)
        check_run_kind(args.out_dir, "bench.py", resume=None)  # bench.json never goes into a run's folder
        check_out_dir(args.out_dir, 0)
        lock_out_dir(args.out_dir)  # one writer of bench.json at a time
    except (ValueError, OSError) as e:
        exit_with_error(e)
    gpu = device.type == "cuda"
    rounds = args.rounds or (2 if args.quick else 3 if gpu else 5)
    dtype = {"auto": torch.bfloat16 if gpu else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    budget = Budget(args.time_budget if args.time_budget is not None else 360 if gpu else 0)
    quiet_transformers()
    torch.manual_seed(0)
    peak, report = header(device, dtype)
    path = os.path.join(args.out_dir, "bench.json")
    demo = ModelConfig.from_name("debug" if args.quick else "demo").to_dict()

    def train():
        cases = QUICK_CASE if args.quick else GPU_TRAIN_CASES if gpu else TRAIN_CASES
        report["train"] = []
        bench_train(cases, rounds, peak, args.compile, args.case, device, autocast_for(device, dtype), budget,
                    results=report["train"], save=lambda: write_json(report, path))

    def decode():
        report["decode"] = bench_decode(demo, 16, 16 if args.quick else 128, rounds, args.compile)
        report["roofline"] = bench_roofline(demo)
        achieved = report["decode"]["tok_s"]["ours (KV cache)"]
        print(f"  ours decodes at {achieved / report['roofline']['bound_tok_s']['column-major']:.0%} of that bound")

    def kv():
        report["kv"] = bench_kv(["debug"] if args.quick else ["demo", "tinyllama_1b"])

    def memory():
        cases = [("debug", 4, 64, {})] if args.quick else [("demo", 8, 256, {}), ("demo", 2, 256, {}),
                                                           ("tinyllama_1b", 1, 256, {"n_layer": 2})]
        report["memory"] = bench_memory(cases)

    def tinyllama():
        report["tinyllama"] = bench_memory([("tinyllama_1b", 1, 256, {})])
        got = peak_rss_of({"model": "tinyllama_1b", "batch": 1, "seq": 256, "qlora": True})
        report["tinyllama_qlora"] = got
        print(f"  tinyllama_1b  1x256 QLoRA (NF4+DQ base, LoRA r=8 on all projections, paged AdamW): "
              f"measured {format_bytes(got['peak_bytes'])}, step {got['step_s']:.1f} s")

    def tinyllama_sweep():
        model, seq, batches = ("debug", 64, (1, 2)) if args.quick else ("tinyllama_1b", 2048, (1, 2, 4, 8, 16))
        report["tinyllama_sweep"] = bench_sweep(
            model, seq, batches, device, dtype, peak, budget, *((1, 2) if args.quick else (2, 3)),
            save=lambda rows: (report.__setitem__("tinyllama_sweep", {"rows": rows}), write_json(report, path)),
            compile_batches=(((2,) if args.quick else (8, 16)) if args.compile else ()))

    def decode_gpu():
        nbytes = 2**30 if gpu else 2**26  # 1 GiB: far past every cache (64 MiB on a CPU smoke test)
        _, spec = device_spec(device) if gpu else (None, None)
        bandwidth = {"datasheet": spec["memory_bandwidth"] if spec else None,
                     "measured": copy_bandwidth(device, nbytes)}
        report["bandwidth"] = bandwidth
        print(f"memory bandwidth: measured {bandwidth['measured'] / 1e12:.2f} TB/s (a {nbytes / 2**30:.2f} GiB copy, "
              f"read + write), datasheet " + (f"{bandwidth['datasheet'] / 1e12:.2f} TB/s" if spec else "n/a"))
        if gpu:
            print("  transformers static = generate(cache_implementation='static'), which torch.compiles the "
                  "decoding step (CUDA graphs); at batch 1 only: a compile per batch size")
        models, batches, prompt, new = (("debug",), (1, 4), 8, 8) if args.quick else \
            (("demo", "tinyllama_1b"), (1, 16), 64, 128)
        report["decode_gpu"] = bench_decode_gpu(
            models, batches, prompt, new, rounds, device, bandwidth, budget, static_batches=batches[:1],
            save=lambda rows: (report.__setitem__("decode_gpu", rows), write_json(report, path)))

    jobs = {"train": train, "decode": decode, "kv": kv, "memory": memory, "tinyllama": tinyllama,
            "tinyllama_sweep": tinyllama_sweep, "decode_gpu": decode_gpu}
    for name in SECTIONS:
        if name in sections:
            run_section(name, jobs[name], report, path, device)
    unlock_out_dir(args.out_dir)
    print(f"wrote {path}")
    if args.quick:
        print("--quick: the smallest model, a few rounds: this checks that every section runs, its timings are "
              f"not results; the real run: python bench.py --out_dir {args.out_dir}")
    if FAILURES:
        print(f"failed: {', '.join(FAILURES)} (tracebacks in {path} under 'errors')")
        sys.exit(1)


if __name__ == "__main__":
    main()
