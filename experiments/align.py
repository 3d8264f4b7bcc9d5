"""Alignment in miniature, measured (FLAN arXiv:2109.01652; InstructGPT arXiv:2203.02155
sections 3.5, 4.1-4.3; DPO arXiv:2305.18290; GRPO arXiv:2402.03300; reward over-optimization,
Gao et al. 2022, arXiv:2210.10760).

    python experiments/align.py            # see the README for its time on a 2-core CPU
    python experiments/align.py --quick    # minutes: a smaller model, the direction of each effect

1. SFT recipes and the alignment tax: the pretraining validation loss of the base and of SFT
   with and without pretraining text mixed in (InstructGPT section 4.2's regressions).
2. The reward model (from the SFT model, on the gold labeler's rankings of K SFT samples):
   pairwise accuracy on held-out prompts.
3. PPO (beta > 0), PPO-ptx, DPO and GRPO from the same SFT model, one run per training seed:
   the gold win rate of their samples over SFT's (ties count half), on the trained task
   families and on the held-out ones (section 4.3: does alignment generalize?), several
   evaluation seeds.
4. Over-optimization as Gao et al.'s figure 1: the gold score and the RM's score of the PPO
   rollouts against sqrt(KL to SFT), for beta in {0, 0.01, 0.05, 0.1}.
5. bench: rollout tokens/s, seconds per PPO step, and the bytes of model state with a full
   policy vs one shared LoRA base.
Writes experiments/out/align.{json,png} (align_quick.* with --quick).
"""

import argparse
import math
import os
import time
from dataclasses import asdict, fields

from common import OUT, plt, write

import torch  # noqa: E402

import align  # noqa: E402
from align import AlignConfig  # noqa: E402
from data.tasks import gold_score, split_families  # noqa: E402

# the training seeds of PPO, PPO-ptx, DPO and GRPO (the base, SFT and RM are trained once)
SEEDS = (1337, 1, 2)
BETAS = (0.0, 0.01, 0.05, 0.1)  # Gao et al. figure 1: the KL penalty's strength
# SFT recipes for the alignment tax: (name, settings); the pipeline's own recipe is align.PIPELINE["sft"]
RECIPES = {"no pretraining mix": dict(gamma=0.0)}


# ----------------------------------------------------------------------------- runs
def variant(root, d, stage, name, **kw):
    """One more run of a stage like the pipeline's (same SFT and RM) but for `kw`; cached in root/name."""
    out = os.path.join(root, name)
    saved = align.load_checkpoint(os.path.join(d[stage], "ckpt.pt"))["train_config"]
    known = {f.name for f in fields(AlignConfig)}
    cfg = AlignConfig(**{**{k: v for k, v in saved.items() if k in known}, "out_dir": out, "resume": False, **kw})
    if not align.done(out, cfg.iters):
        align.STAGES[stage](cfg)
    return out


def curve(out_dir, key):
    return [s[key] for s in align.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["history"]["train"]]


# ----------------------------------------------------------------------------- measurements
@torch.no_grad()
def gold_win_rate(policy_dir, reference_dir, families, n_prompts=64, samples=2, seed=0, max_new_tokens=12):
    """Gold win rate of one run's samples over another's on the same prompts (ties count half)."""
    cfg = AlignConfig(init_from=policy_dir, seed=seed, max_new_tokens=max_new_tokens)
    a = align.Run(cfg, "eval")
    b = align.load_policy(reference_dir, a.device)[0]
    r, _ = a.step_rngs(-4)
    tasks = a.tasks(r, n_prompts, families)
    _, ga = a.step_rngs(-5)
    _, gb = a.step_rngs(-5)
    ta = a.rollouts(a.model, tasks, samples, ga)[2]
    tb = a.rollouts(b, tasks, samples, gb)[2]
    task_of = [t for t in tasks for _ in range(samples)]
    wins = [float(gold_score(t, x) > gold_score(t, y)) + 0.5 * float(gold_score(t, x) == gold_score(t, y))
            for t, x, y in zip(task_of, ta, tb)]
    return align.mean(wins)


def pretrain_val_loss(run_dir, dataset):
    """The alignment tax: mean next-token loss on the base's pretraining validation text."""
    return align.pretrain_loss(align.load_policy(run_dir, "cpu")[0], align.load_pretrain_split(dataset, "val"))


def bench_ppo(init_from, reward_model, out_dir, peft_mode="", iters=2, **overrides):
    """Rollout tokens/s, seconds per PPO step and the memory the models' state needs, with and
    without the shared base. Memory is counted from the tensors (weights, a reference copy,
    gradients and AdamW's two moments), and on CUDA also measured (max_memory_allocated)."""
    cfg = AlignConfig(init_from=init_from, reward_model=reward_model, out_dir=out_dir, peft=peft_mode,
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


# ----------------------------------------------------------------------------- the experiment
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--eval_seeds", type=int, default=3, help="evaluation seeds for the win rates")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared machine)")
    args = p.parse_args()
    if args.eval_seeds < 1 or args.threads < 1:
        p.error("--eval_seeds and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # train.py (the base) keeps this count too
    t0 = time.time()
    root = os.path.join(OUT, "align" + ("_quick" if args.quick else ""))
    from_scratch = not os.path.isdir(root)  # else finished runs are reused and the time is the rest's
    cfg = AlignConfig(**({**align.QUICK} if args.quick else {}), out_dir=root)
    d = align.run_pipeline(cfg, align.PIPELINE_QUICK if args.quick else None)
    seeds = SEEDS[:2] if args.quick else SEEDS
    eval_seeds = 1 if args.quick else args.eval_seeds
    n_prompts = 32 if args.quick else 64

    # the methods, one run per training seed (the pipeline's runs are seed 1337)
    ppo_iters = align.load_checkpoint(os.path.join(d["ppo"], "ckpt.pt"))["iter_num"]
    runs = {"ppo": {}, "ppo_ptx": {}, "dpo": {}, "grpo": {}}
    for s in seeds:
        for m, stage, kw in (("ppo", "ppo", {}), ("ppo_ptx", "ppo", {"gamma": 1.0}), ("dpo", "dpo", {}),
                             ("grpo", "grpo", {})):
            runs[m][s] = d[m] if (s == SEEDS[0] and m in d) else variant(root, d, stage, f"{m}_s{s}", seed=s, **kw)
    sweep = {b: variant(root, d, "ppo", f"ppo_beta{b:g}", beta=b, iters=2 * ppo_iters, eval_every=10**6)
             for b in BETAS}
    recipes = {name: variant(root, d, "sft", "sft_" + name.replace(" ", "_"), **kw) for name, kw in RECIPES.items()}
    # ablations of two choices of ours: the RM's LM term, and the value loss kept off the policy's trunk
    rm_head = variant(root, d, "rm", "rm_head_only", rm_lm=False, prefs=os.path.join(d["rm"], "prefs.jsonl"))
    ppo_shared = variant(root, d, "ppo", "ppo_vf_shared", vf_shared=True)

    results = {"quick": args.quick, "runs": {**d, **{f"{m}_s{s}": v for m, r in runs.items() for s, v in r.items()}},
               "seeds": list(seeds), "eval_seeds": eval_seeds, "n_prompts": n_prompts}
    sft = align.load_checkpoint(os.path.join(d["sft"], "ckpt.pt"))
    results["model"] = "{n_layer} layers x {n_embd}".format(**sft["model_config"])
    trained, held = split_families(cfg.heldout, cfg.families)
    last = sft["history"]["eval"][-1]
    results["flan"] = {"heldout_families": held, "base_acc": sft["history"]["base_acc"],
                       "sft_acc": {f: last[f"acc_{f}"] for f in trained + held},
                       "trained": {"base": align.mean(sft["history"]["base_acc"][f] for f in trained),
                                   "sft": last["trained_acc"]},
                       "heldout": {"base": align.mean(sft["history"]["base_acc"][f] for f in held),
                                   "sft": last["heldout_acc"]}}
    rm = align.load_checkpoint(os.path.join(d["rm"], "ckpt.pt"))
    results["rm"] = {"val_acc": [e["val_acc"] for e in rm["history"]["eval"]],
                     "iters": [e["iter"] for e in rm["history"]["eval"]],
                     "heldout_pair_acc": rm["history"]["eval"][-1]["val_acc"],
                     "val_pairs": rm["history"]["eval"][-1]["val_pairs"],
                     "prompts": rm["train_config"]["rm_prompts"], "k": rm["train_config"]["k"]}

    head = align.load_checkpoint(os.path.join(rm_head, "ckpt.pt"))["history"]["eval"]
    results["rm"]["ablation"] = {"lm_alone": rm["history"]["eval"][0]["val_acc"],  # iteration 0: the head is 0
                                 "head_alone": head[-1]["val_acc"], "both": results["rm"]["heldout_pair_acc"]}

    # 3: win rates over SFT, per training seed, on the trained and the held-out families
    def wins(run_dir, families):
        return [gold_win_rate(run_dir, d["sft"], families, n_prompts, seed=e, max_new_tokens=cfg.max_new_tokens)
                for e in range(eval_seeds)]
    results["win_rate"] = {m: {"trained": {str(s): wins(r[s], trained) for s in seeds},
                               "heldout": {str(s): wins(r[s], held) for s in seeds}} for m, r in runs.items()}
    results["ppo_vf_shared"] = {"trained": wins(ppo_shared, trained)}  # seed 1337, against ppo_s1337
    results["ppo"] = {"score": curve(d["ppo"], "score"), "gold": curve(d["ppo"], "gold"), "kl": curve(d["ppo"], "kl"),
                      "beta": align.load_checkpoint(os.path.join(d["ppo"], "ckpt.pt"))["train_config"]["beta"]}
    results["grpo"] = {str(s): curve(runs["grpo"][s], "reward") for s in seeds}

    # 4: over-optimization
    results["over_optimization"] = {f"{b:g}": {"score": curve(v, "score"), "gold": curve(v, "gold"),
                                               "kl": curve(v, "kl")} for b, v in sweep.items()}

    # 1: the alignment tax, and the SFT recipes
    dataset = sft["train_config"]["dataset"]
    keys = ("learning_rate", "iters", "gamma", "peft")
    results["sft_recipes"] = {
        name: {**{k: align.load_checkpoint(os.path.join(v, "ckpt.pt"))["train_config"][k] for k in keys},
               "trained_acc": align.load_checkpoint(os.path.join(v, "ckpt.pt"))["history"]["eval"][-1]["trained_acc"],
               "pretrain_loss": pretrain_val_loss(v, dataset)}
        for name, v in {"pipeline": d["sft"], **recipes}.items()}
    results["alignment_tax"] = {"base": pretrain_val_loss(d["base"], dataset),
                                "sft": results["sft_recipes"]["pipeline"]["pretrain_loss"],
                                "ppo": [pretrain_val_loss(runs["ppo"][s], dataset) for s in seeds],
                                "ppo_ptx": [pretrain_val_loss(runs["ppo_ptx"][s], dataset) for s in seeds]}
    results["bench"] = [bench_ppo(d["sft"], d["rm"], os.path.join(root, f"bench_{m or 'full'}"), m, iters=1,
                                  **{k: v for k, v in asdict(cfg).items()
                                     if k in ("prompts_per_step", "samples_per_prompt", "ppo_epochs", "minibatches",
                                              "max_new_tokens")})
                        for m in ("", "lora")]
    results["seconds"], results["from_scratch"] = time.time() - t0, from_scratch
    for k in ("flan", "rm", "alignment_tax", "sft_recipes"):
        print(f"{k}: {results[k]}")
    for m, w in results["win_rate"].items():
        print(f"win rate over SFT, {m}: trained {summary(w['trained'])}, held out {summary(w['heldout'])}")
    plot(results)
    if args.quick:
        print("quick run: small models and few iterations, so the figures show the direction of each effect "
              "only; for the real measurements run: python experiments/align.py")


def summary(per_seed):
    """'mean (min..max over training seeds of each seed's mean over evaluation seeds)'."""
    means = [align.mean(v) for v in per_seed.values()]
    return f"{align.mean(means):.2f} ({min(means):.2f}..{max(means):.2f})"


def smooth(xs, k=5):
    """Running mean over the last k iterations (one iteration's rollouts are few and noisy)."""
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


METHODS = {"ppo": "PPO", "ppo_ptx": "PPO-ptx", "dpo": "DPO", "grpo": "GRPO"}


def plot(results):
    pyplot = plt()
    fig, axes = pyplot.subplots(2, 4, figsize=(22, 9))
    run = "experiments/align.py" + (" --quick" if results["quick"] else "")
    model = results.get("model", "the pipeline's model")
    fig.suptitle(f"{run}: InstructGPT, DPO and GRPO in miniature ({model}, character-level)")
    ax = axes[0, 0]
    r = results["ppo"]
    ax.plot(smooth(r["score"]), label="RM score (proxy)")
    ax.plot(smooth(r["gold"]), label="gold score")
    ax.set(xlabel="PPO iteration", ylabel="mean over the rollouts (running mean of 5)",
           title=f"PPO (beta {r['beta']:g}, seed {results['seeds'][0]}): reward and KL")
    ax2 = ax.twinx()
    ax2.plot(smooth(r["kl"]), "k:", label="KL to SFT")
    ax2.set_ylabel("KL(pi || pi_SFT), nats per response")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    ax = axes[0, 1]
    for i, (beta, o) in enumerate(results["over_optimization"].items()):
        x = [math.sqrt(max(k, 0.0)) for k in smooth(o["kl"])]
        ax.plot(x, smooth(o["gold"]), "-", color=f"C{i}", label=f"gold, beta {beta}")
        ax.plot(x, smooth(o["score"]), "--", color=f"C{i}", alpha=0.6, label=f"RM (proxy), beta {beta}")
    ax.set(xlabel="sqrt(KL(pi || pi_SFT)), sqrt(nats)", ylabel="score of the rollouts (running mean of 5)",
           title="over-optimization (Gao et al. 2022, figure 1)")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[0, 2]
    for s, rew in results["grpo"].items():
        ax.plot(smooth(rew), label=f"training seed {s}")
    ax.set(xlabel="GRPO iteration", ylabel="checker reward: accuracy of the samples (running mean of 5)",
           title="GRPO: training reward", ylim=(0, 1))
    ax.legend(fontsize=8)
    ax = axes[0, 3]
    rm = results["rm"]
    ax.plot(rm["iters"], rm["val_acc"], "o-")
    ax.axhline(0.5, color="gray", lw=0.8, label="chance")
    ax.set(xlabel="RM iteration", ylabel="pairwise accuracy against the gold labeler",
           title=f"reward model: held-out prompts ({rm['val_pairs']:.0f} pairs)", ylim=(0, 1))
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    w = results["win_rate"]
    for j, (split, offset) in enumerate((("trained", -0.2), ("heldout", 0.2))):
        means = [align.mean(align.mean(v) for v in w[m][split].values()) for m in METHODS]
        ax.bar([i + offset for i in range(len(METHODS))], means, 0.4, color=f"C{j + 2}",
               label="trained families" if split == "trained" else "held-out families (last, min)")
        for i, m in enumerate(METHODS):
            seeds = [align.mean(v) for v in w[m][split].values()]
            ax.plot([i + offset] * len(seeds), seeds, "k.", ms=5)
    ax.axhline(0.5, color="gray", lw=0.8)
    ax.set_xticks(range(len(METHODS)), list(METHODS.values()))
    ax.set(ylabel="gold win rate over SFT (ties count 1/2)", ylim=(0, 1),
           title="win rate over SFT (dots: training seeds)")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    tax = results["alignment_tax"]
    names = ["base", *[f"SFT, {n}" for n in results["sft_recipes"]], "PPO", "PPO-ptx"]
    values = [tax["base"], *[v["pretrain_loss"] for v in results["sft_recipes"].values()],
              align.mean(tax["ppo"]), align.mean(tax["ppo_ptx"])]
    ax.bar(range(len(values)), values, color="C4")
    ax.axhline(1.25 * tax["base"], color="gray", ls="--", lw=0.8, label="base + 25%")
    ax.set_xticks(range(len(values)), names, fontsize=7, rotation=20)
    ax.set(ylabel="pretraining validation loss (nats/char)", title="the alignment tax")
    ax.legend(fontsize=8)
    ax = axes[1, 2]
    f = results["flan"]
    fam = list(f["sft_acc"])
    ax.bar([i - 0.2 for i in range(len(fam))], [f["base_acc"][x] for x in fam], 0.4, label="base", color="C7")
    ax.bar([i + 0.2 for i in range(len(fam))], [f["sft_acc"][x] for x in fam], 0.4, label="SFT", color="C0")
    ax.set_xticks(range(len(fam)), [x + ("\n(held out)" if x in f["heldout_families"] else "") for x in fam],
                  fontsize=7, rotation=45)
    ax.set(ylabel="greedy accuracy", title="FLAN: SFT on some families, tested on all", ylim=(0, 1))
    ax.legend(fontsize=8)
    ax = axes[1, 3]
    b = results["bench"]
    ax.bar(range(len(b)), [x["state_bytes"] / 1e6 for x in b], color="C5")
    ax.set_xticks(range(len(b)), [f"{x['peft']} policy" for x in b])
    ax.set(ylabel="model state, MB (weights, reference, grads, AdamW)", title="PPO's memory: a shared LoRA base")
    write("align", results["quick"], results, fig)


# ----------------------------------------------------------------------------- the documents' tables
def spread(per_seed):
    """(mean, min, max) over training seeds of each seed's mean over evaluation seeds."""
    means = [align.mean(v) for v in per_seed.values()]
    return align.mean(means), min(means), max(means)


def tables(results):
    """Markdown for README.md and EXERCISES.md (experiments/docs.py)."""
    w, tax, rm, f = results["win_rate"], results["alignment_tax"], results["rm"], results["flan"]
    n_seeds, n_eval = len(results["seeds"]), results["eval_seeds"]
    rows = ["| method | win rate over SFT, trained families | held-out families (`last`, `min`) |",
            "|---|---|---|"]
    for m, name in METHODS.items():
        cells = ["{:.2f} ({:.2f}-{:.2f})".format(*spread(w[m][split])) for split in ("trained", "heldout")]
        rows.append(f"| {name} | {cells[0]} | {cells[1]} |")
    win = "\n".join(rows) + (f"\n\nMean over {n_seeds} training seeds ({', '.join(map(str, results['seeds']))}) x "
                             f"{n_eval} evaluation seeds of {results['n_prompts']} prompts x 2 samples; in "
                             "brackets the lowest and highest training seed. Ties count half, so 0.5 is a draw.")
    rows = ["| SFT recipe | learning rate | iterations | pretraining mix (gamma) | trained-family accuracy | "
            "pretraining val loss | tax over the base |", "|---|---|---|---|---|---|---|"]
    for name, r in results["sft_recipes"].items():
        rows.append(f"| {name} | {r['learning_rate']:g} | {r['iters']} | {r['gamma']:g} | {r['trained_acc']:.2f} | "
                    f"{r['pretrain_loss']:.2f} | {r['pretrain_loss'] / tax['base'] - 1:+.0%} |")
    rows.append(f"| (the base) | | | | {f['trained']['base']:.2f} | {tax['base']:.2f} | |")
    for m in ("ppo", "ppo_ptx"):
        loss = align.mean(tax[m])
        rows.append(f"| then {METHODS[m]} | | | {'1' if m == 'ppo_ptx' else '0'} | | {loss:.2f} | "
                    f"{loss / tax['base'] - 1:+.0%} |")
    claims = [
        "| claim | measured |", "|---|---|",
        f"| SFT learns the trained families (greedy accuracy) | base {f['trained']['base']:.2f} -> SFT "
        f"{f['trained']['sft']:.2f} |",
        f"| FLAN: held-out families (`last`, `min`) | base {f['heldout']['base']:.2f} -> SFT {f['heldout']['sft']:.2f} |",
        f"| the RM ranks held-out comparisons like the gold labeler | {rm['heldout_pair_acc']:.2f} "
        f"({rm['val_pairs']:.0f} pairs; {rm['prompts']} prompts x K = {rm['k']} SFT samples) |",
        f"| PPO: the RM's score of the rollouts (first 5 -> last 5 iterations, seed {results['seeds'][0]}) | "
        f"{align.mean(results['ppo']['score'][:5]):.2f} -> {align.mean(results['ppo']['score'][-5:]):.2f} |",
        f"| PPO: their gold score | {align.mean(results['ppo']['gold'][:5]):.2f} -> "
        f"{align.mean(results['ppo']['gold'][-5:]):.2f} (KL to SFT {align.mean(results['ppo']['kl'][-5:]):.1f} "
        "nats/response at the end) |",
        "| GRPO: its training reward (first 5 -> last 5 iterations, mean over seeds) | "
        f"{align.mean(align.mean(v[:5]) for v in results['grpo'].values()):.2f} -> "
        f"{align.mean(align.mean(v[-5:]) for v in results['grpo'].values()):.2f} |"]
    oo = results["over_optimization"]
    rows_oo = ["| beta | gold score: first 5 -> best (running mean of 5) -> last 5 | RM score: first 5 -> last 5 | "
               "sqrt(KL) at the end |", "|---|---|---|---|"]
    for beta, o in oo.items():
        g = smooth(o["gold"])
        rows_oo.append(f"| {beta} | {align.mean(o['gold'][:5]):.2f} -> {max(g):.2f} -> {align.mean(o['gold'][-5:]):.2f} | "
                       f"{align.mean(o['score'][:5]):.2f} -> {align.mean(o['score'][-5:]):.2f} | "
                       f"{math.sqrt(max(align.mean(o['kl'][-5:]), 0)):.1f} |")
    ab = rm["ablation"]
    shared = align.mean(results["ppo_vf_shared"]["trained"])
    separate = align.mean(w["ppo"]["trained"][str(results["seeds"][0])])
    ablations = "\n".join([
        "| choice | measured | without it |", "|---|---|---|",
        f"| the RM adds its own mean log-probability of the response (`rm_lm`) | held-out accuracy {ab['both']:.2f} | "
        f"{ab['head_alone']:.2f} with InstructGPT's head alone; {ab['lm_alone']:.2f} with the SFT model's "
        "log-probability alone (iteration 0) |",
        f"| the value loss does not reach the policy's trunk (`vf_shared false`) | PPO win rate {separate:.2f} "
        f"(seed {results['seeds'][0]}) | {shared:.2f} with TRL's shared trunk |"])
    fam = f["sft_acc"]
    flan = "\n".join(["| family | base | SFT |", "|---|---|---|"] + [
        f"| `{x}`{' (held out)' if x in f['heldout_families'] else ''} | {f['base_acc'][x]:.2f} | {fam[x]:.2f} |"
        for x in fam])
    bench = "\n".join(["| policy | rollout tokens/s | seconds per PPO step | model state (MB) |", "|---|---|---|---|"] + [
        f"| {b['peft']} | {b['rollout_tok_s']:.0f} | {b['s_per_step']:.2f} | {b['state_bytes'] / 1e6:.2f} |"
        for b in results["bench"]])
    return {"claims": "\n".join(claims), "win_rates": win, "tax": "\n".join(rows), "ablations": ablations,
            "flan": flan, "bench": bench,
            "over_optimization": "\n".join(rows_oo),
            "time": f"{results['seconds'] / 60:.1f} minutes" + ("" if results.get("from_scratch", True) else
                                                                 " (reusing runs of an earlier invocation)")}


if __name__ == "__main__":
    main()
