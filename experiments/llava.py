"""LLaVA's two stages, measured (Liu et al., arXiv:2304.08485 section 4.2, table 4's ablations
in miniature; LLaVA-1.5, arXiv:2310.03744 section 3.2, for the MLP projector).

    python experiments/llava.py            # minutes on a CPU
    python experiments/llava.py --quick    # seconds (smoke test)

One CLIP-style vision encoder and one language-only decoder are pretrained (llava.py), then:
  - text only: the decoder alone, no image: what the words of the question predict
  - stage 1 only: + projector trained on captions (decoder frozen)
  - stage 2 only: + projector and decoder trained on the conversations from a fresh projector
  - stage 1 + 2: both, in order, with the MLP projector (LLaVA-1.5) and the linear one (LLaVA)
Each is scored on held-out scenes: the share of answers greedy decoding gets exactly right,
per question kind (conversation, detailed description, complex reasoning).
Writes experiments/out/llava.{json,png}.
"""

import argparse
import json
import os
import textwrap
import time

from common import OUT, plt, write  # first: it puts the repository root before this folder on sys.path

import numpy as np  # noqa: E402
import torch  # noqa: E402

import llava  # noqa: E402
from data import scenes  # noqa: E402
from checkpoint import load_checkpoint, write_json  # noqa: E402

VARIANTS = ("text only", "stage 1 only", "stage 2 only", "stage 1 + 2", "stage 1 + 2, linear")


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
        time.sleep(30)
    return llava.load(path)[0]


def train_part(tok, s, folder, part):
    """One seed is three parts that may run in parallel processes, each writing checkpoints to folder:
    main = llava.pipeline (CLIP, the language-only decoder, stage 1 and 2 with the MLP projector);
    linear = stage 1 and 2 with the linear projector; stage2_only = stage 2 from a fresh MLP projector.
    A checkpoint already there is reused."""
    stage1 = os.path.join(folder, "stage1.pt")
    if part != "main":
        scenes, images = llava.make_scenes(s.n_train, s.seed)  # the pipeline's training scenes
    if part == "main" and not os.path.exists(os.path.join(folder, "ckpt.pt")):
        llava.pipeline(folder, s, "mlp")
    if part == "linear" and not os.path.exists(os.path.join(folder, "stage12_linear.pt")):
        base = wait_for(stage1)
        torch.manual_seed(s.seed + 1)
        model = llava.new_llava(tok, s, "linear", base.vision, base.llm)  # the same CLIP and decoder
        llava.train_stage(model, 1, tok, scenes, images, s)
        llava.save(model, tok, os.path.join(folder, "stage1_linear.pt"))
        llava.train_stage(model, 2, tok, scenes, images, s)
        llava.save(model, tok, os.path.join(folder, "stage12_linear.pt"))
    if part == "stage2_only" and not os.path.exists(os.path.join(folder, "stage2_only.pt")):
        base = wait_for(stage1)
        torch.manual_seed(s.seed + 2)
        model = llava.new_llava(tok, s, "mlp", base.vision, base.llm)
        llava.train_stage(model, 2, tok, scenes, images, s)
        llava.save(model, tok, os.path.join(folder, "stage2_only.pt"))


def evaluate_seed(tok, s, folder):
    """Zero-shot accuracy of the CLIP and answer accuracy of every variant (cached in folder/results.json)."""
    path = os.path.join(folder, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    t0 = time.perf_counter()
    files = {"stage 1 only": "stage1.pt", "stage 2 only": "stage2_only.pt", "stage 1 + 2": "ckpt.pt",
             "stage 1 + 2, linear": "stage12_linear.pt"}
    models = {name: wait_for(os.path.join(folder, f)) for name, f in files.items()}
    rows = {"text only": llava.answer_accuracy(llava.TextOnly(models["stage 1 only"].llm), tok, s, with_image=False)}
    rows.update({name: llava.answer_accuracy(m, tok, s) for name, m in models.items()})
    for name in VARIANTS:
        print(f"seed {s.seed} {name:20s}: " + ", ".join(f"{k} {v:.1%}" for k, v in rows[name].items()))
    result = {"seed": s.seed, "zero_shot": llava.zero_shot_accuracy(load_clip(os.path.join(folder, "clip.pt")), tok,
                                                                      n=max(s.n_eval, 20)),
              "accuracy": rows, "pipeline_seconds": load_checkpoint(os.path.join(folder, "ckpt.pt"))["seconds"],
              "eval_seconds": time.perf_counter() - t0}
    write_json(result, path)
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--seed", type=int, default=None, help="this seed only (cached), no figure")
    p.add_argument("--part", default="", choices=["", "main", "linear", "stage2_only"],
                   help="with --seed: one part of a seed, to run the parts in parallel processes")
    args = p.parse_args()
    s = llava.Settings(**(llava.QUICK if args.quick else {}))
    tok = llava.WordTokenizer(llava.build_vocab())
    runs = []
    cache = os.path.join(OUT, "llava_runs" + ("_quick" if args.quick else ""))
    seeds = [args.seed] if args.seed is not None else range(1 if args.quick else args.seeds)
    for seed in seeds:
        s = llava.Settings(**{**s.__dict__, "seed": seed})
        folder = os.path.join(cache, f"seed{seed}")
        for part in [args.part] if args.part else ("main", "linear", "stage2_only"):
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
    results = {"settings": s.__dict__, "chance_zero_shot": 1 / 20,
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
            ax.bar(i + (j - 2) * width, np.mean(values), width, color=f"C{j}", label=name if i == 0 else None)
            ax.plot([i + (j - 2) * width] * len(values), values, "k.", ms=4)
    ax.set_xticks(range(3), scenes.KINDS)
    zero = {k: np.mean([z[k] for z in results["zero_shot"]]) for k in ("colour and shape", "colour", "shape")}
    ax.set(ylabel="answers exactly right (held-out scenes)", ylim=(0, 1))
    ax.set_title(f"held-out answers: bars = mean, dots = {len(runs)} seed(s)\nCLIP zero-shot: colour and shape "
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
