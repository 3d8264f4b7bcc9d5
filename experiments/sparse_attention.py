"""Sparse attention (Child et al., arXiv:1904.10509, section 4.2; GPT-3 section 2.1):
each query reads a local band plus strided columns instead of every earlier position.

    python experiments/sparse_attention.py [--quick]

Trains the same char-level model dense and with the strided + local pattern of
attention.sparse_causal_mask (sparse_local = sparse_stride = sqrt(block_size), the
paper's choice, so each query reads about 2 sqrt(T) keys), and plots the mask and both
loss curves. On this small context the saving is in the attention scores only; the
paper's point is the O(T sqrt T) cost at long contexts. Writes
experiments/out/sparse_attention.{json,png}.
"""

import argparse
import math
import os

from common import OUT, plt, run, sizes, write

from attention import causal_mask, sparse_causal_mask  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    s = sizes(args.quick)
    root = os.path.join(OUT, "sparse_attention" + ("_quick" if args.quick else ""))
    T = s["block_size"]
    band = int(math.isqrt(T))
    mask = sparse_causal_mask(T, T, band, band)
    density = mask.sum().item() / causal_mask(T, T).sum().item()
    results = {"block_size": T, "sparse_local": band, "sparse_stride": band, "density_vs_causal": density}
    print(f"mask: local {band}, stride {band}: {100 * density:.0f}% of the causal mask's entries")
    for name, extra in [("dense", []), ("sparse", ["--sparse_local", band, "--sparse_stride", band])]:
        h, _ = run(os.path.join(root, name), s, *extra, eval_every=max(s["iters"] // 8, 1))
        results[name] = {"val_loss": h["val_loss"][-1], "step_seconds": h["step_seconds"],
                         "history": {k: h[k] for k in ("eval_iter", "val_loss")}}
        print(f"{name:6s}: val loss {h['val_loss'][-1]:.4f} ({h['step_seconds']:.0f} s of steps)")
    pyplot = plt()
    fig, (ax1, ax2) = pyplot.subplots(1, 2, figsize=(10, 4.2))
    shown = min(T, 64)
    im = ax1.imshow(mask[:shown, :shown].float().numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax1, ticks=[0, 1], label="1: query i reads key j, 0: masked")
    ax1.set(xlabel="key position j", ylabel="query position i",
            title=f"strided + local mask (local {band}, stride {band}), first {shown} positions")
    for name in ("dense", "sparse"):
        ax2.plot(results[name]["history"]["eval_iter"], results[name]["history"]["val_loss"], "o-",
                 label=f"{name}: {results[name]['val_loss']:.3f}")
    ax2.set(xlabel="iteration (optimizer steps)", ylabel="validation loss (nats/token)",
            title=f"sparse reads {100 * density:.0f}% of the causal entries")
    ax2.legend()
    write("sparse_attention", args.quick, results, fig)


if __name__ == "__main__":
    main()
