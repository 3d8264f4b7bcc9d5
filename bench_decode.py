"""Benchmarks of decode.py and quantized decoding, next to transformers on the same weights.

    python bench_decode.py                                   # all sections, random demo-sized models
    python bench_decode.py --target out/demo --draft out/demo_draft   # a trained pair
    python bench_decode.py --only speculative,batched,quant --new_tokens 128 --rounds 3
    python bench_decode.py --quick                           # tiny sizes, seconds (smoke test)

Sections: speculative (acceptance rate and speed-up for k = 2..8, a draft model and
prompt lookup, vs plain greedy and transformers' greedy), batched (tokens/s at batch 1, 8,
32, ours vs transformers' left-padded batched generate), train (one AdamW step: ours eager,
torch.compile'd and transformers' eager on the same weights; fused AdamW vs foreach), quant (int8 / NF4 tokens/s vs
fp32: dequantized every call, as training does, and cached for decoding; plus one
matrix-vector product through torch._weight_int8pack_mm and a torch.compile'd
dequantize-matmul). As in bench.py: contenders alternate in one process, medians.
"""

import copy
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import decode
import quant
from bench import alternate, hf_twin, synchronize, train_step
from checkpoint import write_json
from cli import Number, Parser
from model import ModelConfig, Transformer
from runs import exit_with_error, resolve_device
from train import TrainConfig, make_optimizer


def load_or_random(out_dir, preset, quick, device="cpu"):
    """A trained run (runs.load_run), a Hugging Face checkpoint directory (hf.save_llama's,
    to carry a trained model without its optimizer state) or, without one, a random model
    of the preset."""
    if out_dir and os.path.exists(os.path.join(out_dir, "config.json")):
        from hf import load_llama
        return load_llama(out_dir, device=device).eval(), out_dir
    if out_dir:
        from runs import load_run
        model, _, _ = load_run(out_dir, device)
        return model.eval(), out_dir
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("debug" if quick else preset)).to(device).eval(), f"random {preset}"


def synced(fn, device):
    """fn, returning only when the GPU has finished its work (alternate's clock times the work)."""
    return lambda: (fn(), synchronize(device))[0]


def prompts_from_data(dataset, n, lengths, vocab_size, seed=0):
    """n prompts cut from the validation tokens (random tokens without a dataset)."""
    rng = np.random.default_rng(seed)
    path = os.path.join(dataset, "val.bin") if dataset else ""
    data = np.memmap(path, dtype=np.uint16, mode="r") if path and os.path.exists(path) else None
    out = []
    for i in range(n):
        L = lengths[i % len(lengths)]
        if data is None:
            out.append(rng.integers(0, vocab_size, L).tolist())
        else:
            start = int(rng.integers(0, len(data) - L))
            out.append([int(t) for t in data[start:start + L]])
    return out


def hf_greedy(hf, idx, mask, new_tokens):
    return hf.generate(idx, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)


# ----------------------------------------------------------------------------- speculative decoding
@torch.inference_mode()
def verify_cost(model, positions=(1, 2, 3, 5, 9), context=64, rounds=5, reps=10):
    """Milliseconds of one target pass through the KV cache with T new positions (T = k + 1
    when verifying k drafts), after a `context`-token prompt. Speculative decoding gains
    when T positions cost little more than one: true where a pass is bound by reading the
    weights, less so where T x the FLOPs take longer than that read."""
    context = min(context, model.config.block_size - max(positions))
    device = model.tok_embeddings.weight.device
    caches = model.new_kv_caches(1)
    model(torch.zeros(1, context, dtype=torch.long, device=device), caches=caches, start_pos=0)

    def passes(T):
        x = torch.zeros(1, T, dtype=torch.long, device=device)

        def run():
            for _ in range(reps):
                model(x, caches=caches, start_pos=context)
                decode.rollback(caches, context)
            synchronize(device)
        return run
    t = alternate({T: passes(T) for T in positions}, rounds)
    ms = {T: 1000 * sec / reps for T, sec in t.items()}
    print("one target pass through the KV cache: " + ", ".join(f"T={T} {v:.1f} ms ({v / ms[1]:.2f}x)"
                                                                for T, v in ms.items()))
    return {"ms": ms, "vs_one": {T: v / ms[1] for T, v in ms.items()}}


@torch.inference_mode()
def bench_speculative(target, draft, prompts, new_tokens, ks, rounds, lookup_ks=None):
    """Greedy decoding of each prompt: plain, transformers, and speculative with k drafts."""
    device = target.tok_embeddings.weight.device
    theirs = hf_twin(target).eval()
    ids = lambda p: torch.tensor([p], device=device)  # noqa: E731
    rows = {"acceptance": {}, "identical": {}}
    plain = [target.generate(ids(p), new_tokens, temperature=0) for p in prompts]
    contenders = {"ours plain greedy": lambda: [target.generate(ids(p), new_tokens, temperature=0) for p in prompts],
                  "transformers greedy": lambda: [hf_greedy(theirs, ids(p), torch.ones_like(ids(p)), new_tokens)
                                                  for p in prompts]}
    hf_out = contenders["transformers greedy"]()
    rows["identical"]["transformers"] = all(torch.equal(a, b) for a, b in zip(plain, hf_out))
    if device.type == "cuda":  # one step replayed from a CUDA graph (decode.GraphStep)
        graphed = lambda: [torch.tensor(decode.batched_generate(target, [p], new_tokens, temperature=0,  # noqa: E731
                                                                cuda_graph=True), device=device) for p in prompts]
        rows["identical"]["ours CUDA graph greedy"] = all(torch.equal(a, b) for a, b in zip(plain, graphed()))
        contenders["ours CUDA graph greedy"] = graphed
    for name, drafter, kinds, first in (("draft", draft, ks, False), ("prompt lookup", "prompt", lookup_ks or ks, False),
                                        ("lookup, else draft", draft, lookup_ks or ks, True)):
        for k in kinds:
            label = f"{name} k={k}"
            stats, same = {"drafted": 0, "accepted": 0}, True
            for p, ref in zip(prompts, plain):
                s = {}
                out = decode.speculative_generate(target, ids(p), new_tokens, drafter, k, temperature=0,
                                                  stats=s, lookup_first=first)
                same &= torch.equal(out, ref)
                stats["drafted"] += s["drafted"]
                stats["accepted"] += s["accepted"]
            rows["identical"][label] = same
            rows["acceptance"][label] = stats["accepted"] / max(stats["drafted"], 1)
            contenders[label] = (lambda d=drafter, k=k, first=first: [decode.speculative_generate(
                target, ids(p), new_tokens, d, k, temperature=0, lookup_first=first) for p in prompts])
    t = alternate({who: synced(fn, device) for who, fn in contenders.items()}, rounds)
    n = new_tokens * len(prompts)
    rows["tok_s"] = {who: n / sec for who, sec in t.items()}
    rows["speedup_vs_plain"] = {who: t["ours plain greedy"] / sec for who, sec in t.items()}
    rows["speedup_vs_transformers"] = {who: t["transformers greedy"] / sec for who, sec in t.items()}
    print(f"speculative greedy decoding | {len(prompts)} prompts x {new_tokens} new tokens")
    for who in t:
        acc, same = rows["acceptance"].get(who), rows["identical"].get(who)
        print(f"  {who:22s} {rows['tok_s'][who]:8.1f} tok/s  x{rows['speedup_vs_plain'][who]:.2f} plain  "
              f"x{rows['speedup_vs_transformers'][who]:.2f} transformers"
              + (f"  acceptance {acc:.2f}" if acc is not None else "")
              + (f"  identical {same}" if same is not None else ""))
    return rows


# ----------------------------------------------------------------------------- batched generation
@torch.inference_mode()
def bench_batched(model, prompt_pool, new_tokens, batches, rounds):
    """Tokens/s of decode.batched_generate and transformers' left-padded generate."""
    device = model.tok_embeddings.weight.device
    theirs = hf_twin(model).eval()
    rows = []
    for B in batches:
        prompts = prompt_pool[:B]
        idx, real, _ = decode.left_pad(prompts, 0, device)
        mask = real.long()
        ours = decode.batched_generate(model, prompts, new_tokens, temperature=0)
        hf_out = hf_greedy(theirs, idx, mask, new_tokens)
        same = sum(o[len(p):] == h[-new_tokens:].tolist() for o, p, h in zip(ours, prompts, hf_out)) / B
        contenders = {"ours": lambda: decode.batched_generate(model, prompts, new_tokens, temperature=0),
                      "transformers": lambda: hf_greedy(theirs, idx, mask, new_tokens)}
        if device.type == "cuda":  # one step replayed from a CUDA graph (decode.GraphStep)
            contenders["ours CUDA graph"] = lambda: decode.batched_generate(model, prompts, new_tokens, temperature=0,
                                                                            cuda_graph=True)
        t = alternate({who: synced(fn, device) for who, fn in contenders.items()}, rounds)
        row = {"batch": B, "tok_s": {who: B * new_tokens / sec for who, sec in t.items()},
               "speedup_vs_transformers": t["transformers"] / t["ours"], "rows_identical_to_transformers": same}
        line = (f"batched greedy | batch {B:3d}, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens | "
                f"ours {row['tok_s']['ours']:8.1f} tok/s, transformers {row['tok_s']['transformers']:8.1f} tok/s, "
                f"x{row['speedup_vs_transformers']:.2f} | rows identical to transformers {same:.0%}")
        if "ours CUDA graph" in t:
            row["graph_vs_transformers"] = t["transformers"] / t["ours CUDA graph"]
            row["graph_rows_identical"] = contenders["ours CUDA graph"]() == ours
            line += (f" | CUDA graph {row['tok_s']['ours CUDA graph']:8.1f} tok/s, x{row['graph_vs_transformers']:.2f}"
                     f" transformers, rows identical to ours {row['graph_rows_identical']}")
        rows.append(row)
        print(line)
    return rows


# ----------------------------------------------------------------------------- quantized decoding
def matvec_options(shape, rounds=20):
    """Microseconds of one token through an (out, in) layer: fp32, and the int8 / NF4 ways to do it."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(shape[1], shape[0], bias=False)
    i8, nf4 = quant.Int8Linear.from_linear(lin), quant.NF4Linear.from_linear(lin, double_quant=True)
    x = torch.randn(1, shape[1])
    w_col = lin.weight.detach().t().contiguous().t()
    scales = i8.weight_absmax.flatten().contiguous()
    fused = torch.compile(lambda a: F.linear(a, i8.weight_int8.to(a.dtype)) * i8.weight_absmax.T / 127)
    fused_nf4 = torch.compile(lambda a: F.linear(a, nf4.dequantize()))
    options = {"fp32 (column-major)": lambda: F.linear(x, w_col),
               "int8 dequantize per call": lambda: i8(x),
               "int8 torch._weight_int8pack_mm": lambda: torch._weight_int8pack_mm(x, i8.weight_int8, scales),
               "int8 torch.compile dequant+matmul": lambda: fused(x),
               "nf4-dq dequantize per call": lambda: nf4(x),
               "nf4-dq torch.compile dequant+matmul": lambda: fused_nf4(x)}
    with torch.inference_mode():
        t = alternate({k: (lambda f=f: [f() for _ in range(10)]) for k, f in options.items()}, rounds)
    return {k: 1e6 * sec / 10 for k, sec in t.items()}


@torch.inference_mode()
def bench_quant(model, new_tokens, rounds, shape):
    """Batch-1 greedy tokens/s: fp32, int8 and NF4-DQ (dequantized per call; cached)."""
    idx = torch.randint(model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    models = {"fp32": decode.for_decoding(copy.deepcopy(model))}
    for method in ("int8", "nf4-dq"):
        q = decode.for_decoding(quant.quantize_model(copy.deepcopy(model), method))  # the LM head, as sample.py
        models[f"{method} dequantize per call"] = q
        models[f"{method} cached (cache_dequantized)"] = quant.cache_dequantized(copy.deepcopy(q))
    outs = {who: m.generate(idx, new_tokens, temperature=0) for who, m in models.items()}
    t = alternate({who: (lambda m=m: m.generate(idx, new_tokens, temperature=0)) for who, m in models.items()},
                  rounds)
    rows = {"tok_s": {who: new_tokens / sec for who, sec in t.items()},
            "vs_fp32": {who: t["fp32"] / sec for who, sec in t.items()},
            "cached_equals_per_call": {m: torch.equal(outs[f"{m} cached (cache_dequantized)"],
                                                      outs[f"{m} dequantize per call"]) for m in ("int8", "nf4-dq")},
            "matvec_us": matvec_options(shape)}
    print(f"quantized greedy decoding | batch 1, {new_tokens} new tokens")
    for who in t:
        print(f"  {who:34s} {rows['tok_s'][who]:8.1f} tok/s  x{rows['vs_fp32'][who]:.2f} fp32")
    print(f"one token through a {shape} layer (microseconds):")
    for who, us in rows["matvec_us"].items():
        print(f"  {who:36s} {us:9.1f} us")
    return rows


# ----------------------------------------------------------------------------- training step
def bench_train_step(presets, batch, rounds):
    """One AdamW step (bench.train_step): ours eager, ours torch.compile'd, transformers eager,
    on the same weights; and AdamW's step alone, fused (train.make_optimizer's choice on a
    CPU) vs foreach vs the per-parameter loop."""
    rows = []
    for preset in presets:
        torch.manual_seed(0)
        ours = Transformer(ModelConfig.from_name(preset))
        theirs = hf_twin(ours)
        compiled_model = copy.deepcopy(ours)
        compiled = torch.compile(compiled_model)
        opts = {who: make_optimizer(m, TrainConfig(), torch.device("cpu")) for who, m in
                (("ours", ours), ("theirs", theirs), ("compiled", compiled_model))}
        T = ours.config.block_size
        x, y = (torch.randint(ours.config.vocab_size, (batch, T)) for _ in range(2))
        t = alternate({"ours eager": lambda: train_step(ours, opts["ours"], x, y, False),
                       "ours torch.compile": lambda: train_step(compiled, opts["compiled"], x, y, False),
                       "transformers eager": lambda: train_step(theirs, opts["theirs"], x, y, True)}, rounds)
        for p in ours.parameters():
            p.grad = torch.randn_like(p)
        steps = {}
        for kind in ("fused", "foreach", "for-loop"):
            flags = dict(fused=kind == "fused", foreach=kind == "foreach")
            steps[f"AdamW {kind}"] = (lambda o=torch.optim.AdamW(ours.parameters(), lr=1e-4, **flags): o.step())
        t_opt = alternate(steps, rounds)
        row = {"preset": preset, "batch": batch, "seq": T, "ms": {k: 1000 * v for k, v in t.items()},
               "optimizer_ms": {k: 1000 * v for k, v in t_opt.items()},
               "eager_vs_transformers": t["transformers eager"] / t["ours eager"],
               "compile_vs_transformers": t["transformers eager"] / t["ours torch.compile"],
               "compile_vs_eager": t["ours eager"] / t["ours torch.compile"],
               "fused_adamw_in_make_optimizer": bool(opts["ours"].defaults.get("fused"))}
        rows.append(row)
        print(f"training step | {preset} {batch}x{T} | " + ", ".join(f"{k} {v:.0f} ms" for k, v in row["ms"].items()))
        print(f"  ours eager / transformers x{row['eager_vs_transformers']:.2f}, compiled / transformers "
              f"x{row['compile_vs_transformers']:.2f}, compiled / eager x{row['compile_vs_eager']:.2f}; optimizer "
              "step alone: " + ", ".join(f"{k} {v:.1f} ms" for k, v in row["optimizer_ms"].items()))
    return rows


def argument_parser():
    p = Parser(__doc__)
    p.add_argument("--only", default="speculative,batched,quant", help="comma-separated sections: speculative, "
                   "batched, quant, train")
    p.add_argument("--target", default="", help="a trained target run (out_dir); default: random demo")
    p.add_argument("--draft", default="", help="a trained draft run (out_dir); default: random demo_draft")
    p.add_argument("--dataset", default="data/pydoc_bpe", help="prompts from its val.bin (random tokens if absent)")
    p.add_argument("--new_tokens", type=Number(int, 1), default=128, help="tokens generated per prompt")
    p.add_argument("--ks", default="2,3,4,5,6,7,8", help="k values (tokens drafted per target pass)")
    p.add_argument("--lookup_ks", default="", help="k values for prompt lookup (default: --ks)")
    p.add_argument("--batches", default="1,8,32", help="batch sizes of the batched section")
    p.add_argument("--rounds", type=Number(int, 1), default=3, help="timed rounds per contender")
    p.add_argument("--threads", type=Number(int, 0), default=0, help="torch threads (0: torch's default)")
    p.add_argument("--train_presets", default="debug,demo", help="presets of the train section")
    p.add_argument("--train_batch", type=Number(int, 1), default=8, help="sequences per training step")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for the smoke test")
    p.add_argument("--device", default="cpu", help="cpu or cuda (speculative and batched; fp32 on both)")
    p.add_argument("--out", default="out/bench_decode.json", help="the report")
    return p


def parse_args(argv):
    return argument_parser().parse_args(argv)


def main(argv=None):
    try:
        args = parse_args(argv)
    except ValueError as e:
        exit_with_error(e)
    sections = set(args.only.split(","))
    known = {"speculative", "batched", "quant", "train"}
    if sections - known:
        print(f"error: unknown section(s) {sorted(sections - known)}; choose from {', '.join(sorted(known))}",
              file=sys.stderr)
        sys.exit(1)
    if args.threads:
        torch.set_num_threads(args.threads)
    new = 8 if args.quick else args.new_tokens
    rounds = 1 if args.quick else args.rounds
    ks = [2, 4] if args.quick else [int(k) for k in args.ks.split(",")]
    try:
        device = resolve_device(args.device)
        if args.draft and "speculative" in sections:
            decode.check_draft_path(args.draft)  # before the target loads: names the command that makes the draft
    except ValueError as e:
        exit_with_error(e)
    if device.type != "cpu" and sections - {"speculative", "batched"}:
        print("error: on a GPU only the speculative and batched sections run (--only speculative,batched)",
              file=sys.stderr)
        sys.exit(1)
    target, target_name = load_or_random(args.target, "demo", args.quick, device)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "target": target_name,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "date": time.strftime("%Y-%m-%d"), "new_tokens": new}
    print(f"torch {torch.__version__}, {report['device']}, {torch.get_num_threads()} threads, target {target_name}")
    V = target.config.vocab_size
    if "speculative" in sections:
        torch.manual_seed(1)
        draft, draft_name = load_or_random(args.draft, "demo_draft", args.quick, device)
        report["draft"] = draft_name
        decode.check_draft(target, draft, 1)
        prompts = prompts_from_data(args.dataset if not args.quick else "", 2 if args.quick else 4, [32], V)
        lookup_ks = [int(k) for k in args.lookup_ks.split(",")] if args.lookup_ks else None
        report["speculative"] = bench_speculative(decode.for_decoding(target), decode.for_decoding(draft), prompts,
                                                  new, ks, rounds, lookup_ks)
        report["speculative"]["verify_cost"] = verify_cost(target, rounds=rounds)
    if "batched" in sections:
        batches = [1, 4] if args.quick else [int(b) for b in args.batches.split(",")]
        pool = prompts_from_data(args.dataset if not args.quick else "", max(batches), [8, 13, 21, 32, 17, 27], V)
        report["batched"] = bench_batched(decode.for_decoding(target), pool, new, batches, rounds)
    if "quant" in sections:
        c = target.config
        shape = (c.intermediate_size, c.n_embd)
        report["quant"] = bench_quant(target, 8 if args.quick else min(new, 32), rounds, shape)
    if "train" in sections:
        report["train"] = bench_train_step(["debug"] if args.quick else args.train_presets.split(","),
                                           4 if args.quick else args.train_batch, rounds)
    write_json(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
