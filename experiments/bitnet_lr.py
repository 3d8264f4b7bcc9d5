"""BitNet's learning-rate claim, and what b1.58 storage really saves.

    python experiments/bitnet_lr.py            # a few minutes on a CPU
    python experiments/bitnet_lr.py --quick    # seconds, for CI

BitNet (arXiv:2310.11453) section 2.2: 1-bit weights change only when the latent
weight crosses the mean, so small updates do nothing; BitNet trains better with a large
learning rate and stays stable where the FP16 Transformer diverges. Here the `debug`
model (2 layers x 64, char-level pydoc) trains with train.py's loop at several peak
learning rates as an fp32 model, a BitNet model (binary weights) and a BitNet b1.58
model (ternary weights), and the loss curves are compared.

Then the memory note: fake-quantized training keeps fp32 latent weights, their
gradients and AdamW's two moments (16 bytes per parameter, as the fp model); the saving
exists only when the ternary weights are packed for inference: 2 bits per weight.
Writes experiments/out/bitnet_lr.{png,json} (bitnet_lr_quick.* with --quick).
"""

import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from checkpoint import write_json  # noqa: E402
from common import OUT, quick_ending, save_figure  # noqa: E402
import quant  # noqa: E402
from runs import load_run  # noqa: E402
from train import TrainConfig, load_dataset, train  # noqa: E402

VARIANTS = {"fp32": {}, "BitNet (binary)": {"bitlinear": True},
            "BitNet b1.58 (ternary)": {"bitlinear": True, "bitlinear_ternary": True}}
FULL = dict(lrs=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1], iters=300, batch_size=16, eval_iters=10)
QUICK = dict(lrs=[1e-2], iters=5, batch_size=4, eval_iters=1)


def run(variant, lr, setup, dataset, out_dir, vocab_size):
    """Train the debug model; returns its loss curve and final validation loss (nan if it diverged)."""
    cfg = TrainConfig(model="debug", dataset=dataset, out_dir=out_dir, batch_size=setup["batch_size"],
                      max_iters=setup["iters"], learning_rate=lr, min_lr=lr / 10, warmup_iters=setup["iters"] // 10,
                      eval_interval=setup["iters"], eval_iters=setup["eval_iters"], log_interval=10 ** 9)
    try:
        history = train(cfg, {**VARIANTS[variant], "vocab_size": vocab_size})
        return dict(train_loss=history["train_loss"], val_loss=history["val_loss"][-1], diverged=False)
    except FloatingPointError as e:
        print(f"{variant} lr {lr:g}: {e}")
        return dict(train_loss=[], val_loss=float("nan"), diverged=True)


def packing_report(model):
    """Bytes of the blocks' BitLinear weights: fp32 latent, bf16, and packed 2-bit + one fp32 beta per group."""
    rows = []
    for name, m in model.layers.named_modules():
        if isinstance(m, quant.BitLinear):
            w_t, beta = m.quantized_weight()
            packed = quant.pack_ternary(w_t)
            assert torch.equal(quant.unpack_ternary(packed, w_t.shape), w_t)  # lossless
            rows.append(dict(name=name, shape=list(w_t.shape), fp32=4 * w_t.numel(), bf16=2 * w_t.numel(),
                             packed=packed.numel() + 4 * beta.numel(), zeros=(w_t == 0).float().mean().item()))
    totals = {k: sum(r[k] for r in rows) for k in ("fp32", "bf16", "packed")}
    numel = totals["fp32"] // 4
    totals["bits_per_param"] = 8 * totals["packed"] / numel
    totals["training_bytes_per_param"] = 16  # fp32 weight + gradient + AdamW's exp_avg and exp_avg_sq
    return rows, totals


def smooth(xs, k=10):
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def plot(results, lrs, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(lrs) + 1
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    axes = axes.flatten()
    for ax, lr in zip(axes, lrs):
        for i, variant in enumerate(VARIANTS):
            r = results[variant][str(lr)]
            label = variant + (" (diverged)" if r["diverged"] else "")
            ax.plot(smooth(r["train_loss"]), color=f"C{i}", lw=1.2, label=label)
        ax.set_title(f"peak lr {lr:g}")
        ax.set_xlabel("iteration (optimizer steps)")
        ax.set_ylabel("train loss, 10-step mean (nats/token)")
        ax.set_ylim(1.0, 5.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[len(lrs)]
    for i, variant in enumerate(VARIANTS):
        ax.plot(lrs, [results[variant][str(lr)]["val_loss"] for lr in lrs], "o-", color=f"C{i}", label=variant)
    ax.set_xscale("log")
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], minor=False)
    ax.set_xticks([], minor=True)
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("final validation loss vs learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle(title)
    save_figure(fig, path, dpi=100)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one learning rate, a few steps (CI)")
    p.add_argument("--dataset", default="pydoc_char")
    p.add_argument("--out", default=OUT)
    args = p.parse_args()
    setup = QUICK if args.quick else FULL
    meta = load_dataset(args.dataset)
    name = "bitnet_lr" + ("_quick" if args.quick else "")  # a quick run never overwrites the full one
    runs_dir = os.path.join(args.out, name + "_runs")
    results = {v: {} for v in VARIANTS}
    for variant in VARIANTS:
        for lr in setup["lrs"]:
            out_dir = os.path.join(runs_dir, f"{variant.split()[0]}{'_t' if 'ternary' in variant else ''}_{lr:g}")
            results[variant][str(lr)] = run(variant, lr, setup, args.dataset, out_dir, meta["vocab_size"])
            print(f"{variant:>24} lr {lr:<6g} final val loss {results[variant][str(lr)]['val_loss']:.4f}")

    # the b1.58 model at its best learning rate: pack its ternary weights
    t = "BitNet b1.58 (ternary)"
    best = min(setup["lrs"], key=lambda lr: (math.isnan(results[t][str(lr)]["val_loss"]), results[t][str(lr)]["val_loss"]))
    model = load_run(os.path.join(runs_dir, f"BitNet_t_{best:g}"))[0]
    rows, totals = packing_report(model)
    print(f"b1.58 (lr {best:g}) block weights: fp32 {totals['fp32']:,} B | bf16 {totals['bf16']:,} B | "
          f"packed 2-bit {totals['packed']:,} B ({totals['bits_per_param']:.3f} bits/param); "
          f"training holds {totals['training_bytes_per_param']} B/param either way")

    plot(results, setup["lrs"], os.path.join(args.out, name + ".png"),
         f"bitnet_lr.py{' --quick' if args.quick else ''}: fp32 / BitNet / b1.58, debug model (2 x 64), "
         f"{setup['iters']} steps per rate")
    path = os.path.join(args.out, name + ".json")
    write_json(dict(quick=args.quick, setup=setup, results=results, packing=dict(lr=best, rows=rows, totals=totals)),
               path)
    print(f"wrote {path} and {name}.png")
    if args.quick:
        print(quick_ending())


if __name__ == "__main__":
    main()
