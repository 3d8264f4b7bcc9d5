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
    s = sizes(quick)
    out_dir = os.path.join(OUT, "gqa_uptrain", "mha")
    if quick or not os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        out_dir = os.path.join(OUT, "visualize" + ("_quick" if quick else ""), "base")
        run(out_dir, s)
    model, tokenizer, _ = load_run(out_dir)
    for layer in model.layers:  # the explicit softmax path, which can keep its attention weights
        layer.attention.attn_impl = "math"
    return model, tokenizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--prompt", default="def read(self, size=-1):\n    return self.buffer.read(size)")
    args = p.parse_args()
    model, tok = trained_model(args.quick)
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
    fig, axes = pyplot.subplots(2, max(n, 2), figsize=(3.2 * max(n, 2), 6.4))
    labels = [repr(tok.decode([i]))[1:-1] for i in ids]
    for k, (w, h) in enumerate(zip(maps, picks)):
        ax = axes[0, k]
        ax.imshow(w[h].numpy(), cmap="viridis")
        ax.set_title(f"layer {k}, head {h}", fontsize=9)
        step = max(T // 16, 1)
        ax.set_xticks(range(0, T, step), labels[::step], fontsize=6, rotation=90)
        ax.set_yticks(range(0, T, step), labels[::step], fontsize=6)
    for ax in axes[0, n:]:
        ax.axis("off")
    c = model.config
    cos, _ = rope_cache(c.head_dim, 256, c.rope_theta)
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
    axes[1, 0].semilogy(inv_freq.numpy(), "o-")
    axes[1, 0].set(xlabel="pair i", ylabel="theta_i (radians per position)", title=f"RoPE, theta={c.rope_theta:g}")
    axes[1, 1].imshow(cos[:, :c.head_dim // 2].T.numpy(), aspect="auto", cmap="RdBu")
    axes[1, 1].set(xlabel="position m", ylabel="pair i", title="cos(m theta_i)")
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
        axes[1, 2 + k].set(xlabel="iteration", ylabel="learning rate", title=f"get_lr, preset {name}")
        axes[1, 2 + k].ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    results = {"prompt": args.prompt, "heads_shown": picks, "rope_theta": c.rope_theta,
               "rope_inv_freq": inv_freq.tolist(), "schedules": schedules,
               "mean_attention_distance": [float((w * distance.clamp(min=0)).sum((-1, -2)).mean() / T) for w in maps]}
    write("visualize", args.quick, results, fig)


if __name__ == "__main__":
    main()
