"""LLaVA's two stages, measured (Liu et al., arXiv:2304.08485 section 4.2, table 4's ablations
in miniature; LLaVA-1.5, arXiv:2310.03744 section 3.2, for the MLP projector).

    python experiments/llava.py            # minutes on a CPU
    python experiments/llava.py --quick    # seconds (smoke test): CLIP already above chance on shape

One CLIP-style vision encoder and one language-only decoder are pretrained (llava.py), then:
  - text prior: each question answered with its most frequent answer in the training data
    (no model: the best the words alone can do; chance on the conversation kind, whose answers
    are balanced: data/scenes.py)
  - text only: the decoder alone, no image
  - stage 1 only: + projector trained on captions (decoder frozen)
  - stage 2 only: + projector and decoder trained on the conversations from a fresh projector
  - stage 1 + 2: both, in order, with the MLP projector (LLaVA-1.5) and the linear one (LLaVA)
Each is scored on held-out scenes: the share of answers greedy decoding gets exactly right,
per question kind (conversation, detailed description, complex reasoning). CLIP is scored
zero-shot, and (seed 0) against a CLIP trained without the shape twins in its batches.
Writes experiments/out/llava.{json,png}; tables(results) are README's and EXERCISES' figures.
"""

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time

from common import OUT, plt, write  # first: it puts the repository root before this folder on sys.path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import llava  # noqa: E402
from data import scenes  # noqa: E402
from checkpoint import load_checkpoint, read_json, write_json  # noqa: E402

PARTS = ("main", "linear", "stage2_only", "clip_no_twins")
# --quick: every step count of llava.QUICK, but CLIP long enough to see shapes above chance
QUICK = {**llava.QUICK, "n_train": 512, "clip_batch": 64, "clip_iters": 150}
VARIANTS = ("text prior", "text only", "stage 1 only", "stage 2 only", "stage 1 + 2", "stage 1 + 2, linear")


class TextOnly(nn.Module):
    """The decoder alone, called like LlavaModel (for the text-only baseline)."""

    def __init__(self, llm):
        super().__init__()
        self.llm, self.n_image_tokens = llm, 0

    def forward(self, input_ids, pixel_values=None, targets=None):
        return self.llm(input_ids, targets)


def answer(model, tok, image, question):
    """Greedy answer to one question about one image."""
    ids = torch.tensor([llava.encode_prompt(tok, question, 1, model.n_image_tokens)])
    out = list(model.generate_tokens(ids, llava.pixel_values(image)[None], 30, 0.0, eos_id=tok.eot_token))
    return tok.decode([int(t[0]) for t in out if int(t[0]) != tok.eot_token])


def load_clip(path):
    ckpt = load_checkpoint(path)
    clip = llava.CLIP(llava.VisionConfig(**ckpt["model_config"]), len(ckpt["vocab"]))
    clip.load_state_dict(ckpt["model"])
    return clip.eval()


def wait_for(path):
    """A part run in another process may need the main part's checkpoint: wait for it."""
    while not os.path.exists(path):
        print(f"waiting for {path}")
        time.sleep(5)
    return llava.load(path)[0]


def train_part(tok, s, folder, part):
    """One seed is three or four parts that may run in parallel processes, each writing checkpoints to folder:
    main = llava.pipeline (CLIP, the language-only decoder, stage 1 and 2 with the MLP projector);
    linear = stage 1 and 2 with the linear projector; stage2_only = stage 2 from a fresh MLP projector;
    clip_no_twins (seed 0) = a CLIP trained without shape twins. A checkpoint already there is reused.
    Each checkpoint records the CPU seconds its part took."""
    stage1, cpu0 = os.path.join(folder, "stage1.pt"), time.process_time()
    if part == "main" and not os.path.exists(os.path.join(folder, "ckpt.pt")):
        llava.pipeline(folder, s, "mlp")
    if part == "clip_no_twins" and not os.path.exists(os.path.join(folder, "clip_no_twins.json")):
        plain = llava.Settings(**{**s.__dict__, "clip_twins": False})
        torch.manual_seed(s.seed)  # the same initial CLIP as the pipeline's: only the batches differ
        clip, _ = llava.train_clip(tok, llava.make_scenes(s.n_train, s.seed)[0], plain)
        write_json({"zero_shot": llava.zero_shot_accuracy(clip, tok, n=max(s.n_eval, 100)),
                    "cpu_seconds": time.process_time() - cpu0}, os.path.join(folder, "clip_no_twins.json"))
    files = {"linear": "stage12_linear.pt", "stage2_only": "stage2_only.pt"}
    if part in files and not os.path.exists(os.path.join(folder, files[part])):
        scenes, images = llava.make_scenes(s.n_train, s.seed)  # the pipeline's training scenes
        base = wait_for(stage1)
        torch.manual_seed(s.seed + (1 if part == "linear" else 2))
        projector = "linear" if part == "linear" else "mlp"
        model = llava.new_llava(tok, s, projector, base.vision, base.llm)  # the same CLIP and decoder, a new projector
        if part == "linear":
            llava.train_stage(model, 1, tok, scenes, images, s)
        llava.train_stage(model, 2, tok, scenes, images, s)
        llava.save(model, tok, os.path.join(folder, files[part]), {"cpu_seconds": time.process_time() - cpu0})


def evaluate_seed(tok, s, folder):
    """Zero-shot accuracy of the CLIP and answer accuracy of every variant (cached in folder/results.json)."""
    path = os.path.join(folder, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    cpu0 = time.process_time()
    files = {"stage 1 only": "stage1.pt", "stage 2 only": "stage2_only.pt", "stage 1 + 2": "ckpt.pt",
             "stage 1 + 2, linear": "stage12_linear.pt"}
    models = {name: wait_for(os.path.join(folder, f)) for name, f in files.items()}
    talks = [turns for turns, _ in llava.held_out(s)[2]]
    rows = {"text prior": scenes.text_prior(talks, np.random.default_rng(s.seed + 3)),
            "text only": llava.answer_accuracy(TextOnly(models["stage 1 only"].llm), tok, s, with_image=False)}
    rows.update({name: llava.answer_accuracy(m, tok, s) for name, m in models.items()})
    for name in VARIANTS:
        print(f"seed {s.seed} {name:20s}: " + ", ".join(f"{k} {v:.1%}" for k, v in rows[name].items()))
    cpu = {part: load_checkpoint(os.path.join(folder, f))["cpu_seconds"]
           for part, f in (("main", "ckpt.pt"), ("linear", "stage12_linear.pt"), ("stage2_only", "stage2_only.pt"))}
    result = {"seed": s.seed, "zero_shot": llava.zero_shot_accuracy(load_clip(os.path.join(folder, "clip.pt")), tok,
                                                                      n=max(s.n_eval, 100)),
              "accuracy": rows, "pipeline_seconds": load_checkpoint(os.path.join(folder, "ckpt.pt"))["seconds"]}
    no_twins = os.path.join(folder, "clip_no_twins.json")
    if os.path.exists(no_twins):
        plain = read_json(no_twins)
        result["zero_shot_no_twins"], cpu["clip_no_twins"] = plain["zero_shot"], plain["cpu_seconds"]
    cpu["evaluation"] = time.process_time() - cpu0
    result["cpu_seconds"] = cpu
    write_json(result, path)
    return result


def spread(values):
    """'a% / b%' over the seeds, in seed order."""
    return " / ".join(f"{v:.1%}" for v in values)


def tables(results):
    """README's and EXERCISES' figures, from the results JSON (experiments/docs.py)."""
    runs, seeds = results["runs"], " / ".join(str(r["seed"]) for r in results["runs"])
    zero = [f"| CLIP zero-shot, held-out one-object scenes (seeds {seeds}) | colour and shape | colour | shape |",
            "|---|---|---|---|",
            "| chance | 5.0% | 20.0% | 25.0% |"]
    zero.append("| shape twins in every batch (llava.py) | " +
                " | ".join(spread([r["zero_shot"][k] for r in runs]) for k in ("colour and shape", "colour", "shape"))
                + " |")
    plain = [r for r in runs if "zero_shot_no_twins" in r]
    if plain:
        zero.append(f"| without twins, seed {plain[0]['seed']} (the same steps) | " +
                    " | ".join(f"{plain[0]['zero_shot_no_twins'][k]:.1%}" for k in ("colour and shape", "colour",
                                                                                     "shape")) + " |")
    acc = [f"| held-out answers exactly right (seeds {seeds}) | " + " | ".join(scenes.KINDS) + " |",
           "|---" * (1 + len(scenes.KINDS)) + "|"]
    for name in VARIANTS:
        acc.append(f"| {name} | " + " | ".join(spread(results["accuracy"][name][k]) for k in scenes.KINDS) + " |")
    gain = [a - b for a, b in zip(results["accuracy"]["stage 1 + 2"]["conversation"],
                                  results["accuracy"]["text only"]["conversation"])]
    cpu = [sum(r["cpu_seconds"].values()) for r in runs]
    budget = ["| | figure |", "|---|---|",
              f"| stage 1 + 2 (MLP) minus text only, conversation kind (balanced answers) | "
              f"{' / '.join(f'{100 * g:+.1f} points' for g in gain)} (seeds {seeds}) |",
              f"| CPU time of `python experiments/llava.py` (user + sys, one thread per process) | "
              f"{sum(cpu):.0f} s in all ({' + '.join(f'{c:.0f} s' for c in cpu)}, seeds {seeds}) |"]
    return {"zero_shot": "\n".join(zero), "accuracy": "\n".join(acc), "budget": "\n".join(budget)}


def run_parts(parts, jobs, quick):
    """python experiments/llava.py --seed N --part P for each (N, P), at most `jobs` at once, in order
    (a part that needs its seed's stage 1 waits for it: the main parts come first; P = "": all of
    seed N's parts, cached, then its evaluation)."""
    waiting, running = list(parts), []
    while waiting or running:
        while waiting and len(running) < jobs:
            seed, part = waiting.pop(0)
            running.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--seed", str(seed),
                                             "--part", part] + ["--quick"] * quick))
        time.sleep(1)
        for proc in [p for p in running if p.poll() is not None]:
            if proc.returncode:
                raise SystemExit(f"error: {' '.join(proc.args[1:])} failed (its output is above); run it again alone")
            running.remove(proc)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--seed", type=int, default=None, help="this seed only (cached), no figure")
    p.add_argument("--part", default="", choices=["", *PARTS],
                   help="with --seed: one part of a seed (the default run starts each part as a process)")
    p.add_argument("--jobs", type=int, default=2, help="parts trained at once, one process (one thread) each")
    args = p.parse_args()
    s = llava.Settings(**(QUICK if args.quick else {}))
    tok = llava.WordTokenizer(llava.build_vocab())
    runs = []
    cache = os.path.join(OUT, "llava_runs" + ("_quick" if args.quick else ""))
    seeds = [args.seed] if args.seed is not None else range(1 if args.quick else args.seeds)
    if args.seed is None and args.jobs > 1:  # every part its own process, the main parts first; evaluated below
        run_parts([(seed, part) for part in PARTS for seed in seeds if part != "clip_no_twins" or seed == 0],
                  args.jobs, args.quick)
        run_parts([(seed, "") for seed in seeds], args.jobs, args.quick)  # each seed's evaluation, cached
    for seed in seeds:
        s = llava.Settings(**{**s.__dict__, "seed": seed})
        folder = os.path.join(cache, f"seed{seed}")
        for part in [args.part] if args.part else [p for p in PARTS if p != "clip_no_twins" or seed == 0]:
            train_part(tok, s, folder, part)
        if not args.part:
            runs.append(evaluate_seed(tok, s, folder))
    if args.part or args.seed is not None:
        return
    model = llava.load(os.path.join(cache, "seed0", "ckpt.pt"))[0]
    summary = {name: {k: [r["accuracy"][name][k] for r in runs] for k in scenes.KINDS} for name in VARIANTS}
    examples = []
    rng = np.random.default_rng(12345)  # held-out scenes (another seed than training's)
    for i in range(4):
        scene = scenes.random_scene(rng, 1 + i % 3)
        image = scenes.draw(scene, rng)
        for q, a, kind in scenes.conversation(scene, rng, 3)[:2]:
            examples.append({"scene": i, "kind": kind, "question": q, "reference": a,
                             "answer": answer(model, tok, image, q)})
        examples[-1]["image"] = image
    results = {"quick": args.quick, "settings": s.__dict__, "chance_zero_shot": 1 / 20,
               "zero_shot": [r["zero_shot"] for r in runs], "accuracy": summary,
               "runs": runs, "examples": [{k: v for k, v in e.items() if k != "image"} for e in examples]}

    pyplot = plt()
    fig = pyplot.figure(figsize=(14, 8.5))
    grid = fig.add_gridspec(4, 5, width_ratios=[1, 1, 0.1, 0.55, 1.3])
    ax = fig.add_subplot(grid[:, :2])
    width = 0.8 / len(VARIANTS)
    for j, name in enumerate(VARIANTS):
        for i, kind in enumerate(scenes.KINDS):
            values = summary[name][kind]
            x = i + (j - (len(VARIANTS) - 1) / 2) * width
            ax.bar(x, np.mean(values), width, color=f"C{j}", label=name if i == 0 else None)
            ax.plot([x] * len(values), values, "k.", ms=4)
    ax.set_xticks(range(3), scenes.KINDS)
    zero = {k: np.mean([z[k] for z in results["zero_shot"]]) for k in ("colour and shape", "colour", "shape")}
    ax.set(ylabel="answers exactly right (held-out scenes)", ylim=(0, 1))
    ax.set_title(f"held-out answers: bars = mean, dots = {len(runs)} seed(s); text prior = the words alone"
                 f"\nCLIP zero-shot: colour and shape "
                 f"{zero['colour and shape']:.0%} (chance 5%), colour {zero['colour']:.0%} (20%), shape "
                 f"{zero['shape']:.0%} (25%)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    for n, e in enumerate([e for e in examples if "image" in e]):
        axi = fig.add_subplot(grid[n, 3])
        axi.imshow(e["image"], interpolation="nearest")
        axi.set_xticks([]), axi.set_yticks([])
        axt = fig.add_subplot(grid[n, 4])
        axt.axis("off")
        lines = [textwrap.fill(f"{tag} {x[key]}", 58, subsequent_indent="    ") for x in examples
                 if x["scene"] == e["scene"] for tag, key in (("Q:", "question"), ("A:", "answer"),
                                                               ("reference:", "reference"))]
        axt.text(0, 1, "\n".join(lines), fontsize=7, va="top", family="monospace")
    fig.suptitle("LLaVA in miniature (stage 1 + 2, MLP projector, seed 0, on held-out scenes at the right)",
                 fontsize=10)
    write("llava", args.quick, results, fig)


if __name__ == "__main__":
    main()
