"""A draft that agrees more: the draft model of speculative decoding distilled from its
target (sequence-level knowledge distillation, Kim & Rush 2016, arXiv:1606.07947, section
3; one of the recipes DistillSpec, Zhou et al. 2023, arXiv:2310.08461, compares).

    python experiments/distill_draft.py           # about 9 minutes on a 2-core CPU (8 once trained)
    python experiments/distill_draft.py --quick   # seconds (smoke test)
    python experiments/distill_draft.py --target out/demo --draft out/demo_draft   # a train.py pair

Speculative decoding gains in proportion to how often the target accepts the drafts.
Greedy, a draft token is accepted when it is the target's own argmax; if each is with
probability alpha, one target pass yields (1 - alpha^(k+1)) / (1 - alpha) tokens for k drafts
(Leviathan et al. 2023, arXiv:2211.17192, section 3.1, eq. 1). A draft pretrained on the
same text agrees with the target only as far as both fit that text. Trained on what the
target itself generates, it learns the target's choices rather than the text's. DistillSpec
goes further: on-policy data (sequences the draft generates) scored by the target's whole
distribution (a white-box divergence; the forward KL here), which is the third recipe.

1. Pretrain a target (4 x 128) and a draft (1 x 64) on the char-level pydoc corpus
   (experiments/common.run: train.py, cached).
2. Generate the target's greedy continuations of prompts cut from the training split.
3. Fine-tune copies of the draft for the same steps on the same number of loss tokens:
   on those continuations (distilled: cross-entropy on the target's greedy tokens); on
   the draft's own samples from the same prompts, with the forward KL to the target's
   distribution at each position (on-policy KL, DistillSpec); and on ordinary training
   text (the control: as much more training, no teacher). Each for --seeds seeds (which
   prompts, which order).
4. On prompts from the validation split, which no fine-tune saw: alpha, the draft's
   agreement with the target's argmax along the target's greedy path; and with
   decode.speculative_generate for k = 1, 2, 4, 8, the measured acceptance and target
   passes per generated token (identical output to plain greedy decoding, checked), next
   to prompt lookup, which drafts for free.
Writes experiments/out/distill_draft.{json,png} (distill_draft_<target>.* with --target).
The speed on a given machine follows from the passes and the draft's cost per step:
bench_decode.py --target ... --draft ... measures it (--save_draft writes the distilled
draft as a Hugging Face directory for it).
"""

import argparse
import copy
import os
import statistics

from common import OUT, plt, run, sizes, write

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import decode  # noqa: E402
from data.dataset import draw_windows, open_dataset, parse_mixture  # noqa: E402
from runs import load_run  # noqa: E402

DRAFT = dict(n_layer=1, n_embd=64, n_head=4)  # the draft's shape (the target: common.FULL)
FULL = dict(prompt=32, new=64, distill_prompts=1024, steps=200, batch=16, lr=5e-4, eval_prompts=64,
            spec_prompts=16, ks=(1, 2, 4, 8))
QUICK = dict(prompt=8, new=8, distill_prompts=16, steps=3, batch=4, lr=5e-4, eval_prompts=4, spec_prompts=2, ks=(1, 2))


# ----------------------------------------------------------------------------- the pair
def pretrained_pair(quick):
    """(target, draft, dataset name): the experiment's own char-level pair, trained once."""
    s = sizes(quick)
    root = os.path.join(OUT, "distill_draft" + ("_quick" if quick else ""))
    draft_sizes = {**s, **(dict(n_layer=1, n_embd=16, n_head=2) if quick else DRAFT)}
    run(os.path.join(root, "target"), s)
    run(os.path.join(root, "draft"), draft_sizes)
    return load_run(os.path.join(root, "target"))[0], load_run(os.path.join(root, "draft"))[0], "pydoc_char"


def windows(dataset, split, n, length, seed):
    """n windows of `length` token ids from a split of the dataset, (n, length)."""
    return draw_windows(open_dataset(dataset).splits[split], n, length, torch.Generator().manual_seed(seed))


@torch.inference_mode()
def greedy_continuations(target, prompts, new, batch=128):
    """(N, P) prompts -> (N, P + new): the target's greedy continuation of each."""
    return torch.cat([target.generate(prompts[i:i + batch], new, temperature=0) for i in range(0, len(prompts), batch)])


# ----------------------------------------------------------------------------- 3. fine-tuning
def finetune(draft, sequences, prompt_len, steps, batch, lr, seed):
    """A copy of the draft trained on `sequences` (N, P + new) with the loss on the tokens
    after the prompt only: on the target's continuations this is sequence-level
    distillation; on ordinary text it is more of the same pretraining."""
    model = copy.deepcopy(draft).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = sequences[torch.randint(len(sequences), (batch,), generator=g)]  # (B, P + new)
        x, y = rows[:, :-1], rows[:, 1:].clone()
        y[:, :prompt_len - 1] = -100  # predicting prompt tokens: not what the draft is for
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def finetune_on_policy(target, draft, prompts, new, steps, batch, lr, seed):
    """DistillSpec's recipe (Zhou et al. 2023, section 3: on-policy data, a white-box
    divergence): each step the draft itself continues a batch of prompts, sampling at
    temperature 1, and learns the target's whole next-token distribution at every position
    of its own continuation, by the forward KL(p_target || q_draft) over the vocabulary. The
    draft is taught where its own drafts go, not only along the target's path."""
    model = copy.deepcopy(draft)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    P = prompts.shape[1]
    for _ in range(steps):
        rows = prompts[torch.randint(len(prompts), (batch,), generator=g)]  # (B, P)
        with torch.no_grad():
            seq = model.eval().generate(rows, new, temperature=1.0, generator=g)  # (B, P + new) the draft's own
            log_p = F.log_softmax(target(seq[:, :-1])[0][:, P - 1:].float(), dim=-1)  # (B, new, V) target
        log_q = F.log_softmax(model.train()(seq[:, :-1])[0][:, P - 1:].float(), dim=-1)  # (B, new, V) draft
        loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()  # KL(p || q) per position, averaged
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


# ----------------------------------------------------------------------------- 4. agreement
@torch.inference_mode()
def agreement(draft, paths, prompt_len):
    """alpha: how often the draft's argmax is the target's next greedy token, along the
    target's greedy paths (N, P + new) (teacher-forced: the prefix is always the target's)."""
    logits, _ = draft(paths[:, :-1])
    guess = logits[:, prompt_len - 1:].argmax(-1)  # (N, new) the draft's choice after each prefix
    return (guess == paths[:, prompt_len:]).float().mean().item()


@torch.inference_mode()
def speculative(target, draft, prompts, new, ks):
    """Per k: the drafts' acceptance and target passes per new token, speculative_generate
    greedy on each prompt; and whether every output equals plain greedy decoding."""
    rows, same = {}, True
    for k in ks:
        drafted = accepted = passes = 0
        for p in prompts:
            stats = {}
            out = decode.speculative_generate(target, p[None], new, draft, k, temperature=0, stats=stats)
            same &= torch.equal(out, target.generate(p[None], new, temperature=0))
            drafted, accepted, passes = drafted + stats["drafted"], accepted + stats["accepted"], \
                passes + stats["target_calls"]
        rows[k] = {"acceptance": accepted / max(drafted, 1), "passes_per_token": passes / (new * len(prompts))}
    return rows, same


def summary(values):
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


# ----------------------------------------------------------------------------- the figure
def plot(results):
    pyplot = plt()
    fig, (ax1, ax2) = pyplot.subplots(1, 2, figsize=(10, 3.8))
    colors = {"prompt lookup": "tab:green", "pretrained": "gray", "more pretraining": "tab:blue",
              "distilled": "tab:red", "on-policy KL": "tab:purple"}
    names = [name for name in results["drafts"] if results["drafts"][name]["alpha"]]  # the draft models
    for i, name in enumerate(names):
        a = results["drafts"][name]["alpha"]
        ax1.bar(i, a["mean"], color=colors[name], yerr=[[a["mean"] - a["min"]], [a["max"] - a["mean"]]], capsize=4)
    ks = results["ks"]
    for name in results["drafts"]:
        passes = [statistics.mean(r[str(k)]["passes_per_token"] for r in results["drafts"][name]["speculative"])
                  for k in ks]
        ax2.plot(ks, [1 / p for p in passes], "o-", color=colors[name], label=name)
    ax1.set_xticks(range(len(names)), names)
    ax1.set_ylabel("alpha: fraction where draft argmax = target's")
    ax1.set_title("agreement on held-out prompts (min-max over seeds)")
    ax2.set_xlabel("k (tokens drafted per target pass)")
    ax2.set_ylabel("new tokens per target pass")
    ax2.set_title("speculative_generate, greedy")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    return fig


# ----------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, a few steps (CI)")
    p.add_argument("--seeds", type=int, default=3, help="fine-tunes per kind (which prompts, which order)")
    p.add_argument("--target", default="", help="a train.py out_dir (default: the experiment's own char-level pair)")
    p.add_argument("--draft", default="", help="with --target: the draft's out_dir, trained on the same tokenizer")
    p.add_argument("--save_draft", default="", help="write the first distilled draft here (a Hugging Face "
                   "directory, hf.save_llama), e.g. for bench_decode.py --draft")
    args = p.parse_args()
    c = QUICK if args.quick else FULL
    seeds = 1 if args.quick else args.seeds
    if bool(args.target) != bool(args.draft):
        p.error("give both --target and --draft, or neither")
    if args.target:
        target, tokenizer, ckpt = load_run(args.target)
        draft, draft_tokenizer, _ = load_run(args.draft)
        decode.check_draft(target, draft, 1, tokenizer, draft_tokenizer)
        dataset = parse_mixture(ckpt["train_config"]["dataset"])[0][0]  # a mixture's first source
    else:
        target, draft, dataset = pretrained_pair(args.quick)
    P, new = c["prompt"], c["new"]
    if P + new > min(target.config.block_size, draft.config.block_size):
        p.error(f"prompt {P} + new {new} tokens exceed the models' context")
    torch.manual_seed(0)
    held_out = greedy_continuations(target, windows(dataset, "val", c["eval_prompts"], P, seed=1), new)
    results = {"dataset": dataset, "prompt": P, "new": new, "ks": list(c["ks"]), "seeds": seeds, "drafts": {},
               "identical_to_greedy": True, "settings": {k: v for k, v in c.items() if k != "ks"}}

    def measure(name, drafts):
        rows = [speculative(target, d, held_out[:c["spec_prompts"], :P], new, c["ks"]) for d in drafts]
        results["identical_to_greedy"] &= all(same for _, same in rows)
        alpha = summary([agreement(d, held_out, P) for d in drafts]) if drafts != ["prompt"] else None
        results["drafts"][name] = {"alpha": alpha, "speculative": [{str(k): v for k, v in r.items()} for r, _ in rows]}
        print(f"{name:17s} " + (f"alpha {alpha['mean']:.3f} ({alpha['min']:.3f}-{alpha['max']:.3f})  " if alpha
                                else " " * 28) + "acceptance "
              + "  ".join(f"k={k} {statistics.mean(r[k]['acceptance'] for r, _ in rows):.2f}" for k in c["ks"]))

    measure("prompt lookup", ["prompt"])  # no draft model: n-grams of the context (decode.py)
    measure("pretrained", [draft])
    more, distilled, on_policy = [], [], []
    for seed in range(seeds):
        prompts = windows(dataset, "train", c["distill_prompts"], P, seed=100 + seed)
        teacher = greedy_continuations(target, prompts, new)  # (N, P + new), the target's own choices
        text = windows(dataset, "train", c["distill_prompts"], P + new, seed=200 + seed)  # the same amount of text
        distilled.append(finetune(draft, teacher, P, c["steps"], c["batch"], c["lr"], seed))
        more.append(finetune(draft, text, P, c["steps"], c["batch"], c["lr"], seed))
        on_policy.append(finetune_on_policy(target, draft, prompts, new, c["steps"], c["batch"], c["lr"], seed))
    measure("more pretraining", more)
    measure("distilled", distilled)
    measure("on-policy KL", on_policy)
    if args.save_draft:
        from hf import save_llama
        save_llama(distilled[0], args.save_draft)
        print(f"wrote the distilled draft to {args.save_draft}")
    name = "distill_draft" + (f"_{os.path.basename(os.path.normpath(args.target))}" if args.target else "")
    write(name, args.quick, results, plot(results))


if __name__ == "__main__":
    main()
