"""In-context learning in miniature: GPT-3's figure 1.2 on models a CPU trains in minutes.

    python experiments/icl.py [--quick]

GPT-3 (Brown et al. 2020, arXiv:2005.14165) figure 1.2: on a task that removes random
symbols inserted into a word, accuracy rises with the number K of examples in the
prompt, more steeply for larger models, and a natural-language task description helps
most at K = 0. Here, character-level models of three sizes are trained (train.py) on a
corpus that mixes Python's documentation (pydoc topics) with synthetic episodes:

  - three word tasks on the same kind of input, a word with symbols inserted ("c#a@t"):
    "clean" (remove the symbols: cat), "upper" (and capitalize: CAT), "symbols" (keep
    only them: #@). The input alone does not say which: the shots (or the description)
    must. Scored by evaluate.py as multiple choice among the three answers (chance 1/3).
  - a random mapping, fresh in every episode: a word's first letter decides its digit
    ("kite -> 7"). Nothing learned in the weights helps: only a shot with the same first
    letter does (chance 1/3 among the mapping's three digits).

Episodes are written as evaluate.build_prompt lays out a K-shot prompt (K = 0 .. 8,
half of them after a task description) in two templates, "x ->" and "Input: x\\nOutput:";
a third, "Q: x\\nA:", never appears in training (prompt sensitivity). The test words
never appear in training episodes. Then, per model: accuracy against K with and without
the description (shots drawn with several seeds: the spread is shown), exact match of
greedy answers on "clean", the three templates at K = 4, and induction heads (Olsson et
al. 2022, arXiv:2209.11895): on a random string repeated twice, the attention of each
token to the token after its previous occurrence (induction.prefix_matching_score). Every
gain here is the shots identifying a task the weights already hold; learning from the
shots themselves (a fresh mapping answered by copying) needs induction heads, and
experiments/induction.py grows them and measures it. Writes experiments/out/icl.{json,png}.
"""

import argparse
import os
import random
import re
import string
import warnings

from common import OUT, plt, run, write

import torch  # noqa: E402

import evaluate  # noqa: E402
from checkpoint import atomic_write  # noqa: E402
from data.prepare import prepare  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from model import ModelConfig, Transformer, count_params  # noqa: E402
from induction import prefix_matching_score  # noqa: E402
from train import load_checkpoint  # noqa: E402

SYMBOLS = "#@!%&*+=~^"
WORD_TASKS = {  # name: (description, answer of a word with symbols inserted)
    "clean": ("Remove the symbols from each word.", lambda x: "".join(c for c in x if c not in SYMBOLS)),
    "upper": ("Write each word in capitals, without symbols.", lambda x: "".join(c.upper() for c in x
                                                                                  if c not in SYMBOLS)),
    "symbols": ("Keep only the symbols of each word.", lambda x: "".join(c for c in x if c in SYMBOLS)),
}
MAPPING_DESCRIPTION = "The first letter of each word decides its digit."
TEMPLATES = {"arrow": "{} ->", "io": "Input: {}\nOutput:", "qa": "Q: {}\nA:"}  # qa: never trained on
TRAIN_TEMPLATES = ("arrow", "io")
SIZES = {  # name: model and training sizes (characters, so block_size holds an 8-shot prompt)
    "S": dict(n_layer=2, n_embd=32, n_head=2),
    "M": dict(n_layer=2, n_embd=64, n_head=4),
    "L": dict(n_layer=3, n_embd=96, n_head=4),
}
FULL = dict(block_size=192, batch=8, iters=600, eval_iters=5, shots=[0, 1, 2, 4, 8], n_test=30, seeds=3,
            n_maps=8, episodes=20000, topics=None)
QUICK = dict(block_size=96, batch=2, iters=4, eval_iters=1, shots=[0, 1, 2], n_test=3, seeds=1, n_maps=1,
             episodes=100, topics=20, sizes=dict(S=dict(n_layer=2, n_embd=16, n_head=2)))


# ----------------------------------------------------------------------------- the data
def word_lists(seed=0):
    """Lowercase words of 4-7 letters from the pydoc topics, split into train and test words."""
    from pydoc_data.topics import topics
    words = sorted(set(re.findall(r"\b[a-z]{4,7}\b", " ".join(topics.values()))))
    random.Random(seed).shuffle(words)
    n_test = len(words) // 5
    return words[n_test:], words[:n_test]


def insert_symbols(word, rng):
    """GPT-3's "random insertion in word": a symbol between some of the letters (1 to 3)."""
    chars = list(word)
    for pos in sorted(rng.sample(range(1, len(word)), rng.randint(1, min(3, len(word) - 1))), reverse=True):
        chars.insert(pos, rng.choice(SYMBOLS))
    return "".join(chars)


def word_task(task, words, rng, n, template="arrow"):
    """n examples of a word task in evaluate.py's format: the three tasks' answers as choices."""
    docs = []
    for word in rng.sample(words, n):
        x = insert_symbols(word, rng)
        choices = [fn(x) for _, fn in WORD_TASKS.values()]
        docs.append({"query": TEMPLATES[template].format(x), "choices": choices, "gold": list(WORD_TASKS).index(task),
                     "answer": WORD_TASKS[task][1](x), "until": ["\n"]})
    return docs


def mapping_task(words, rng, n_train, n_test, template="arrow"):
    """One random mapping (3 first letters -> 3 digits): n_train shots' words and n_test test words."""
    by_letter = {}
    for w in words:
        by_letter.setdefault(w[0], []).append(w)
    letters = rng.sample(sorted(k for k, v in by_letter.items() if len(v) >= n_train + n_test), 3)
    digits = rng.sample("0123456789", 3)
    docs = []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            j = i % 3
            word = by_letter[letters[j]].pop(rng.randrange(len(by_letter[letters[j]])))
            docs.append({"query": TEMPLATES[template].format(word), "choices": sorted(digits),
                         "gold": sorted(digits).index(digits[j]), "split": split})
    return docs


def episode(words, rng):
    """One training episode: K = 0 .. 8 shots of a task, then the query and its answer."""
    template = rng.choice(TRAIN_TEMPLATES)
    k = rng.randint(0, 8)
    if rng.random() < 0.25:
        docs, description = mapping_task(words, rng, 0, k + 1, template), MAPPING_DESCRIPTION
    else:
        task = rng.choice(list(WORD_TASKS))
        docs, description = word_task(task, words, rng, k + 1, template), WORD_TASKS[task][0]
    prompt = evaluate.build_prompt(docs[-1], docs[:-1], description if rng.random() < 0.5 else "")
    return prompt + evaluate.TARGET_DELIMITER + evaluate.target(docs[-1])


def make_dataset(folder, n_episodes, n_topics=None, seed=0):
    """pydoc topics and episodes, interleaved paragraph by paragraph, as a char-level dataset."""
    if os.path.exists(os.path.join(folder, "meta.json")):
        return folder
    from pydoc_data.topics import topics
    rng = random.Random(seed)
    train_words, _ = word_lists()
    parts = [topics[k] for k in sorted(topics)[:n_topics]] + [episode(train_words, rng) for _ in range(n_episodes)]
    rng.shuffle(parts)
    parts.insert(0, string.ascii_letters + string.digits + SYMBOLS)  # every character a task may use
    path = os.path.join(folder, "corpus.txt")
    atomic_write(path, lambda f: f.write("\n\n\n".join(parts)), text=True)
    return prepare(path, "char", out=folder, verbose=False)


# ----------------------------------------------------------------------------- measuring
def eval_sets(s, seed=1):
    """The test sets (fixed for every model): word tasks per template, and random mappings."""
    train_words, test_words = word_lists()
    rng = random.Random(seed)
    sets = {}
    for template in TEMPLATES:
        for task in WORD_TASKS:  # shots from training words, test examples from held-out words
            shots = [{**d, "split": "train"} for d in word_task(task, train_words, rng, 24, template)]
            sets[(task, template)] = shots + word_task(task, test_words, rng, s["n_test"], template)
    sets[("mapping", "arrow")] = [mapping_task(test_words, rng, 12, max(s["n_test"] // 5, 3))
                                  for _ in range(s["n_maps"])]
    return sets


def accuracy(model, tok, docs, k, seed, description, norm="token"):
    if isinstance(docs[0], list):  # several mappings: the mean over them
        return sum(accuracy(model, tok, d, k, seed, description, norm) for d in docs) / len(docs)
    return evaluate.evaluate_choices(model, tok, docs, k, seed, description)["accuracy"][norm]


def curves(model, tok, sets, s):
    """Accuracy against K, with and without the description, per seed of the shot draw."""
    out = {}
    for task in [*WORD_TASKS, "mapping"]:
        docs = sets[(task, "arrow")]
        description = MAPPING_DESCRIPTION if task == "mapping" else WORD_TASKS[task][0]
        for with_desc in (False, True):
            out[f"{task}|{'description' if with_desc else 'none'}"] = [
                [accuracy(model, tok, docs, k, seed, description if with_desc else "") for seed in range(s["seeds"])]
                for k in s["shots"]]
    return out


def induction_scores(model, n_vocab, length=24, n=4, seed=0):
    """Per layer and head: mean attention from each token of a repeated random string to the
    token after its earlier occurrence (an induction head puts most of its weight there)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(n_vocab, (n, length), generator=g)
    idx = torch.cat([first, first], dim=1)  # (n, 2 * length)
    for layer in model.layers:
        layer.attention.save_weights = True
    with torch.no_grad():
        model(idx)
    scores = [prefix_matching_score(layer.attention.weights, length) for layer in model.layers]
    maps = [layer.attention.weights[0] for layer in model.layers]  # (n_head, 2L, 2L) each
    return torch.stack(scores), maps  # (n_layer, n_head)


def induction(row, model, tok):
    """The induction scores of every head, and the attention map of the best one, into row."""
    scores, maps = induction_scores(model, tok.n_vocab)
    layer, head = divmod(int(scores.argmax()), scores.shape[1])
    row["induction_scores"] = scores.tolist()
    row["best_head"] = [layer, head]
    row["induction_map"] = [[round(x, 4) for x in r] for r in maps[layer][head].tolist()]


def load_math(out_dir):
    """The trained model with the explicit attention path, so it can keep its attention weights."""
    ckpt = load_checkpoint(out_dir)
    model = Transformer(ModelConfig.from_dict({**ckpt["model_config"], "attn_impl": "math"}))
    model.load_state_dict(ckpt["model"])
    return model.eval(), load_tokenizer(out_dir)


# ----------------------------------------------------------------------------- the figure
def plot(results, s):
    pyplot = plt()
    names = list(results["models"])
    fig, axes = pyplot.subplots(2, 3, figsize=(15, 8.5))
    for ax, name in zip(axes[0], names[-3:]):
        acc = results["models"][name]["curves"]
        for desc, style in (("none", "--"), ("description", "-")):
            for label, tasks, color in (("word tasks (mean of 3)", list(WORD_TASKS), "C0"),
                                        ("random mapping", ["mapping"], "C3")):
                per_seed = [[sum(acc[f"{t}|{desc}"][k][seed] for t in tasks) / len(tasks)
                             for seed in range(s["seeds"])] for k in range(len(s["shots"]))]
                x = range(len(s["shots"]))
                ax.plot(x, [sum(a) / len(a) for a in per_seed], style, color=color, marker="o",
                        label=f"{label}, {'with' if desc == 'description' else 'no'} description")
                ax.fill_between(x, [min(a) for a in per_seed], [max(a) for a in per_seed], color=color, alpha=0.15)
        ax.axhline(1 / 3, color="gray", lw=0.8, ls=":")
        ax.set(xticks=range(len(s["shots"])), xticklabels=s["shots"], ylim=(0, 1.02),
               xlabel="K (examples in the prompt)", ylabel="accuracy (per-token log-likelihood)",
               title=f"model {name}: {results['models'][name]['params']:,} parameters")
    axes[0, 0].legend(fontsize=7)
    big = results["models"][names[-1]]
    layer, head = big["best_head"]
    image = axes[1, 0].imshow(big["induction_map"], cmap="viridis")
    fig.colorbar(image, ax=axes[1, 0], label="attention weight")
    L = len(big["induction_map"]) // 2
    axes[1, 0].plot(range(1, L + 1), range(L, 2 * L), "w:", lw=0.8)  # key = query - L + 1: an induction head
    axes[1, 0].set(title=f"model {names[-1]}, layer {layer} head {head}\nrandom string repeated twice "
                         f"(dotted: induction target)", xlabel="key position", ylabel="query position")
    for i, name in enumerate(names):  # every head of every model: an induction head stands out
        flat = [x for row in results["models"][name]["induction_scores"] for x in row]
        axes[1, 1].scatter([i] * len(flat), flat, color=f"C{i}", label=f"model {name}")
    L = len(big["induction_map"]) // 2
    uniform = sum(1 / (t + 1) for t in range(L, 2 * L)) / L  # the score of a head that attends uniformly
    axes[1, 1].axhline(uniform, color="gray", ls=":", lw=0.8, label="uniform attention")
    axes[1, 1].legend(fontsize=7)
    axes[1, 1].set(xticks=range(len(names)), xticklabels=names, xlabel="model", ylabel="prefix-matching score",
                   title="each head's attention to the token after\nthe previous occurrence (repeated string)")
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        t = results["models"][name]["templates"]
        axes[1, 2].bar([j + i * width for j in range(len(t))], [sum(v) / len(v) for v in t.values()], width,
                       yerr=[[sum(v) / len(v) - min(v) for v in t.values()], [max(v) - sum(v) / len(v)
                                                                             for v in t.values()]],
                       label=f"model {name}")
    axes[1, 2].set(xticks=[j + width * (len(names) - 1) / 2 for j in range(len(TEMPLATES))], xticklabels=[repr(v.format("x")) for v in TEMPLATES.values()],
                   ylim=(0, 1), ylabel=f"accuracy, word tasks, K={results.get('k_templates', min(4, s['shots'][-1]))}",
                   title="three templates (the last never trained on)\nbars: range over tasks and shot seeds")
    axes[1, 2].axhline(1 / 3, color="gray", lw=0.8, ls=":")
    axes[1, 2].legend(fontsize=7)
    return fig


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--replot", action="store_true", help="redraw from the JSON and the trained checkpoints")
    args = p.parse_args()
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"  # one line, no source excerpt
    s = QUICK if args.quick else FULL
    sizes = s.get("sizes", SIZES)
    root = os.path.join(OUT, "icl" + ("_quick" if args.quick else ""))
    dataset = make_dataset(os.path.join(root, "data"), s["episodes"], s["topics"])
    sets = eval_sets(s)
    k_templates = min(4, s["shots"][-1])
    if args.replot:
        import json
        with open(os.path.join(OUT, "icl" + ("_quick" if args.quick else "") + ".json")) as f:
            results = json.load(f)
        for name, row in results["models"].items():
            induction(row, *load_math(os.path.join(root, name)))
        return write("icl", args.quick, results, plot(results, s))
    results = {"shots": s["shots"], "seeds": s["seeds"], "k_templates": k_templates, "normalization": "token",
               "models": {}}
    for name, size in sizes.items():
        out_dir = os.path.join(root, name)
        history, seconds = run(out_dir, {**s, **size}, "--dataset", dataset, "--learning_rate", "3e-3")
        model, tok = load_math(out_dir)
        row = {**size, "params": count_params(model.config), "train_seconds": seconds,
               "val_loss": history["val_loss"][-1] if history.get("val_loss") else None}
        row["curves"] = curves(model, tok, sets, s)
        row["templates"] = {t: [accuracy(model, tok, sets[(task, t)], k_templates, seed, "")
                                for task in WORD_TASKS for seed in range(s["seeds"])] for t in TEMPLATES}
        em = {}
        for k in s["shots"]:
            docs = sets[("clean", "arrow")]
            em[k] = [evaluate.evaluate_generation(model, tok, docs, k, 0, d, max_gen_toks=12)["accuracy"]["exact_match"]
                     for d in ("", WORD_TASKS["clean"][0])]
        row["exact_match_clean"] = {"no_description": [em[k][0] for k in s["shots"]],
                                    "description": [em[k][1] for k in s["shots"]]}
        induction(row, model, tok)
        results["models"][name] = row
        print(f"model {name}: {row['params']:,} params, val loss {row['val_loss']}, best induction score "
              f"{max(max(r) for r in row['induction_scores']):.2f} (layer, head {row['best_head']})", flush=True)
        for key, acc in row["curves"].items():
            print(f"  {key:24s} " + " ".join(f"K={k}: {sum(a) / len(a):.2f}" for k, a in zip(s["shots"], acc)))
        print("  templates at K=%d: " % k_templates + ", ".join(f"{t} {sum(v) / len(v):.2f}"
                                                              for t, v in row["templates"].items()))
        print("  exact match, clean: " + str(row["exact_match_clean"]))
    fig = plot(results, s)
    write("icl", args.quick, results, fig)


if __name__ == "__main__":
    main()
