"""Scaling laws in miniature (Kaplan et al., arXiv:2001.08361, section 3; Chinchilla):
five model sizes on the same tokens, loss against training compute C = 6 N D, and a
fitted power law L = a * C^(-alpha).

    python experiments/scaling_laws.py [--quick]

N counts the non-embedding parameters (Kaplan's convention), D the training tokens.
With D fixed the larger models are under-trained, so the curve bends at the top: a
classroom-size view of why Chinchilla scales N and D together. Writes
experiments/out/scaling_laws.{json,png}.
"""

import argparse
import os

import numpy as np
from common import OUT, plt, run, sizes, write

from model import ModelConfig, count_params  # noqa: E402

# (n_layer, n_embd, n_head): about 10k to 800k non-embedding parameters
MODELS = [(1, 32, 4), (2, 48, 4), (2, 64, 4), (3, 96, 8), (4, 128, 8)]
QUICK_MODELS = [(1, 16, 2), (1, 32, 4)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    s = sizes(args.quick)
    root = os.path.join(OUT, "scaling_laws" + ("_quick" if args.quick else ""))
    tokens = s["iters"] * s["batch"] * s["block_size"]
    rows = []
    for n_layer, n_embd, n_head in QUICK_MODELS if args.quick else MODELS:
        size = {**s, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head}
        # SwiGLU width 8/3 n_embd rounded to 32 (not Llama's 256, which would distort the small ones)
        h, _ = run(os.path.join(root, f"L{n_layer}_C{n_embd}"), size, "--multiple_of", 32)
        config = ModelConfig(vocab_size=128, block_size=s["block_size"], n_layer=n_layer, n_embd=n_embd,
                             n_head=n_head, n_kv_head=n_head, multiple_of=32)
        n = count_params(config) - 2 * config.vocab_size * n_embd  # non-embedding (embedding and head excluded)
        rows.append({"n_layer": n_layer, "n_embd": n_embd, "params_non_embedding": n, "tokens": tokens,
                     "compute": 6 * n * tokens, "val_loss": h["val_loss"][-1]})
        print(f"{n_layer} x {n_embd}: N = {n:,}, C = {6 * n * tokens:.2e} FLOPs, val loss {h['val_loss'][-1]:.4f}")
    C = np.array([r["compute"] for r in rows])
    L = np.array([r["val_loss"] for r in rows])
    slope, intercept = np.polyfit(np.log(C), np.log(L), 1)  # log L = log a - alpha log C
    fit = {"a": float(np.exp(intercept)), "alpha": float(-slope)}
    print(f"fit: L = {fit['a']:.3f} * C^({-fit['alpha']:.4f})")
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 4.2))
    ax.loglog(C, L, "o", label="trained models (same tokens)")
    grid = np.geomspace(C.min() / 2, C.max() * 2)
    ax.loglog(grid, fit["a"] * grid ** -fit["alpha"], "--", label=f"L = {fit['a']:.2f} C^({-fit['alpha']:.3f})")
    for r in rows:
        ax.annotate(f"{r['n_layer']}x{r['n_embd']}", (r["compute"], r["val_loss"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel="training compute C = 6 N D (FLOPs)", ylabel="validation loss (nats/char)",
           title=f"loss vs compute, D = {tokens:,} tokens")
    ax.legend()
    write("scaling_laws", args.quick, {"models": rows, "fit": fit}, fig)


if __name__ == "__main__":
    main()
