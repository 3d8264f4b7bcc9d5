"""Three pictures to read next to the papers: attention patterns of a trained model,
RoPE's frequencies, and the learning-rate schedule.

    python experiments/visualize.py [--quick] [--prompt TEXT]

1. Attention (Vaswani et al. 3.2): the explicit path (attn_impl="math") keeps each
   layer's softmax(QK^T / sqrt(d)) weights; one head per layer for a prompt.
2. RoPE (RoFormer 3.4, eq. 34): theta_i = rope_theta^(-2i/d) from fast to slow, and
   cos(m theta_i) over positions m: the low pairs turn many times, the high ones barely.
3. The schedule of train.get_lr (linear warmup, cosine to min_lr) for the presets.
Uses the MHA model of gqa_uptrain.py when it exists, else trains a small one. Writes
experiments/out/visualize.{json,png}.
"""

import argparse
import os

from common import OUT, plt, run, sizes, write

import torch  # noqa: E402

import train  # noqa: E402
from attention import rope_cache  # noqa: E402
from runs import load_run  # noqa: E402


def trained_model(quick):
    """(model, tokenizer, the name of its run)."""
    s = sizes(quick)
    out_dir = os.path.join(OUT, "gqa_uptrain", "mha")
    name = "gqa_uptrain.py's MHA model"
    if quick or not os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        out_dir = os.path.join(OUT, "visualize" + ("_quick" if quick else ""), "base")
        name = "its own model"
        run(out_dir, s)
    model, tokenizer, _ = load_run(out_dir)
    for layer in model.layers:  # the explicit softmax path, which can keep its attention weights
        layer.attention.attn_impl = "math"
    c = model.config
    return model, tokenizer, f"{name}, {c.n_layer} x {c.n_embd}, {s['iters']} steps on characters"


def shown(character):
    """A character as a tick label: space and newline made visible."""
    return {" ": "\u2423", "\n": "\\n", "\t": "\\t"}.get(character, character)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--prompt", default="def read(self, size=-1):\n    return self.buffer.read(size)")
    args = p.parse_args()
    model, tok, run_name = trained_model(args.quick)
    ids = tok.encode(args.prompt)[:model.config.block_size]
    for layer in model.layers:
        layer.attention.save_weights = True
    with torch.no_grad():
        model(torch.tensor([ids]))
    maps = [layer.attention.weights[0] for layer in model.layers]  # (n_head, T, T) each
    # the head of each layer that looks furthest back on average (the most interesting to see)
    T = len(ids)
    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    picks = [int((w * distance.clamp(min=0)).sum((-1, -2)).argmax()) for w in maps]

    pyplot = plt()
    n = len(maps)
    cols = max(n, 4)
    fig, axes = pyplot.subplots(2, cols, figsize=(4.8 * cols, 9.6), gridspec_kw={"height_ratios": [1.35, 1]})
    labels = [shown(tok.decode([i])) for i in ids]
    step = 1 if T <= 64 else -(-T // 64)  # every character up to 64 of them
    for k, (w, h) in enumerate(zip(maps, picks)):
        ax = axes[0, k]
        im = ax.imshow(w[h].numpy(), cmap="viridis", vmin=0, vmax=1)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention weight (each row sums to 1)")
        ax.set_title(f"layer {k}, head {h} (of {model.config.n_head})", fontsize=9)
        ax.set_xticks(range(0, T, step), labels[::step], fontsize=5, rotation=90)
        ax.set_yticks(range(0, T, step), labels[::step], fontsize=5)
        ax.set(xlabel="key: the character attended to", ylabel="query: the character attending")
    for ax in axes[0, n:]:
        ax.axis("off")
    c = model.config
    cos, _ = rope_cache(c.head_dim, 256, c.rope_theta)
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
    axes[1, 0].semilogy(inv_freq.numpy(), "o-")
    axes[1, 0].set(xlabel="pair i", ylabel="theta_i (radians per position)", title=f"RoPE, theta={c.rope_theta:g}")
    im = axes[1, 1].imshow(cos[:, :c.head_dim // 2].T.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    fig.colorbar(im, ax=axes[1, 1], label="cos(m theta_i)")
    axes[1, 1].set(xlabel="position m (tokens)", ylabel="pair i", title="RoPE: cos(m theta_i)")
    schedules = {}
    for k, name in enumerate(["demo", "tinyllama_1b"]):
        if 2 + k >= axes.shape[1]:
            break
        cfg = train.CONFIGS[name]
        steps = list(range(0, cfg.max_iters, max(cfg.max_iters // 400, 1)))
        lrs = [train.get_lr(i, cfg) for i in steps]
        schedules[name] = {"warmup_iters": cfg.warmup_iters, "max_iters": cfg.max_iters,
                           "learning_rate": cfg.learning_rate, "min_lr": cfg.min_lr}
        axes[1, 2 + k].plot(steps, lrs)
        axes[1, 2 + k].set(xlabel="iteration (optimizer steps)", ylabel="learning rate",
                           title=f"train.get_lr, config {name}")
        axes[1, 2 + k].ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    fig.suptitle(f"visualize.py{' --quick' if args.quick else ''}: {run_name}; the head of each layer that "
                 f"looks furthest back, on the prompt {args.prompt[:40]!r}...")
    results = {"model": run_name, "prompt": args.prompt, "heads_shown": picks, "rope_theta": c.rope_theta,
               "rope_inv_freq": inv_freq.tolist(), "schedules": schedules,
               "mean_attention_distance": [float((w * distance.clamp(min=0)).sum((-1, -2)).mean() / T) for w in maps]}
    write("visualize", args.quick, results, fig)


if __name__ == "__main__":
    main()
