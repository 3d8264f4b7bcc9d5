"""GQA uptraining in miniature (Ainslie et al., arXiv:2305.13245, section 2, Figure 6).

    python experiments/gqa_uptrain.py            # a few minutes on a CPU
    python experiments/gqa_uptrain.py --quick    # seconds (smoke test)

1. Pretrain a multi-head (MHA, 8 kv heads) char-level model on the pydoc corpus.
2. Convert it to GQA-4, GQA-2 and MQA by pooling kv heads (mean / first / random),
   through `train.py --init_from MHA --n_kv_head G --kv_init METHOD`, and uptrain for 5%
   of the pretraining steps. Validation loss before and after.
3. Compare with the MHA model and with GQA-2 / MQA trained from scratch for as long.
4. KV-cache bytes per token and greedy decoding tokens/s for each n_kv_head.
Writes experiments/out/gqa_uptrain.{json,png}.
"""

import argparse
import os
import time

from common import OUT, plt, run, sizes, write

import torch  # noqa: E402

from runs import load_run  # noqa: E402


def load(out_dir):
    return load_run(out_dir)[0]


def decode_speed(model, new_tokens):
    idx = torch.zeros(1, 1, dtype=torch.long)
    model.generate(idx, 4, temperature=0)  # warm up
    t0 = time.perf_counter()
    model.generate(idx, new_tokens, temperature=0)
    return new_tokens / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--uptrain_frac", type=float, default=0.05, help="uptraining steps as a fraction of pretraining "
                   "(the paper's 5%%); other values write gqa_uptrain_<frac>.{json,png}")
    args = p.parse_args()
    s = sizes(args.quick)
    suffix = "" if args.uptrain_frac == 0.05 else f"_{args.uptrain_frac:g}"  # keeps the 5% runs apart
    root = os.path.join(OUT, "gqa_uptrain" + ("_quick" if args.quick else ""))
    up_iters = max(round(s["iters"] * args.uptrain_frac), 1)
    mha_dir = os.path.join(root, "mha")
    mha, _ = run(mha_dir, s)
    results = {"mha": {"val_loss": mha["val_loss"][-1]}, "uptrain_iters": up_iters, "pretrain_iters": s["iters"],
               "converted": [], "scratch": [], "decode": []}
    print(f"MHA: val loss {mha['val_loss'][-1]:.4f}")
    kv_options = [g for g in (s["n_head"] // 2, 2, 1) if g < s["n_head"]]
    for n_kv in sorted(set(kv_options), reverse=True):
        for method in ("mean", "first", "random"):
            h, sec = run(os.path.join(root, f"kv{n_kv}_{method}{suffix}"), s, "--init_from", mha_dir, "--n_kv_head", n_kv,
                         "--kv_init", method, "--learning_rate", "1e-3", "--warmup_iters", max(up_iters // 10, 1),
                         iters=up_iters)
            row = {"n_kv_head": n_kv, "method": method, "before": h["val_loss"][0], "after": h["val_loss"][-1],
                   "seconds": sec}
            results["converted"].append(row)
            print(f"GQA-{n_kv} by {method:6s}: val loss {row['before']:.4f} at conversion -> {row['after']:.4f} "
                  f"after {up_iters} steps")
        h, sec = run(os.path.join(root, f"kv{n_kv}_scratch"), s, "--n_kv_head", n_kv)
        results["scratch"].append({"n_kv_head": n_kv, "val_loss": h["val_loss"][-1], "seconds": sec})
        print(f"GQA-{n_kv} from scratch ({s['iters']} steps): val loss {h['val_loss'][-1]:.4f}")
    new_tokens = 16 if args.quick else 200
    mean_dirs = [(r["n_kv_head"], os.path.join(root, f"kv{r['n_kv_head']}_mean{suffix}"))
                 for r in results["converted"] if r["method"] == "mean"]
    for n_kv, out_dir in [(s["n_head"], mha_dir)] + mean_dirs:
        model = load(out_dir)
        caches = model.new_kv_caches(1)
        row = {"n_kv_head": n_kv, "kv_bytes_per_token": sum(c.nbytes for c in caches) // model.config.block_size,
               "decode_tok_s": decode_speed(model, new_tokens)}
        results["decode"].append(row)
        print(f"n_kv_head {n_kv}: KV cache {row['kv_bytes_per_token']:,} bytes/token, greedy decoding "
              f"{row['decode_tok_s']:,.0f} tokens/s")

    pyplot = plt()
    fig, (ax1, ax2) = pyplot.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    colors = {"mean": "C0", "first": "C1", "random": "C2"}
    for method in colors:
        rows = [r for r in results["converted"] if r["method"] == method]
        ax1.plot([r["n_kv_head"] for r in rows], [r["after"] for r in rows], "o-", color=colors[method],
                 label=f"{method} + {up_iters} steps uptraining")
        ax1.plot([r["n_kv_head"] for r in rows], [r["before"] for r in rows], "x:", color=colors[method], alpha=0.6,
                 label=f"{method}, at conversion")
    ax1.plot([r["n_kv_head"] for r in results["scratch"]], [r["val_loss"] for r in results["scratch"]], "s--",
             color="k", label=f"from scratch ({s['iters']} steps)")
    ax1.axhline(results["mha"]["val_loss"], color="gray", label="MHA (the starting point)")
    ax1.set_xscale("log", base=2)
    ax1.minorticks_off()
    ax1.set(xlabel="n_kv_head", ylabel="validation loss (nats/token)",
            title=f"MHA -> GQA: pool heads, uptrain {args.uptrain_frac:.0%}")
    ax1.set_xticks([r["n_kv_head"] for r in results["decode"]], [str(r["n_kv_head"]) for r in results["decode"]])
    ax1.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    d = results["decode"]
    ax2.bar([str(r["n_kv_head"]) for r in d], [r["kv_bytes_per_token"] for r in d], color="C4")
    ax2.set(xlabel="n_kv_head", ylabel="KV-cache bytes per token", title="cache size and decoding speed")
    ax3 = ax2.twinx()
    ax3.plot([str(r["n_kv_head"]) for r in d], [r["decode_tok_s"] for r in d], "ko-")
    ax3.set_ylabel("greedy decoding tokens/s")
    write("gqa_uptrain" + suffix, args.quick, results, fig)


if __name__ == "__main__":
    main()
