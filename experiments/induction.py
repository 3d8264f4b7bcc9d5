"""Induction heads and their phase change, the ablation that tests whether they cause
in-context learning, and learning from the shots of a task no pretraining can hold.

    python experiments/induction.py [--quick]

Read next to Olsson et al. 2022, "In-context Learning and Induction Heads"
(arXiv:2209.11895). An induction head completes [A][B] ... [A] -> [B]: from the current
token it attends back to the token *after* that token's earlier occurrence (prefix
matching) and raises that token's logit (copying). It needs two layers: a
previous-token head in layer 0 writes "the token before me was A" into each position, and
the induction head in layer 1 matches its query (the current token A) against that
(K-composition). A 1-layer model cannot build it.

  1. The phase change. A 2-layer model and a 1-layer control, trained by train.py on text
     the repo makes here (random letters in short spans, each written four times in a row,
     between shots of fresh random mappings), measured every 50 steps: each head's
     prefix-matching and copying scores, the in-context-learning score (loss late in the
     context minus loss early in it) and the validation loss, on one step axis. The
     paper's claim: the induction heads form in a sharp transition, and in-context
     learning improves at the same moment.
  2. The ablation (Olsson's causal argument): zero the induction head's output, and the
     paper predicts that the loss on the second repetition of a random span goes back up
     towards the first's.
  3. Learning from the shots: a random key -> value mapping, fresh in every episode, given
     as K shots "kv kv kv ... q"; the model must answer q's value. Nothing in the weights
     can hold it (the training text has such shots too, of other mappings): only a head
     that copies from the shot with the same key solves it.

At this script's budget (800 steps, README) no induction head forms: both models learn to
copy recent letters instead, and the tables say so.

Olsson section 3.4's two properties of an induction head, measured as TransformerLens
does on repeated random tokens [A A] (A: 8 distinct letters; the training text repeats
spans of 4-12, and RoPE heads trained so need not reach further back):

  prefix matching: the mean attention from each token of the second A to the token after
      its earlier occurrence (1 for a perfect induction head; a head that attends
      uniformly scores the mean of 1 / (t + 1));
  copying: the head's OV circuit W_U W_O W_V W_E (vocab x vocab) maps a token to its own
      logit: the sum of its eigenvalues over the sum of their absolute values (Elhage et
      al. 2021, "A Mathematical Framework for Transformer Circuits"): 1 copies, -1
      suppresses, 0 neither.

Writes experiments/out/induction.{json,png}; the runs are train.py runs under
experiments/out/induction/ (L2 and L1: seed 0 of each, for runs.load_run and sample.py),
trained two at a time (one process per core). --quick: seed 0 of each model, no exercise
runs: the direction of the effect (tests/test_induction.py checks it).
"""

import argparse
import contextlib
import io
import math
import multiprocessing
import os
import random
import string
import time

from common import OUT, plt, write

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import train  # noqa: E402
from checkpoint import atomic_write  # noqa: E402
from data.prepare import prepare  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from model import count_params  # noqa: E402
import runs  # noqa: E402
from runs import load_run  # noqa: E402

ALPHABET = string.ascii_letters  # 52 letters: the tokens (a char-level dataset)
MODELS = {"L2": 2, "L1": 1}  # n_layer; the 1-layer control cannot compose two heads
FULL = dict(n_embd=64, n_head=4, block_size=32, batch=32, iters=800, every=50, lr=3e-3, min_lr=3e-3, seeds=3,
            repeat_fraction=1.0, repeats=4, span=(4, 12), episodes=0.5, probe_len=8, corpus_chars=300_000,
            n_score=64, n_episodes=400,
            shots=[0, 1, 2, 4, 8], sweep=[], sweep_seeds=2, workers=2)
QUICK = dict(FULL, every=100, seeds=1, n_episodes=200, shots=[0, 8], sweep=[])
PHASE_THRESHOLD = 0.25  # the phase change: the first logged step where the best head's prefix matching passes this


# ----------------------------------------------------------------------------- the data
def corpus(n_chars, repeat_fraction, span=(4, 12), seed=0, repeats=4, episodes=0.5):
    """Random letters in spans of span[0]..span[1] letters; a span is written `repeats` times
    in a row with probability repeat_fraction, else once. A fraction `episodes` of the parts
    are instead 8-16 shots of a fresh random mapping (`shots`). What repeats is all there is
    to learn: everywhere else the best guess is 1/52."""
    rng = random.Random(seed)
    parts, n = [], 0
    while n < n_chars:
        if rng.random() < episodes:
            parts.append(shots(rng, rng.randint(8, 16))[2])
        else:
            s = "".join(rng.choices(ALPHABET, k=rng.randint(*span)))
            parts.append(s * repeats if rng.random() < repeat_fraction else s)
        n += len(parts[-1])
    return "".join(parts)


def shots(rng, k, n_pairs=4):
    """A fresh random mapping, n_pairs keys -> n_pairs values (distinct letters), and k shots
    "kv" of it drawn at random: (keys, values, the shots as text)."""
    letters = rng.sample(ALPHABET, 2 * n_pairs)
    keys, values = letters[:n_pairs], letters[n_pairs:]
    return keys, values, "".join(keys[i] + values[i] for i in (rng.randrange(n_pairs) for _ in range(k)))


def make_dataset(folder, s, repeat_fraction, seed=0):
    """The corpus as a char-level dataset (train.py --dataset folder), made once."""
    if os.path.exists(os.path.join(folder, "meta.json")):
        return folder
    text = ALPHABET + corpus(s["corpus_chars"], repeat_fraction, s["span"], seed, s["repeats"], s["episodes"])
    path = os.path.join(folder, "corpus.txt")
    atomic_write(path, lambda f: f.write(text), text=True)
    return prepare(path, "char", out=folder, verbose=False)


def repeated_tokens(tok, n, batch, seed=0):
    """[A A]: A is n distinct random letters, so each token of the second A has exactly one
    earlier occurrence. (batch, 2n) token ids."""
    rng = random.Random(seed)
    return torch.tensor([tok.encode("".join(rng.sample(ALPHABET, n)) * 2) for _ in range(batch)])


def mapping_episodes(tok, k, n, n_pairs=4, seed=0):
    """n episodes of a fresh random mapping: K shots, then a query key. Returns the prompts
    (n, 2K + 1), the candidate values (n, n_pairs) and the index of the right one (n,)."""
    rng = random.Random(seed)
    prompts, choices, gold = [], [], []
    for _ in range(n):
        keys, values, text = shots(rng, k, n_pairs)
        q = rng.randrange(n_pairs)
        prompts.append(tok.encode(text + keys[q]))
        choices.append(tok.encode("".join(values)))
        gold.append(q)
    return torch.tensor(prompts), torch.tensor(choices), torch.tensor(gold)


# ----------------------------------------------------------------------------- the scores
def prefix_matching_score(att, n):
    """Olsson's prefix matching. att: (B, H, 2n, 2n), attention on [A A] -> (H,): the mean
    attention from each token t of the second A (t = n .. 2n - 1) to the token after its
    earlier occurrence, t - n + 1."""
    t = torch.arange(n, 2 * n)
    return att[:, :, t, t - n + 1].mean((0, 2))


def previous_token_score(att):
    """att: (B, H, T, T) -> (H,): the mean attention from each token to the one before it
    (the first half of an induction circuit, in layer 0)."""
    t = torch.arange(1, att.shape[-1])
    return att[:, :, t, t - 1].mean((0, 2))


def copying_score(ov):
    """Olsson's copying, as Elhage et al. measure it: ov (..., V, V), the logits each token
    produces by passing through a head's OV circuit -> (...): sum(eigenvalues) /
    sum(|eigenvalues|). A head that copies (ov ~ a positive multiple of the identity) scores 1."""
    ev = torch.linalg.eigvals(ov.double())
    return (ev.sum(-1).real / ev.abs().sum(-1)).float()


def ov_circuits(model, layer):
    """(n_head, V, V): W_U diag(g) W_O^h W_V^h attention_norm(W_E)^T for each head of a layer:
    the logits a token writes when a head attends to it, along the direct path (the norms'
    gains included, their per-token scale not)."""
    c, att = model.config, model.layers[layer].attention
    hd, n_rep = c.head_dim, c.n_head // c.n_kv_head
    e = model.layers[layer].attention_norm(model.tok_embeddings.weight)  # (V, C)
    u = model.output.weight * model.norm.weight  # (V, C): W_U diag(g)
    out = []
    for h in range(c.n_head):
        wv = att.wv.weight[(h // n_rep) * hd:(h // n_rep + 1) * hd]  # (hd, C)
        wo = att.wo.weight[:, h * hd:(h + 1) * hd]  # (C, hd)
        out.append(u @ wo @ wv @ e.T)  # (V, V): [logit of y, source token x]
    return torch.stack(out)


def per_token_loss(model, ids):
    """ids (B, T + 1) -> the cross-entropy of each next-token prediction, (B, T)."""
    logits, _ = model(ids[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


def icl_score(losses, early, late):
    """Olsson's in-context-learning score: the loss late in the context minus the loss early
    in it (negative: later tokens are predicted better because the context helps).
    losses (B, T); early, late: slices of positions, averaged."""
    return (losses[:, late].mean() - losses[:, early].mean()).item()


def attention_maps(model, idx):
    """logits (B, T, V) and each layer's attention weights (B, H, T, T), by the explicit path."""
    for layer in model.layers:
        layer.attention.attn_impl, layer.attention.save_weights = "math", True
    logits, _ = model(idx)
    return logits, [layer.attention.weights for layer in model.layers]


def ablate(model, heads):
    """The model with the given heads' outputs zeroed: their columns of W_O, so they write
    nothing into the residual stream. heads: [(layer, head)]. Changes model in place."""
    hd = model.config.head_dim
    for layer, h in heads:
        model.layers[layer].attention.wo.weight.data[:, h * hd:(h + 1) * hd] = 0
    return model


def mapping_correct(model, prompts, choices, gold):
    """How many episodes the model answers right: the argmax of its next-token logits over the
    mapping's values (chance: 1 / number of values)."""
    logits, _ = model(prompts)
    picked = logits[:, -1].gather(1, choices).argmax(-1)  # (n,)
    return int((picked == gold).sum())


def wilson(correct, n, z=1.96):
    """The 95% Wilson score interval of a proportion (low, high)."""
    p = correct / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    return centre - half, centre + half


# ----------------------------------------------------------------------------- measuring a model
def probes(tok, s, repeat_fraction):
    """The fixed inputs every measurement reads: [A A] sequences, held-out windows of the
    training distribution, and K = 8 mapping episodes."""
    text = corpus(s["n_score"] * (s["block_size"] + 1) * 2, repeat_fraction, s["span"], 12345, s["repeats"],
                  s["episodes"])
    ids = torch.tensor(tok.encode(text))[:s["n_score"] * (s["block_size"] + 1)].view(s["n_score"], -1)
    return {"repeated": repeated_tokens(tok, s["probe_len"], s["n_score"]), "windows": ids,
            "episodes": mapping_episodes(tok, 8, s["n_episodes"], seed=1)}


@torch.no_grad()
def measure(model, p):
    """Every head's prefix-matching, previous-token and copying scores; the loss on the first
    and the second A of [A A]; the in-context-learning score; the K = 8 mapping accuracy."""
    idx = p["repeated"]
    n = idx.shape[1] // 2
    logits, maps = attention_maps(model, idx)
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), idx[:, 1:], reduction="none").mean(0)  # (2n - 1,)
    T = p["windows"].shape[1] - 1
    losses = per_token_loss(model, p["windows"])  # (B, T)
    return {"prefix_matching": [prefix_matching_score(a, n).tolist() for a in maps],
            "previous_token": [previous_token_score(a).tolist() for a in maps],
            "copying": [copying_score(ov_circuits(model, i)).tolist() for i in range(len(maps))],
            "loss_first": loss[:n - 1].mean().item(), "loss_second": loss[n:].mean().item(),
            "icl_score": icl_score(losses, slice(T // 16, T // 8), slice(T - T // 8, T)),
            "mapping_k8": mapping_correct(model, *p["episodes"]) / len(p["episodes"][2])}


def best_head(prefix_matching):
    """(layer, head) with the highest prefix-matching score."""
    flat = torch.tensor(prefix_matching)
    layer, head = divmod(int(flat.argmax()), flat.shape[1])
    return layer, head


# ----------------------------------------------------------------------------- training, measured along the way
def train_measured(job):
    """train.py on a dataset, stopped every s["every"] steps and resumed (bit for bit the run
    that would not have stopped), measured at each stop. job: (out_dir, dataset, s, n_layer,
    seed, repeat_fraction). Returns the trajectory and the run's CPU seconds."""
    out_dir, dataset, s, n_layer, seed, repeat_fraction = job
    torch.set_num_threads(1)
    cpu = time.process_time()
    train.peak_flops = lambda device, dtype: None  # the CPU FLOP/s probe only feeds the MFU log line
    if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        os.remove(os.path.join(out_dir, "ckpt.pt"))  # this experiment's run from an earlier invocation
    p = probes(load_tokenizer(dataset), s, repeat_fraction)
    argv = ["--dataset", dataset, "--out_dir", out_dir, "--n_layer", str(n_layer), "--n_embd", str(s["n_embd"]),
            "--n_head", str(s["n_head"]), "--n_kv_head", str(s["n_head"]), "--block_size", str(s["block_size"]),
            "--batch_size", str(s["batch"]), "--learning_rate", str(s["lr"]), "--min_lr", str(s["min_lr"]),
            "--warmup_iters", str(s["iters"] // 20), "--lr_decay_iters", str(s["iters"]), "--eval_iters", "4",
            "--eval_interval", str(s["every"]), "--log_interval", str(s["iters"]), "--seed", str(seed)]
    trajectory = []
    for step in range(0, s["iters"] + 1, s["every"]):  # max_iters 0: the initial weights, evaluated and saved
        cfg, model_args, explicit = train.parse_args(argv + ["--max_iters", str(step)] + (["--resume"] if step else []))
        train.plot_losses = runs.plot_losses if step == s["iters"] else lambda *args: None  # loss.png once
        with contextlib.redirect_stdout(io.StringIO()):  # train.py's log, 13 times over
            history = train.train(cfg, model_args, explicit)
        model, _, _ = load_run(out_dir)
        trajectory.append({"step": step, "val_loss": history["val_loss"][-1], **measure(model, p)})
    print(f"trained {out_dir}: best prefix matching {max(max(r) for r in trajectory[-1]['prefix_matching']):.2f}",
          flush=True)
    return {"trajectory": trajectory, "cpu_seconds": time.process_time() - cpu,
            "step_seconds": history["step_seconds"], "params": count_params(model.config)}


# ----------------------------------------------------------------------------- the ablation and the shots
ABLATIONS = ("none", "induction head", "previous-token head", "another layer-1 head")


@torch.no_grad()
def ablation(out_dir, p, s):
    """Olsson's causal argument on one trained 2-layer model: zero one head at a time and
    measure again. The heads: the layer-1 head with the best prefix matching (where an
    induction head must be), the best previous-token head of layer 0, and the layer-1 head
    with the lowest prefix matching."""
    model, _, _ = load_run(out_dir)
    m = measure(model, p)
    pm, prev = torch.tensor(m["prefix_matching"]), torch.tensor(m["previous_token"])
    heads = {"none": [], "induction head": [(1, int(pm[1].argmax()))],
             "previous-token head": [(0, int(prev[0].argmax()))],
             "another layer-1 head": [(1, int(pm[1].argmin()))]}
    rows = {}
    for name, ablated in heads.items():
        r = measure(ablate(load_run(out_dir)[0], ablated), p)
        rows[name] = {"heads": ablated, "loss_first": r["loss_first"], "loss_second": r["loss_second"],
                      "mapping_k8": r["mapping_k8"], "icl_score": r["icl_score"]}
    return rows


@torch.no_grad()
def learning_from_shots(out_dir, s):
    """Learning from the shots: correct answers out of n fresh random mappings, per K."""
    model, tok, _ = load_run(out_dir)
    return {str(k): mapping_correct(model, *mapping_episodes(tok, k, s["n_episodes"], seed=100 + k))
            for k in s["shots"]}  # str keys, as in the JSON


def phase_step(trajectory):
    """The first logged step where the best head's prefix matching reaches PHASE_THRESHOLD (None: never)."""
    return next((r["step"] for r in trajectory if max(max(h) for h in r["prefix_matching"]) >= PHASE_THRESHOLD), None)


# ----------------------------------------------------------------------------- the tables and the figure
def best(row, key="prefix_matching"):
    return max(max(h) for h in row[key])


def spread(values, fmt="{:.2f}"):
    """'mean (min-max)' over seeds; one value alone."""
    values = [v for v in values if v is not None]
    if not values:
        return "never"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(sum(values) / len(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def runs_of(results, n_layer, fraction=None):
    fraction = results["settings"]["repeat_fraction"] if fraction is None else fraction
    return {k: r for k, r in results["runs"].items() if r["n_layer"] == n_layer and r["repeat_fraction"] == fraction}


def tables(results):
    """The markdown tables README.md and EXERCISES.md show (experiments/docs.py)."""
    s = results["settings"]
    out = {}
    lines = ["| model | seed | parameters | best head (layer, head) | prefix matching | copying | previous-token "
             "head (layer 0) | phase change at step | in-context-learning score | val loss | CPU seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, n_layer in MODELS.items():
        for run, r in runs_of(results, n_layer).items():
            last = r["trajectory"][-1]
            layer, head = best_head(last["prefix_matching"])
            lines.append(f"| {name} | {r['seed']} | {r['params']:,} | ({layer}, {head}) | "
                         f"{last['prefix_matching'][layer][head]:.2f} | {last['copying'][layer][head]:.2f} | "
                         f"{max(last['previous_token'][0]):.2f} | {r['phase_step'] or 'never'} | "
                         f"{last['icl_score']:.2f} | {last['val_loss']:.2f} | {r['cpu_seconds']:.0f} |")
    out["phase"] = "\n".join(lines)
    rows = list(results["ablation"].values())
    lines = ["| head zeroed | loss on the first A | loss on the second A | mapping accuracy, K = 8 |",
             "|---|---|---|---|"]
    for name in ABLATIONS:
        lines.append(f"| {name} | " + " | ".join(spread([r[name][k] for r in rows]) for k in
                                                   ("loss_first", "loss_second", "mapping_k8")) + " |")
    out["ablation"] = "\n".join(lines) + f"\n\nMean (range) over {len(rows)} seeds of the 2-layer model; " \
        f"{s['n_score']} sequences [A A] of {s['probe_len']} distinct letters; chance on the mapping " \
        f"{results['chance']:.2f}."
    lines = ["| seed | previous-token head (layer, head): score | loss on the second A: intact / without it / "
             "without the induction head | mapping, K = 8: intact / without it / without the induction head |",
             "|---|---|---|---|"]
    for run, r in results["ablation"].items():
        layer, head = r["previous-token head"]["heads"][0]
        score = results["runs"][run]["trajectory"][-1]["previous_token"][layer][head]
        lines.append(f"| {results['runs'][run]['seed']} | ({layer}, {head}): {score:.2f} | " + " | ".join(
            " / ".join(f"{r[a][key]:.2f}" for a in ("none", "previous-token head", "induction head"))
            for key in ("loss_second", "mapping_k8")) + " |")
    out["previous"] = "\n".join(lines) + f"\n\nThe loss on the first A (no earlier occurrence: the letters are " \
        f"a 1 in 52 guess) is {spread([r['none']['loss_first'] for r in rows])}; chance on the mapping " \
        f"{results['chance']:.2f}."
    lines = ["| model | " + " | ".join(f"K = {k}" for k in s["shots"]) + " |", "|---|" + "---|" * len(s["shots"])]
    for name, n_layer in MODELS.items():
        cells = []
        for k in s["shots"]:
            correct = sum(results["shots"][run][str(k)] for run in runs_of(results, n_layer))
            n = s["n_episodes"] * len(runs_of(results, n_layer))
            low, high = wilson(correct, n)
            cells.append(f"{correct / n:.2f} [{low:.2f}, {high:.2f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out["shots"] = "\n".join(lines) + f"\n\nAccuracy [95% Wilson interval] over {s['n_episodes']} fresh " \
        f"mappings x {s['seeds']} seeds; chance {results['chance']:.2f}."
    lines = ["| spans repeated | phase change at step (per seed) | best prefix matching at the end |", "|---|---|---|"]
    for f in [s["repeat_fraction"], *s["sweep"]]:
        rs = runs_of(results, 2, f).values()
        lines.append(f"| {f:.0%} | {', '.join(str(r['phase_step'] or 'never') for r in rs)} | "
                     f"{spread([best(r['trajectory'][-1]) for r in rs])} |")
    out["sweep"] = "\n".join(lines) + f"\n\nPhase change: the first logged step (every {s['every']}) where the " \
        f"best head's prefix matching reaches {results['phase_threshold']}; {s['iters']} steps in all."
    out["time"] = f"{results['wall_seconds'] / 60:.1f} minutes of wall time, {results['cpu_seconds'] / 60:.1f} " \
        f"minutes of CPU time ({s['workers']} processes, {len(results['runs'])} runs)"
    return out


def plot(results):
    pyplot = plt()
    s = results["settings"]
    fig, axes = pyplot.subplots(3, 2, figsize=(13, 10))
    for ax in axes[1:, 0]:  # the left column: one step axis
        ax.sharex(axes[0, 0])
    colors = {"L2": "C0", "L1": "C3"}
    for name, n_layer in MODELS.items():
        for i, r in enumerate(runs_of(results, n_layer).values()):
            steps = [row["step"] for row in r["trajectory"]]
            label = f"{name}" if i == 0 else None
            axes[0, 0].plot(steps, [best(row) for row in r["trajectory"]], color=colors[name], label=label)
            if n_layer == 2:
                axes[0, 0].plot(steps, [max(row["previous_token"][0]) for row in r["trajectory"]], ":",
                                color=colors[name], label="L2, best previous-token head (layer 0)" if i == 0 else None)
            axes[1, 0].plot(steps, [row["icl_score"] for row in r["trajectory"]], color=colors[name], label=label)
            axes[2, 0].plot(steps, [row["val_loss"] for row in r["trajectory"]], color=colors[name], label=label)
    axes[0, 0].axhline(results["uniform_prefix_matching"], color="gray", ls="--", lw=0.8, label="uniform attention")
    axes[0, 0].set(ylim=(0, 1), ylabel="best head's prefix matching", title=f"induction: the phase change "
                   f"({s['seeds']} seeds each)")
    axes[1, 0].axhline(0, color="gray", lw=0.8)
    axes[1, 0].set(ylabel="ICL score (nats):\nloss late - loss early in the context")
    axes[2, 0].set(xlabel="training step", ylabel="validation loss (nats per letter)")
    for ax in axes[:, 0]:
        ax.legend(fontsize=7)
    ks = s["shots"]
    for name, n_layer in MODELS.items():
        runs = runs_of(results, n_layer)
        n = s["n_episodes"] * len(runs)
        acc = [sum(results["shots"][run][str(k)] for run in runs) / n for k in ks]
        ci = [wilson(a * n, n) for a in acc]
        axes[0, 1].errorbar(range(len(ks)), acc, yerr=[[a - lo for a, (lo, _) in zip(acc, ci)],
                                                       [hi - a for a, (_, hi) in zip(acc, ci)]],
                            marker="o", capsize=3, color=colors[name], label=name)
    axes[0, 1].axhline(results["chance"], color="gray", ls="--", lw=0.8, label="chance")
    axes[0, 1].set(xticks=range(len(ks)), xticklabels=ks, ylim=(0, 1), xlabel="K (shots in the prompt)",
                   ylabel="accuracy (95% interval)", title="learning from the shots: a fresh random mapping")
    axes[0, 1].legend(fontsize=7)
    rows = list(results["ablation"].values())
    for j, (key, label) in enumerate((("loss_first", "first A"), ("loss_second", "second A"))):
        means = [sum(r[a][key] for r in rows) / len(rows) for a in ABLATIONS]
        axes[1, 1].bar([i + 0.4 * j for i in range(len(ABLATIONS))], means, 0.4, label=f"loss on the {label}")
        for i, a in enumerate(ABLATIONS):
            axes[1, 1].plot([i + 0.4 * j] * len(rows), [r[a][key] for r in rows], "k.", ms=3)
    axes[1, 1].set(xticks=[i + 0.2 for i in range(len(ABLATIONS))], ylim=(0, None),
                   xticklabels=[a.replace(" ", "\n", 1) for a in ABLATIONS], ylabel="loss on [A A] (nats)",
                   title="ablation: one head's output zeroed (L2, dots: seeds)")
    axes[1, 1].legend(fontsize=7)
    for f, style in zip([s["repeat_fraction"], *s["sweep"]], ("-", "--", ":")):
        for i, r in enumerate(runs_of(results, 2, f).values()):
            axes[2, 1].plot([row["step"] for row in r["trajectory"]], [best(row) for row in r["trajectory"]], style,
                            color=f"C{i}", label=f"{f:.0%} of spans repeated, seed {r['seed']}")
    axes[2, 1].axhline(results["phase_threshold"], color="gray", lw=0.8)
    axes[2, 1].set(ylim=(0, 1), xlabel="training step", ylabel="L2's best prefix matching",
                   title="when the phase change comes (exercise)")
    axes[2, 1].legend(fontsize=7)
    return fig


# ----------------------------------------------------------------------------- the experiment
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, no sweep: the direction of the effect")
    args = p.parse_args()
    s = QUICK if args.quick else FULL
    wall, cpu = time.time(), time.process_time()
    root = os.path.join(OUT, "induction" + ("_quick" if args.quick else ""))
    fractions = [s["repeat_fraction"], *s["sweep"]]
    datasets = {f: make_dataset(os.path.join(root, f"data_{f}"), s, f) for f in fractions}
    jobs = {}  # run name -> (out_dir, dataset, s, n_layer, seed, repeat_fraction)
    for name, n_layer in MODELS.items():
        for seed in range(s["seeds"]):
            run = name + (f"_seed{seed}" if seed else "")  # L2 and L1: seed 0, for runs.load_run and sample.py
            f = s["repeat_fraction"]
            jobs[run] = (os.path.join(root, run), datasets[f], s, n_layer, seed, f)
    for f in s["sweep"]:
        for seed in range(s["sweep_seeds"]):
            run = f"L2_repeat{f}_seed{seed}"
            jobs[run] = (os.path.join(root, run), datasets[f], s, 2, seed, f)
    with multiprocessing.get_context("fork").Pool(s["workers"]) as pool:  # the runs are independent: one per core
        done = dict(zip(jobs, pool.map(train_measured, jobs.values())))
    children = sum(r["cpu_seconds"] for r in done.values())

    probe = probes(load_tokenizer(datasets[s["repeat_fraction"]]), s, s["repeat_fraction"])
    results = {"quick": args.quick, "settings": {k: v for k, v in s.items()}, "chance": 1 / 4,
               "phase_threshold": PHASE_THRESHOLD, "runs": {}, "ablation": {}, "shots": {}}
    for run, (out_dir, _, _, n_layer, seed, f) in jobs.items():
        results["runs"][run] = {"n_layer": n_layer, "seed": seed, "repeat_fraction": f, **done[run],
                                "phase_step": phase_step(done[run]["trajectory"])}
        if f == s["repeat_fraction"]:
            results["shots"][run] = learning_from_shots(out_dir, s)
            if n_layer == 2:
                results["ablation"][run] = ablation(out_dir, probe, s)
    n = len(probe["repeated"][0]) // 2
    results["uniform_prefix_matching"] = sum(1 / (t + 1) for t in range(n, 2 * n)) / n  # a head that attends uniformly
    results["cpu_seconds"] = time.process_time() - cpu + children
    results["wall_seconds"] = time.time() - wall
    print(f"{results['wall_seconds']:.0f} s of wall time, {results['cpu_seconds']:.0f} s of CPU time")
    for key, table in tables(results).items():
        print(f"\n{key}:\n{table}")
    write("induction", args.quick, results, plot(results))


if __name__ == "__main__":
    main()
