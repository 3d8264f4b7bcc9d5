"""PaLM's parallel block vs the serial (Llama) block (Chowdhery et al., arXiv:2204.02311,
section 2 "Parallel Layers"): speed and loss, and the MFU of each run.

    serial:    x = x + Attn(Norm1(x));  x = x + MLP(Norm2(x))
    parallel:  x = x + Attn(Norm(x)) + MLP(Norm(x))

    python experiments/parallel_block.py [--quick]

PaLM reports ~15% faster training at large scale (the two input matmuls fuse) and a small
quality cost at small scale that vanishes at 62B. Here both are trained with the same
data, steps and seed. Writes experiments/out/parallel_block.{json,png}.
"""

import argparse
import os

from common import OUT, plt, run, sizes, write

import plan  # noqa: E402
from checkpoint import load_checkpoint  # noqa: E402
from model import ModelConfig, flops_per_token  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    s = sizes(args.quick)
    root = os.path.join(OUT, "parallel_block" + ("_quick" if args.quick else ""))
    import torch
    peak = plan.peak_flops(torch.device("cpu"), torch.float32)
    results = {"peak_flops": peak}
    for name, flag in [("serial", "false"), ("parallel", "true")]:
        h, sec = run(os.path.join(root, name), s, "--parallel_block", flag, eval_every=max(s["iters"] // 8, 1))
        config = ModelConfig(**load_checkpoint(os.path.join(root, name))["model_config"])
        tokens = s["iters"] * s["batch"] * s["block_size"]
        step_seconds = h["step_seconds"]  # the optimizer steps only (train.py excludes evaluations)
        results[name] = {"val_loss": h["val_loss"][-1], "seconds": sec, "tok_s": tokens / step_seconds,
                         "mfu": flops_per_token(config, s["block_size"]) * tokens / step_seconds / peak,
                         "history": {k: h[k] for k in ("eval_iter", "val_loss")}}
        print(f"{name:8s}: val loss {h['val_loss'][-1]:.4f}, {tokens / step_seconds:,.0f} tokens/s "
              f"(MFU {100 * results[name]['mfu']:.0f}% of {peak / 1e9:.0f} GFLOP/s), {sec:.0f} s")
    results["speedup"] = results["parallel"]["tok_s"] / results["serial"]["tok_s"]
    print(f"parallel / serial: {results['speedup']:.2f}x the speed, "
          f"{results['parallel']['val_loss'] - results['serial']['val_loss']:+.4f} val loss")
    pyplot = plt()
    fig, (ax1, ax2) = pyplot.subplots(1, 2, figsize=(10, 4))
    for name in ("serial", "parallel"):
        ax1.plot(results[name]["history"]["eval_iter"], results[name]["history"]["val_loss"], "o-", label=name)
    ax1.set(xlabel="iteration (optimizer steps)", ylabel="validation loss (nats/token)",
            title="serial vs parallel block")
    ax1.legend()
    ax2.bar(["serial", "parallel"], [results[n]["tok_s"] for n in ("serial", "parallel")], color=["C0", "C1"])
    ax2.set(ylabel="training tokens/s (this CPU)", title=f"speed: parallel = {results['speedup']:.2f}x serial")
    write("parallel_block", args.quick, results, fig)


if __name__ == "__main__":
    main()
