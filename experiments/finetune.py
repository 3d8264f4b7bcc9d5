"""Pretrain on Python's docs, fine-tune on Tiny Shakespeare: full, LoRA, prefix, QLoRA.

    python experiments/finetune.py            # about 8 minutes on a 2-core CPU
    python experiments/finetune.py --quick    # seconds: tiny sizes, a smoke test for CI

1. Pretrain a 4-layer, 256-wide GQA model on the pydoc corpus (BPE 4096), cached.
2. Tokenize Tiny Shakespeare with the SAME tokenizer (data.prepare --tokenizer_from).
3. Fine-tune it, the same number of steps each, through train.py's --peft: full
   fine-tuning; LoRA r = 1, 2, 4, 8, 64 on q,v and on all projections; prefix-tuning;
   QLoRA (NF4 + double-quantized base, LoRA r=8 on all). Val loss, trainable parameters,
   wall time, adapter bytes.
4. Merged vs unmerged latency; merge error when the base is stored in fp32, bf16, NF4;
   TinyLlama-1.1B fine-tuning memory from shapes (full, 16-bit LoRA, QLoRA).
Writes experiments/out/finetune.{json,png} (finetune_quick.* with --quick).
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from checkpoint import load_checkpoint, write_json  # noqa: E402
from common import OUT, quick_ending, save_figure  # noqa: E402
import hf  # noqa: E402
import peft  # noqa: E402
import plan  # noqa: E402
import train  # noqa: E402
from data.prepare import prepare  # noqa: E402
from model import ModelConfig, count_params  # noqa: E402
from runs import load_run  # noqa: E402

SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
FULL = dict(n_layer=4, n_embd=256, n_head=4, n_kv_head=2, block_size=64, vocab=4096, batch=8,
            pretrain_iters=400, finetune_iters=100, eval_iters=8, ranks=(1, 2, 4, 8, 64), repeats=20)
QUICK = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_size=32, vocab=300, batch=4,
             pretrain_iters=20, finetune_iters=6, eval_iters=2, ranks=(2,), repeats=3)
LR = {"full": 3e-4, "lora": 2e-3, "qlora": 2e-3, "prefix": 5e-3}  # per method, as the papers tune them


def datasets(s, tag, corpus):
    """(pydoc dataset dir, fine-tuning dataset dir with the pydoc tokenizer), prepared once."""
    pydoc = os.path.join(OUT, f"finetune{tag}", "data_pydoc")
    shakespeare = os.path.join(OUT, f"finetune{tag}", "data_shakespeare")
    if not os.path.exists(os.path.join(pydoc, "meta.json")):
        prepare("pydoc", "bpe", vocab_size=s["vocab"], out=pydoc, verbose=False)
    if not os.path.exists(os.path.join(shakespeare, "meta.json")):
        prepare(corpus, out=shakespeare, tokenizer_from=pydoc, verbose=False)
    return pydoc, shakespeare


def run_train(argv):
    """train.py in-process; returns (history, wall seconds)."""
    cfg, model_args, explicit = train.parse_args(argv)
    t0 = time.perf_counter()
    history = train.train(cfg, model_args, explicit)
    return history, time.perf_counter() - t0


def pretrain(s, data, out_dir):
    ckpt = os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(ckpt):  # cached, or cut short: continue it (resume is exact)
        if load_checkpoint(ckpt)["iter_num"] < s["pretrain_iters"]:
            run_train(["--out_dir", out_dir, "--resume"])
        return
    run_train(["--config", "demo", "--dataset", data, "--out_dir", out_dir, "--n_layer", str(s["n_layer"]),
               "--n_embd", str(s["n_embd"]), "--n_head", str(s["n_head"]), "--n_kv_head", str(s["n_kv_head"]),
               "--block_size", str(s["block_size"]), "--vocab_size", str(s["vocab"]),
               "--batch_size", str(s["batch"]), "--max_iters", str(s["pretrain_iters"]),
               "--eval_interval", str(s["pretrain_iters"] // 4), "--eval_iters", str(s["eval_iters"]),
               "--learning_rate", "2e-3", "--warmup_iters", str(s["pretrain_iters"] // 10), "--log_interval", "50"])


def finetune(s, name, method, extra, base, data, root):
    out_dir = os.path.join(root, name)
    cached = os.path.join(out_dir, "row.json")
    if os.path.exists(cached):  # a finished run (delete experiments/out/finetune to redo them all)
        with open(cached) as f:
            return json.load(f)
    n = s["finetune_iters"]
    lr = LR[method or "full"]
    history, wall = run_train(
        ["--config", "demo", "--init_from", base, "--dataset", data, "--out_dir", out_dir, "--max_iters", str(n),
         "--eval_interval", str(max(n // 3, 1)), "--eval_iters", str(s["eval_iters"]), "--batch_size", str(s["batch"]),
         "--learning_rate", str(lr), "--min_lr", str(lr / 10), "--warmup_iters", str(max(n // 10, 1)),
         "--weight_decay", "0", "--log_interval", str(max(n // 3, 1)), "--peft", method] + extra
        + (["--resume"] if os.path.exists(os.path.join(out_dir, "ckpt.pt")) else []))  # cut short: continue it
    ckpt = load_checkpoint(out_dir)
    config = ModelConfig.from_dict(ckpt["model_config"])
    trainable = sum(t.numel() for t in ckpt["model"].values()) if method else count_params(config)
    adapter = os.path.join(out_dir, "adapter")
    files = [os.path.join(adapter, f) for f in ("adapter_model.safetensors", "prefix.safetensors")]
    saved = [f for f in files if os.path.exists(f)]
    row = {"name": name, "method": method or "full", "trainable": trainable,
           "trainable_pct": 100 * trainable / count_params(config), "val_loss": history["val_loss"][-1],
           "val_curve": history["val_loss"], "eval_iter": history["eval_iter"], "wall_s": wall,
           "adapter_bytes": os.path.getsize(saved[0]) if saved else None}
    if method == "prefix":  # what is kept after folding: n_layer x (k, v) x n_kv_head x P x hd
        from safetensors.torch import load_file
        row["saved_params"] = load_file(saved[0])["prefix_kv"].numel()
        row["saved_pct"] = 100 * row["saved_params"] / count_params(config)
        row["prefix_len"] = int(extra[extra.index("--prefix_len") + 1])
    write_json(row, cached)
    print(f"== {name}: val {row['val_loss']:.4f} | trainable {trainable:,} ({row['trainable_pct']:.3f}%) | "
          f"{wall:.0f} s", flush=True)
    return row


def lora_model(base, adapter_dir):
    return hf.load_lora(base_model(base), adapter_dir).eval()


def base_model(base):
    return load_run(base)[0]


@torch.no_grad()
def latency(model, x, repeats):
    """Median seconds of one forward pass (after a warm-up)."""
    model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def merge_errors(base, adapter_dir, x):
    """How far merging moves the model when the base weight is stored in fp32, bf16 or NF4.

    weight: mean |W_merged - (W0 + dW)| / mean |dW| over the adapted layers (W0 as stored);
    logits: max |logits merged - logits unmerged| (computed in fp32 in every case)."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = lora_model(base, adapter_dir)
        num, den = 0.0, 0.0
        for m in peft.lora_layers(model):  # store W0 in dtype (computed in fp32)
            m.base.weight.copy_(m.base.weight.to(dtype).float())
        unmerged = model(x)[0]
        for m in peft.lora_layers(model):
            dw = m.delta_weight()
            exact = m.base.weight.double() + dw.double()
            merged = (m.base.weight.to(dtype) + dw.to(dtype)).float()  # the addition in the storage dtype
            num += (merged.double() - exact).abs().sum().item()
            den += dw.abs().sum().item()
            m.base.weight.copy_(merged)
            m.merged = True
        out[str(dtype).removeprefix("torch.")] = {"weight": num / den, "logits": (model(x)[0] - unmerged).abs().max().item()}
    import quant
    model = quant.quantize_model(base_model(base), "nf4-dq")
    hf.load_lora(model, adapter_dir)
    unmerged = model(x)[0]
    num, den = 0.0, 0.0
    for m in peft.lora_layers(model):
        w0, dw = m.base.dequantize().double(), m.delta_weight().double()
        num += (m.base.with_weight((w0 + dw).float()).dequantize().double() - (w0 + dw)).abs().sum().item()
        den += dw.abs().sum().item()
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.merge_lora(model)
    out["nf4"] = {"weight": num / den, "logits": (model(x)[0] - unmerged).abs().max().item(),
                  "warning": str(caught[0].message) if caught else None}
    return out


def memory_table():
    """TinyLlama-1.1B fine-tuning memory from shapes (bytes); activations left out."""
    config = ModelConfig.from_name("tinyllama_1b")
    est = plan.estimate_memory(config, batch_size=1, seq_len=256, lora_r=64, weight_bytes=2, base_bytes=2)
    parts = {"full fine-tuning (16-bit)": est["full"], "LoRA r=64 all (16-bit base)": est["lora"],
             "QLoRA r=64 all (NF4+DQ base)": est["qlora"]}
    def row(p):  # the plot's parts: the frozen (or full) base, adapters, gradients, AdamW; activations left out
        full = "base" not in p
        return {"base": p["weights"] if full else p["base"], "adapters": 0 if full else p["weights"],
                "gradients": p["gradients"], "optimizer": p["optimizer"], "total": p["total"] - p["activations"]}
    return {name: row(p) for name, p in parts.items()}


def plot(rows, base_val, memory, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    for method, label, style in (("lora_qv", "LoRA on q,v", "o-"), ("lora_all", "LoRA on all projections", "s-")):
        pts = [r for r in rows if r["name"].startswith(method + "_r") and "_lr" not in r["name"]]
        ax.plot([r["trainable"] for r in pts], [r["val_loss"] for r in pts], style, label=label)
        for r in pts:
            ax.annotate(f"r={r['name'].rsplit('_r', 1)[1]}", (r["trainable"], r["val_loss"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    for r in rows:
        if r["method"] == "full":
            ax.plot(r["trainable"], r["val_loss"], "k*", ms=12, label="full fine-tuning")
        if r["name"] == "prefix":
            ax.plot(r["saved_params"], r["val_loss"], "D", color="C3",
                    label=f"prefix-tuning P=10 (folded: {r['saved_pct']:.2f}% of params)")
        if r["name"].endswith("_lr1e-2"):
            ax.plot(r["trainable"], r["val_loss"], "o" if "_qv_" in r["name"] else "s", mfc="none", color="C2", ms=9,
                    label=f"{r['name'].rsplit('_', 1)[0].replace('_', ' ')}, lr 1e-2 (5x)")
        if r["method"] == "qlora":
            ax.plot(r["trainable"], r["val_loss"], "^", color="C4", ms=9, label="QLoRA (NF4 base, r=8 all)")
    prefixes = sorted((r for r in rows if r["method"] == "prefix"), key=lambda r: r["saved_params"])
    if len(prefixes) > 1:  # the prefix-length sweep
        ax.plot([r["saved_params"] for r in prefixes], [r["val_loss"] for r in prefixes], "d:", color="C3",
                label="prefix-tuning, P = " + ", ".join(str(r["prefix_len"]) for r in prefixes))
    ax.axhline(base_val, color="gray", ls="--", lw=1, label="pretrained, no fine-tuning")
    ax.set_xscale("log")
    ax.set_xlabel("trainable (saved) parameters")
    ax.set_ylabel("Tiny Shakespeare val loss (nats/token)")
    ax.set_title("Fine-tuning a pydoc-pretrained model on Shakespeare\n(same steps for every method)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)

    names = list(memory)
    bottom = [0.0] * len(names)
    for part in ("base", "adapters", "gradients", "optimizer"):
        vals = [memory[n][part] / 2 ** 30 for n in names]
        bx.bar(range(len(names)), vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, total in enumerate(bottom):
        bx.text(i, total, f"{total:.2f} GiB", ha="center", va="bottom", fontsize=8)
    bx.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
    bx.set_ylabel("GiB (weights, gradients, AdamW state; no activations)")
    bx.set_title("TinyLlama-1.1B fine-tuning memory, from shapes", fontsize=10)
    bx.legend(fontsize=8)
    fig.suptitle(f"python experiments/finetune.py{' --quick' if path.endswith('_quick.png') else ''}")
    save_figure(fig, path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (CI smoke test)")
    p.add_argument("--corpus", default=SHAKESPEARE if os.path.exists(SHAKESPEARE) else "shakespeare",
                   help="the fine-tuning text: ../shared/data/tinyshakespeare.txt when present, else Tiny "
                        "Shakespeare downloaded by data/prepare.py, or any text file")
    args = p.parse_args()
    s, tag = (QUICK, "_quick") if args.quick else (FULL, "")
    train.peak_flops = lambda device, dtype: None  # the FLOP/s probe only feeds the MFU log line
    torch.set_num_threads(1)  # on a CPU shared by several jobs, one thread is ~20x faster than two spinning
    torch.manual_seed(0)
    root = os.path.join(OUT, f"finetune{tag}")
    pydoc, shakespeare = datasets(s, tag, args.corpus)
    base = os.path.join(root, "base")
    t0 = time.perf_counter()
    pretrain(s, pydoc, base)
    print(f"pretrained base in {time.perf_counter() - t0:.0f} s (0 if cached)", flush=True)

    runs = [("full", "", [])]
    for where, targets in (("qv", "q,v"), ("all", "all")):
        runs += [(f"lora_{where}_r{r}", "lora", ["--lora_r", str(r), "--lora_alpha", str(2 * r),
                                                 "--lora_targets", targets]) for r in s["ranks"]]
    runs += [("prefix", "prefix", ["--prefix_len", "10", "--prefix_hidden", "512"]),
             ("qlora_r8", "qlora", ["--lora_r", "8", "--lora_alpha", "16"])]
    if not args.quick:  # the prefix length sweep (P = 10 is "prefix" above)
        runs += [(f"prefix_P{P}", "prefix", ["--prefix_len", str(P), "--prefix_hidden", "512"]) for P in (1, 3, 30)]
    if not args.quick:  # is LoRA held back by its learning rate? the same runs at 5x the rate
        runs += [(f"lora_{where}_r8_lr1e-2", "lora", ["--lora_r", "8", "--lora_alpha", "16", "--lora_targets", targets,
                                                      "--learning_rate", "1e-2", "--min_lr", "1e-3"])
                 for where, targets in (("qv", "q,v"), ("all", "all"))]
    rows = [finetune(s, name, method, extra, base, shakespeare, root) for name, method, extra in runs]
    base_val = rows[0]["val_curve"][0]  # evaluation at step 0: the pretrained model, zero-shot

    r8 = os.path.join(root, "lora_all_r8" if "lora_all_r8" in [r[0] for r in runs] else f"lora_all_r{s['ranks'][-1]}",
                      "adapter")
    x = torch.randint(0, s["vocab"], (s["batch"], s["block_size"]), generator=torch.Generator().manual_seed(0))
    plain, lora = base_model(base), lora_model(base, r8)
    timing = {"base": latency(plain, x, s["repeats"]), "lora unmerged": latency(lora, x, s["repeats"]),
              "lora merged": latency(peft.merge_lora(lora), x, s["repeats"])}
    errors = merge_errors(base, r8, x[:2])
    base_bytes = os.path.getsize(os.path.join(base, "ckpt.pt"))
    hf.save_llama(plain, os.path.join(root, "base_hf"))
    result = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}, "lr": LR,
              "base_val_loss": base_val, "runs": rows, "latency_s": timing, "merge_error": errors,
              "bytes": {"base_model_safetensors_fp32": os.path.getsize(os.path.join(root, "base_hf", "model.safetensors")),
                        "base_ckpt_pt_with_adamw": base_bytes,
                        "full_finetune_ckpt_pt": os.path.getsize(os.path.join(root, "full", "ckpt.pt"))},
              "tinyllama_memory_bytes": memory_table()}
    json_path = os.path.join(OUT, f"finetune{tag}.json")
    write_json(result, json_path)
    plot(rows, base_val, result["tinyllama_memory_bytes"], os.path.join(OUT, f"finetune{tag}.png"))

    print(f"\npretrained base, zero-shot val loss on Shakespeare: {base_val:.4f}")
    print(f"{'run':<16}{'val loss':>10}{'trainable':>12}{'%':>9}{'wall s':>8}{'adapter bytes':>15}")
    for r in rows:
        print(f"{r['name']:<16}{r['val_loss']:>10.4f}{r['trainable']:>12,}{r['trainable_pct']:>9.3f}"
              f"{r['wall_s']:>8.0f}{r['adapter_bytes'] or 0:>15,}")
    print("latency (s/forward):", {k: round(v, 5) for k, v in timing.items()})
    print("merge error:", json.dumps(errors, indent=1))
    print(f"wrote {json_path}")
    if args.quick:
        print(quick_ending())


if __name__ == "__main__":
    main()
