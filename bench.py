"""Benchmarks: this model next to Hugging Face's LlamaForCausalLM on the same weights.

    python bench.py                  # everything that runs on this machine (a few minutes)
    python bench.py --only train     # one section: train, decode, kv, memory, tinyllama
    python bench.py --compile        # also torch.compile'd training and decoding
    python bench.py --quick          # tiny sizes, seconds (the CI smoke test)

Timings alternate between the contenders (ours, theirs, ours, theirs, ...) inside one
process and report the median of each, so a noisy machine slows both alike; the
ratios are the result, the absolute figures are for this machine only. MFU divides the
model FLOPs (model.flops_per_token, PaLM appendix B) by the peak fp32 matmul rate of this
machine, measured in the same run (plan.peak_flops). Results are also written to
bench.json in --out_dir.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import peft
import quant
from attention import KVCache
from checkpoint import write_json
from hf import config_to_hf, hf_module_name
from model import ModelConfig, Transformer, count_params, flops_per_token
from plan import estimate_memory, format_bytes, peak_flops
from runs import check_out_dir, resolve_device
from sample import column_major
from train import TrainConfig, make_optimizer

# two training shapes: the demo preset and a larger one
TRAIN_CASES = {
    "demo (12.6M, 8x256)": (dict(ModelConfig.from_name("demo").to_dict()), 8),
    "larger (8x512 GQA 8/2, 4x512)": (dict(vocab_size=8192, block_size=512, n_layer=8, n_embd=512, n_head=8,
                                           n_kv_head=2), 4),
}
QUICK_CASE = {"debug (2x64, 4x64)": (dict(ModelConfig.from_name("debug").to_dict()), 4)}


def hf_twin(model):
    """transformers' LlamaForCausalLM with our config and a copy of our weights (the oracle)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = LlamaForCausalLM(LlamaConfig(**config_to_hf(model.config), attn_implementation="sdpa"))
    state = {hf_module_name(k): v for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    hf.load_state_dict(state, strict=not model.config.tie_embeddings)
    return hf


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


# ----------------------------------------------------------------------------- 1. training step
def train_step(model, optimizer, x, y, hf):
    """Forward, cross-entropy over all positions, backward, AdamW: the same work for both."""
    logits = model(input_ids=x).logits if hf else model(x)[0]
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), y.view(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_train(cases, rounds, peak, compile_too=False, only=None):
    results = []
    for name, (model_args, batch) in cases.items():
        if only and only not in name:
            continue
        torch.manual_seed(0)
        config = ModelConfig(**model_args)
        ours = Transformer(config)
        theirs = hf_twin(ours)
        T = config.block_size
        x = torch.randint(config.vocab_size, (batch, T))
        y = torch.randint(config.vocab_size, (batch, T))
        tc = TrainConfig()
        opt_ours = make_optimizer(ours, tc, torch.device("cpu"))
        opt_theirs = make_optimizer(theirs, tc, torch.device("cpu"))
        contenders = {"ours": lambda: train_step(ours, opt_ours, x, y, False),
                      "transformers": lambda: train_step(theirs, opt_theirs, x, y, True)}
        if compile_too:
            compiled = torch.compile(ours)
            contenders["ours + torch.compile"] = lambda: train_step(compiled, opt_ours, x, y, False)
        t = alternate(contenders, rounds)
        tokens = batch * T
        flops = flops_per_token(config, T) * tokens
        row = {"case": name, "params": count_params(ours.config), "tokens_per_step": tokens}
        for who, sec in t.items():
            row[who] = {"ms": 1000 * sec, "tok_s": tokens / sec, "mfu": flops / sec / peak}
        row["speedup_vs_transformers"] = t["transformers"] / t["ours"]
        results.append(row)
        print(f"train step | {name} | {count_params(ours.config):,} params")
        for who, sec in t.items():
            print(f"  {who:22s} {1000 * sec:8.1f} ms  {tokens / sec:9,.0f} tok/s  MFU {100 * flops / sec / peak:5.1f}%")
        print(f"  ours / transformers: {row['speedup_vs_transformers']:.2f}x faster")
    return results


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


# ----------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="train,decode,kv,memory", help="comma-separated sections: train, decode, "
                   "kv, memory, tinyllama (tinyllama needs ~20 GB RAM and is not in the default set)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for the smoke test")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time training and decoding under torch.compile")
    p.add_argument("--case", help="only the training cases whose name contains this (e.g. demo)")
    p.add_argument("--out_dir", default="out")
    p.add_argument("--device", default="cpu", help="cpu (the comparisons here are CPU measurements)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.quick = args.quick or bool(os.environ.get("NANO_QUICK"))  # the documentation test
    if args.child:
        return child(json.loads(args.child))
    sections = set(args.only.split(","))
    unknown = sections - {"train", "decode", "kv", "memory", "tinyllama"}
    if unknown:
        raise SystemExit(f"error: unknown section(s) {sorted(unknown)}; choose from train, decode, kv, memory, "
                         f"tinyllama")
    try:  # before any long run: a bad device or an unwritable out_dir is one line now, not at the end
        resolve_device(args.device)
        check_out_dir(args.out_dir, 0)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    rounds = 2 if args.quick else args.rounds
    peak = peak_flops(torch.device("cpu"), torch.float32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, measured fp32 matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s")
    report = {"peak_flops": peak, "threads": torch.get_num_threads()}
    demo = ModelConfig.from_name("debug" if args.quick else "demo").to_dict()
    if "train" in sections:
        report["train"] = bench_train(QUICK_CASE if args.quick else TRAIN_CASES, rounds, peak, args.compile, args.case)
    if "decode" in sections:
        report["decode"] = bench_decode(demo, 16, 16 if args.quick else 128, rounds, args.compile)
        report["roofline"] = bench_roofline(demo)
        achieved = report["decode"]["tok_s"]["ours (KV cache)"]
        print(f"  ours decodes at {achieved / report['roofline']['bound_tok_s']['column-major']:.0%} of that bound")
    if "kv" in sections:
        report["kv"] = bench_kv(["debug"] if args.quick else ["demo", "tinyllama_1b"])
    if "memory" in sections:
        cases = [("debug", 4, 64, {})] if args.quick else [("demo", 8, 256, {}), ("demo", 2, 256, {}),
                                                           ("tinyllama_1b", 1, 256, {"n_layer": 2})]
        report["memory"] = bench_memory(cases)
    if "tinyllama" in sections:
        report["tinyllama"] = bench_memory([("tinyllama_1b", 1, 256, {})])
        got = peak_rss_of({"model": "tinyllama_1b", "batch": 1, "seq": 256, "qlora": True})
        report["tinyllama_qlora"] = got
        print(f"  tinyllama_1b  1x256 QLoRA (NF4+DQ base, LoRA r=8 on all projections, paged AdamW): "
              f"measured {format_bytes(got['peak_bytes'])}, step {got['step_s']:.1f} s")
    write_json(report, os.path.join(args.out_dir, "bench.json"))
    print(f"wrote {os.path.join(args.out_dir, 'bench.json')}")


if __name__ == "__main__":
    main()
