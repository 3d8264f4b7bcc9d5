"""Alignment in miniature, measured (InstructGPT arXiv:2203.02155 sections 3.5 and 4; DPO
arXiv:2305.18290; GRPO arXiv:2402.03300; reward over-optimization, Gao et al. 2022, arXiv:2210.10760).

    python experiments/align.py            # about 20 minutes on a 2-core CPU
    python experiments/align.py --quick    # seconds (smoke test)

1. The pipeline (`align.py pipeline`): base -> SFT -> reward model -> PPO (beta 0.1,
   gamma 0), and DPO and GRPO from the same SFT run.
2. FLAN: greedy accuracy on the held-out task families, base vs SFT.
3. Gold win rate over SFT of PPO, DPO and GRPO samples (ties count half), several
   evaluation seeds.
4. PPO: the reward model's score, the gold score and the KL to SFT per iteration.
5. The alignment tax: pretraining validation loss of base, SFT, PPO (gamma 0) and PPO-ptx (gamma 1).
6. Over-optimization: PPO with beta = 0 for twice as long: the proxy (RM) score and the gold score.
7. bench: rollout tokens/s, seconds per PPO step, and the bytes of model state (weights,
   a reference copy, gradients, AdamW moments) with a full policy vs one shared LoRA base.
Writes experiments/out/align.{json,png}.
"""

import argparse
import os
from dataclasses import asdict, fields

from common import OUT, plt, write

import torch  # noqa: E402

import align  # noqa: E402
from align import AlignConfig  # noqa: E402


def ppo_variant(root, d, name, iters, **kw):
    """One more PPO run like the pipeline's (same SFT, RM and settings) but for `kw` (cached in its out_dir)."""
    out = os.path.join(root, name)
    if not align.done(out, iters):
        saved = align.load_checkpoint(os.path.join(d["ppo"], "ckpt.pt"))["train_config"]
        known = {f.name for f in fields(AlignConfig)}
        align.run_ppo(AlignConfig(**{**{k: v for k, v in saved.items() if k in known}, "out_dir": out,
                                     "iters": iters, "eval_every": 10**6, "resume": False, **kw}))
    return out


def curve(out_dir, key):
    return [s[key] for s in align.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["history"]["train"]]



# ----------------------------------------------------------------------------- measurements
@torch.no_grad()
def pretrain_val_loss(model, dataset, n_batches=8, batch_size=16, seed=0):
    """Mean next-token loss on the pretraining data's validation split (the alignment tax)."""
    data = align.load_pretrain_split(dataset, "val")
    g = torch.Generator().manual_seed(seed)
    was = model.training
    model.eval()
    dev = model.tok_embeddings.weight.device
    losses = [model(*align.pretrain_batch(data, batch_size, model.config.block_size, g, dev))[1].item()
              for _ in range(n_batches)]
    model.train(was)
    return sum(losses) / len(losses)


@torch.no_grad()
def gold_win_rate(policy_dir, reference_dir, n_prompts=64, samples=2, seed=0, heldout="last,min",
                  max_new_tokens=16):
    """Gold win rate of one run's samples over another's on the same prompts (ties count half)."""
    cfg = align.AlignConfig(init_from=policy_dir, seed=seed, heldout=heldout, max_new_tokens=max_new_tokens)
    a = align.Run(cfg, "eval")
    b = align.load_policy(reference_dir, a.device)[0]
    r, _ = a.step_rngs(-4)
    tasks = a.tasks(r, n_prompts)
    _, ga = a.step_rngs(-5)
    _, gb = a.step_rngs(-5)
    ta = a.rollouts(a.model, tasks, samples, ga)[2]
    tb = a.rollouts(b, tasks, samples, gb)[2]
    task_of = [t for t in tasks for _ in range(samples)]
    wins = [float(align.gold_score(t, x) > align.gold_score(t, y)) + 0.5 * float(align.gold_score(t, x) == align.gold_score(t, y))
            for t, x, y in zip(task_of, ta, tb)]
    return align.mean(wins)


def bench_ppo(init_from, reward_model, out_dir, peft_mode="", iters=2, **overrides):
    """Rollout tokens/s, seconds per PPO step and the memory the models' state needs, with and
    without the shared base. Memory is counted from the tensors (weights, a reference copy,
    gradients and AdamW's two moments), and on CUDA also measured (max_memory_allocated)."""
    cfg = align.AlignConfig(init_from=init_from, reward_model=reward_model, out_dir=out_dir, peft=peft_mode,
                      iters=iters, eval_every=10**9, **overrides)
    cuda = align.resolve_device(cfg.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    history = align.run_ppo(cfg)
    run_model, _, ckpt = align.load_run(out_dir, cfg.device)
    n_all = sum(p.numel() for p in run_model.parameters())
    n_train = sum(v.numel() for v in ckpt["model"].values()) + sum(v.numel() for v in ckpt["heads"].values())
    state_bytes = 4 * n_all + (0 if peft_mode else 4 * n_all) + 4 * 3 * n_train  # + the reference copy
    steps = history["train"]
    return {"peft": peft_mode or "full", "rollout_tok_s": align.mean(s["rollout_tok_s"] for s in steps),
            "s_per_step": align.mean(s["seconds"] for s in steps), "params": n_all, "trainable": n_train,
            "state_bytes": state_bytes,
            "peak_cuda_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=3, help="evaluation seeds for the win rates")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = os.path.join(OUT, "align" + ("_quick" if args.quick else ""))
    cfg = AlignConfig(**({**align.QUICK} if args.quick else {}), out_dir=root)
    d = align.run_pipeline(cfg, args.quick)
    ppo_iters = align.load_checkpoint(os.path.join(d["ppo"], "ckpt.pt"))["iter_num"]
    d["ppo_ptx"] = ppo_variant(root, d, "ppo_ptx", ppo_iters, gamma=1.0)
    # no KL penalty, and a 3x larger step (3e-4) so that the RM is exploited within the budget
    d["ppo_beta0"] = ppo_variant(root, d, "ppo_beta0", 2 * ppo_iters, beta=0.0, learning_rate=3e-4)

    results = {"runs": d, "quick": args.quick}
    sft = align.load_checkpoint(os.path.join(d["sft"], "ckpt.pt"))["history"]
    trained, held = align.split_families(cfg.heldout)
    last = sft["eval"][-1]
    results["flan"] = {"heldout_families": held,
                       "heldout": {"base": align.mean(sft["base_acc"][f] for f in held), "sft": last["heldout_acc"]},
                       "trained": {"base": align.mean(sft["base_acc"][f] for f in trained),
                                   "sft": last["trained_acc"]},
                       "per_family": {f: {"base": sft["base_acc"][f], "sft": last[f"acc_{f}"]} for f in trained + held}}
    rm = align.load_checkpoint(os.path.join(d["rm"], "ckpt.pt"))["history"]["eval"]
    results["rm"] = {"heldout_pair_acc_before": rm[0]["val_acc"], "heldout_pair_acc": rm[-1]["val_acc"]}
    n_prompts, seeds = (4, 1) if args.quick else (96, args.seeds)
    results["win_rate"] = {f"{k}_vs_sft": [gold_win_rate(d[k], d["sft"], n_prompts, seed=s,
                                                               max_new_tokens=cfg.max_new_tokens)
                                           for s in range(seeds)]
                           for k in ("ppo", "dpo", "grpo", "ppo_ptx", "ppo_beta0")}
    ppo_cfg = align.load_checkpoint(os.path.join(d["ppo"], "ckpt.pt"))["train_config"]
    results["ppo"] = {"iters": ppo_iters, "beta": ppo_cfg["beta"], "learning_rate": ppo_cfg["learning_rate"],
                      "score": curve(d["ppo"], "score"), "gold": curve(d["ppo"], "gold"),
                      "kl": curve(d["ppo"], "kl")}
    results["over_optimization"] = {"beta": 0.0, "learning_rate": 3e-4, "score": curve(d["ppo_beta0"], "score"),
                                    "gold": curve(d["ppo_beta0"], "gold"), "kl": curve(d["ppo_beta0"], "kl")}
    results["grpo"] = {"reward": curve(d["grpo"], "reward"), "kl": curve(d["grpo"], "kl")}
    dataset = align.load_checkpoint(os.path.join(d["sft"], "ckpt.pt"))["train_config"]["dataset"]
    results["alignment_tax"] = {name: pretrain_val_loss(align.load_policy(d[run], "cpu")[0], dataset)
                                for name, run in (("base", "base"), ("sft", "sft"), ("gamma_0", "ppo"),
                                                  ("gamma_1", "ppo_ptx"))}
    results["bench"] = [bench_ppo(d["sft"], d["rm"], os.path.join(root, f"bench_{m or 'full'}"), m,
                                        iters=1 if args.quick else 2, **{k: v for k, v in asdict(cfg).items()
                                                    if k in ("prompts_per_step", "samples_per_prompt", "ppo_epochs",
                                                             "minibatches", "max_new_tokens")})
                        for m in ("", "lora")]
    for k, v in results.items():
        if k not in ("runs", "ppo", "over_optimization", "grpo"):
            print(f"{k}: {v}")
    plot(results)


def smooth(xs, k=5):
    """Running mean over the last k iterations (one iteration's rollouts are few and noisy)."""
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def plot(results):
    pyplot = plt()
    fig, axes = pyplot.subplots(2, 3, figsize=(17, 8.5))
    ax = axes[0, 0]
    r = results["ppo"]
    ax.plot(smooth(r["score"]), label="RM score (proxy)")
    ax.plot(smooth(r["gold"]), label="gold score")
    ax.set(xlabel="PPO iteration", ylabel="mean over the rollouts (running mean of 5)",
           title=f"PPO (beta {r['beta']}): reward and KL")
    ax2 = ax.twinx()
    ax2.plot(smooth(r["kl"]), "k:", label="KL to SFT")
    ax2.set_ylabel("KL(pi || pi_SFT), nats per response")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    ax = axes[0, 1]
    o = results["over_optimization"]
    ax.plot(smooth(o["score"]), label=f"RM score (proxy), beta 0, lr {o['learning_rate']:g}")
    ax.plot(smooth(o["gold"]), label=f"gold score, beta 0, lr {o['learning_rate']:g}")
    main_run = f"beta {r['beta']}, lr {r['learning_rate']:g}"
    ax.plot(smooth(r["score"]), "--", color="C0", alpha=0.5, label=f"RM score, {main_run}")
    ax.plot(smooth(r["gold"]), "--", color="C1", alpha=0.5, label=f"gold score, {main_run}")
    ax.set(xlabel="PPO iteration", ylabel="mean over the rollouts (running mean of 5)",
           title="over-optimization (Gao et al. 2022)")
    ax.legend(fontsize=8)
    ax = axes[0, 2]
    g = results["grpo"]
    ax.plot(smooth(g["reward"]), label="GRPO: checker reward (accuracy of the samples)")
    ax.plot(smooth(r["gold"]), label="PPO: gold score of the samples")
    ax.set(xlabel="iteration", ylabel="mean over the rollouts", title="GRPO (checker reward) next to PPO (learned RM)")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    names = list(results["win_rate"])
    ax.bar(range(len(names)), [align.mean(results["win_rate"][n]) for n in names], color="C2")
    for i, n in enumerate(names):
        ax.plot([i] * len(results["win_rate"][n]), results["win_rate"][n], "k.", ms=5)
    ax.axhline(0.5, color="gray", lw=0.8)
    ax.set_xticks(range(len(names)), [n.removesuffix("_vs_sft") for n in names], fontsize=8)
    ax.set(ylabel="gold win rate over SFT (ties count 1/2)", title="win rate over SFT (dots: evaluation seeds)",
           ylim=(0, 1))
    ax = axes[1, 1]
    tax = results["alignment_tax"]
    ax.bar(range(4), list(tax.values()), color="C4")
    ax.set_xticks(range(4), ["base", "SFT", "PPO, gamma 0", "PPO-ptx, gamma 1"], fontsize=8)
    ax.set(ylabel="pretraining validation loss (nats/char)", title="the alignment tax and PPO-ptx")
    ax = axes[1, 2]
    fam = results["flan"]["per_family"]
    held = results["flan"]["heldout_families"]
    x = range(len(fam))
    ax.bar([i - 0.2 for i in x], [v["base"] for v in fam.values()], 0.4, label="base", color="C7")
    ax.bar([i + 0.2 for i in x], [v["sft"] for v in fam.values()], 0.4, label="SFT", color="C0")
    ax.set_xticks(list(x), [f + ("\n(held out)" if f in held else "") for f in fam], fontsize=7, rotation=45)
    ax.set(ylabel="greedy accuracy", title="FLAN: SFT on some families, tested on all", ylim=(0, 1))
    ax.legend(fontsize=8)
    write("align", results["quick"], results, fig)


if __name__ == "__main__":
    main()
