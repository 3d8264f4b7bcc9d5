"""How much does 4-bit storage cost? QLoRA's Table 2 analogue on a small trained model.

    python experiments/quant_quality.py            # trains once (a few minutes), cached in experiments/out/
    python experiments/quant_quality.py --quick    # seconds: a tiny model, for CI

Trains a 4-layer x 256-wide char-level model on pydoc_char with train.py's own loop,
then measures validation loss / perplexity with the blocks' linear layers stored as
fp32, int8 (per-row absmax; also W8A8), NF4, NF4 + double quantization, plain int4
(blockwise absmax, 15 uniform levels) and fp4 (E2M1 levels), all 4-bit formats with
blocksize 64. Also: the distribution of the quantization error per format on N(0, 1)
weights and on the trained weights, and the NF4-vs-int4 error ratio (QLoRA section 3:
NF4 is information-theoretically optimal for normal weights).
Writes experiments/out/quant_quality.{png,json} (quant_quality_quick.* with --quick).
"""

import argparse
import copy
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from checkpoint import load_checkpoint, write_json  # noqa: E402
from common import OUT, quick_ending, save_figure  # noqa: E402
import quant  # noqa: E402
from runs import load_run  # noqa: E402
from data.dataset import Mixture  # noqa: E402
from train import TrainConfig, get_batch, load_dataset, train  # noqa: E402

CODEBOOKS = {"nf4": quant.NF4_LEVELS, "int4": quant.INT4_LEVELS, "fp4": quant.FP4_LEVELS}
FULL = dict(model=dict(n_layer=4, n_embd=256, n_head=8, n_kv_head=4, block_size=128),
            train=dict(batch_size=8, max_iters=400, learning_rate=2e-3, min_lr=2e-4, warmup_iters=30,
                       eval_interval=100, eval_iters=10, log_interval=50), eval_batches=40)
QUICK = dict(model=dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_size=32),
             train=dict(batch_size=4, max_iters=10, learning_rate=3e-3, min_lr=3e-4, warmup_iters=2,
                        eval_interval=10, eval_iters=1, log_interval=10), eval_batches=2)


def trained_model(setup, dataset, out_dir):
    """Train once; later runs reuse out_dir/ckpt.pt when it holds this exact setup."""
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    cfg = TrainConfig(model="debug", dataset=dataset, out_dir=out_dir, **setup["train"])
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        same = all(ckpt["model_config"][k] == v for k, v in setup["model"].items()) and ckpt["iter_num"] == cfg.max_iters
        if not same:
            print(f"{ckpt_path} is from another setup: training again")
    if not os.path.exists(ckpt_path) or not same:
        meta = load_dataset(dataset)
        train(cfg, {**setup["model"], "vocab_size": meta["vocab_size"]})
    return load_run(os.path.dirname(ckpt_path))[0]


@torch.no_grad()
def val_loss(model, dataset, n_batches, batch_size=16):
    """Mean cross-entropy over the same n_batches validation batches for every format."""
    sampler = Mixture.from_spec(dataset, "val", model.config.block_size, seed=0)
    losses = [model(*get_batch(sampler.draw(batch_size), torch.device("cpu")))[1] for _ in range(n_batches)]
    return torch.stack(losses).mean().item()


def fake_quantized(model, levels, blocksize=64):
    """A copy whose block linear weights went through a 4-bit codebook and back (int4, fp4)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.layers.named_parameters():
            if p.dim() == 2:
                packed, absmax = quant.quantize_blockwise(p, levels, blocksize)
                p.copy_(quant.dequantize_blockwise(packed, absmax, levels, blocksize, p.shape))
    return model


def int8_w8a8(model):
    model = copy.deepcopy(model)
    quant.replace_linears(model.layers, lambda lin: quant.Int8Linear.from_linear(lin, quantize_activations=True))
    return model


def round_trip(w, fmt):
    """w -> the same tensor after quantizing with `fmt` and dequantizing."""
    if fmt == "int8":
        return quant.absmax_dequantize(*quant.absmax_quantize(w, bits=8, dim=1))
    if fmt == "nf4-dq":
        return quant.dequantize_nf4(quant.quantize_nf4(w, 64, double_quant=True))
    packed, absmax = quant.quantize_blockwise(w, CODEBOOKS[fmt], 64)
    return quant.dequantize_blockwise(packed, absmax, CODEBOOKS[fmt], 64, w.shape)


def error_stats(w, formats):
    errors = {fmt: (round_trip(w, fmt) - w).flatten() for fmt in formats}
    stats = {fmt: dict(mae=e.abs().mean().item(), rmse=e.pow(2).mean().sqrt().item()) for fmt, e in errors.items()}
    return errors, stats


def plot(errors_normal, errors_trained, table, path, title, normal_shape):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, errors, name in ((axes[0], errors_normal, f"N(0, 1) weights ({normal_shape[0]} x {normal_shape[1]})"),
                              (axes[1], errors_trained, "trained model's block weights")):
        lim = max(e.abs().max().item() for fmt, e in errors.items() if fmt != "int8")
        for fmt, e in errors.items():
            ax.hist(e.numpy(), bins=200, range=(-lim, lim), histtype="step", lw=1.2,
                    label=f"{fmt}: mean |err| {e.abs().mean():.2e}")
        ax.set_yscale("log")
        ax.set_xlabel("quantization error w_hat - w (weight units)")
        ax.set_ylabel("count of weights (log scale)")
        ax.set_title(name)
        ax.legend(fontsize=7, loc="upper left")
    # what each format costs: the validation loss it adds to fp32's, from 0 (a bar's height is the cost)
    names = list(table)
    added = [table[n]["val_loss"] - table["fp32"]["val_loss"] for n in names]
    bars = axes[2].bar(names, added, color=["gray"] + ["C0"] * (len(names) - 1))
    axes[2].bar_label(bars, labels=[f"{a:+.1e}" for a in added], fontsize=8)
    axes[2].axhline(0, color="black", lw=0.8)
    span = max(abs(a) for a in added) or 1e-6
    axes[2].set_ylim(min(0, *added) - 0.15 * span, max(0, *added) + 0.15 * span)  # 0 always in view
    axes[2].set_ylabel("validation loss - fp32's (nats/token)")
    axes[2].set_title(f"added loss, blocks' linears quantized (fp32: {table['fp32']['val_loss']:.4f})")
    axes[2].tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    save_figure(fig, path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, a few seconds (CI)")
    p.add_argument("--dataset", default="pydoc_char")
    p.add_argument("--out", default=OUT)
    args = p.parse_args()
    setup = QUICK if args.quick else FULL
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    model = trained_model(setup, args.dataset, os.path.join(args.out, "quant_quality_quick_model" if args.quick
                                                            else "quant_quality_model"))
    load_dataset(args.dataset)  # prepared on first use

    variants = {"fp32": lambda: model,
                "int8": lambda: quant.quantize_model(copy.deepcopy(model), "int8"),
                "int8 W8A8": lambda: int8_w8a8(model),
                "nf4": lambda: quant.quantize_model(copy.deepcopy(model), "nf4"),
                "nf4-dq": lambda: quant.quantize_model(copy.deepcopy(model), "nf4-dq"),
                "int4": lambda: fake_quantized(model, quant.INT4_LEVELS),
                "fp4": lambda: fake_quantized(model, quant.FP4_LEVELS)}
    bits = {"fp32": 32, "int8": 8 + 32 / model.config.n_embd, "int8 W8A8": 8 + 32 / model.config.n_embd,
            "nf4": 4.5, "int4": 4.5, "fp4": 4.5,
            "nf4-dq": quant.bits_per_param(quant.quantize_nf4(model.layers[0].feed_forward.w1.weight))}
    table = {}
    for name, make in variants.items():
        loss = val_loss(make(), args.dataset, setup["eval_batches"])
        table[name] = dict(val_loss=loss, ppl=math.exp(loss), bits_per_param=bits[name])
        print(f"{name:>10}: val loss {loss:.4f} | ppl {math.exp(loss):.4f} | ~{bits[name]:.3f} bits/param (w1)")

    formats = ["int8", "nf4", "nf4-dq", "int4", "fp4"]
    torch.manual_seed(0)
    normal = torch.randn(256, 256) if args.quick else torch.randn(1024, 1024)
    errors_normal, stats_normal = error_stats(normal, formats)
    trained = [p.detach() for p in model.layers.parameters() if p.dim() == 2]
    errors_trained = {f: torch.cat([(round_trip(w, f) - w).flatten() for w in trained]) for f in formats}
    stats_trained = {f: dict(mae=e.abs().mean().item(), rmse=e.pow(2).mean().sqrt().item())
                     for f, e in errors_trained.items()}
    ratio = {where: {k: s["int4"][k] / s["nf4"][k] for k in ("mae", "rmse")} | {
             "fp4_over_nf4_mae": s["fp4"]["mae"] / s["nf4"]["mae"]}
             for where, s in (("normal", stats_normal), ("trained", stats_trained))}
    print(f"int4 / nf4 error: N(0,1) mae {ratio['normal']['mae']:.3f} rmse {ratio['normal']['rmse']:.3f} | "
          f"trained mae {ratio['trained']['mae']:.3f} rmse {ratio['trained']['rmse']:.3f}")

    name = "quant_quality" + ("_quick" if args.quick else "")  # a quick run never overwrites the full one
    c = model.config
    plot(errors_normal, errors_trained, table, os.path.join(args.out, name + ".png"),
         f"quant_quality.py{' --quick' if args.quick else ''}: {c.n_layer} x {c.n_embd} char model, "
         f"{setup['train']['max_iters']} steps, stored in each format", tuple(normal.shape))
    result = dict(quick=args.quick, model=model.config.to_dict(), train=setup["train"], table=table,
                  error_normal=stats_normal, error_trained=stats_trained, int4_over_nf4=ratio)
    path = os.path.join(args.out, name + ".json")
    write_json(result, path)
    print(f"wrote {path} and {name}.png")
    if args.quick:
        print(quick_ending())


if __name__ == "__main__":
    main()
