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
import copy
import json
import os
import time

from common import OUT, plt, write  # first: it puts the repository root before this folder on sys.path

import numpy as np  # noqa: E402
import torch  # noqa: E402

import llava  # noqa: E402
from checkpoint import write_json  # noqa: E402

VARIANTS = ("text only", "stage 1 only", "stage 2 only", "stage 1 + 2", "stage 1 + 2, linear")


def answer(model, tok, image, question):
    """Greedy answer to one question about one image."""
    ids = torch.tensor([llava.encode_prompt(tok, question, 1, model.n_image_tokens)])
    out = list(model.generate_tokens(ids, llava.pixel_values(image)[None], 30, 0.0, eos_id=tok.eot_token))
    return tok.decode([int(t[0]) for t in out if int(t[0]) != tok.eot_token])


def run_seed(tok, s, scenes, images, seed):
    torch.manual_seed(seed)
    s = llava.Settings(**{**s.__dict__, "seed": seed})
    t0 = time.perf_counter()
    clip, _ = llava.train_clip(tok, scenes, images, s)
    zero_shot = llava.zero_shot_accuracy(clip, tok, n=max(s.n_eval, 20))
    llm, _ = llava.train_text(tok, scenes, images, s)
    rows = {"text only": llava.answer_accuracy(llava.TextOnly(llm), tok, s, with_image=False)}
    models = {}
    for projector in ("mlp", "linear"):
        stage1 = llava.new_llava(tok, s, projector, clip.vision, llm)
        llava.train_stage(stage1, 1, tok, scenes, images, s)
        if projector == "mlp":
            rows["stage 1 only"] = llava.answer_accuracy(stage1, tok, s)
            fresh = llava.new_llava(tok, s, projector, clip.vision, llm)
            llava.train_stage(fresh, 2, tok, scenes, images, s)
            rows["stage 2 only"] = llava.answer_accuracy(fresh, tok, s)
        both = copy.deepcopy(stage1)
        llava.train_stage(both, 2, tok, scenes, images, s)
        name = "stage 1 + 2" + ("" if projector == "mlp" else ", linear")
        rows[name] = llava.answer_accuracy(both, tok, s)
        models[name] = both
    for name in VARIANTS:
        print(f"seed {seed} {name:20s}: " + ", ".join(f"{k} {v:.1%}" for k, v in rows[name].items()))
    return {"seed": seed, "zero_shot": zero_shot, "accuracy": rows, "seconds": time.perf_counter() - t0}, \
        models["stage 1 + 2"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--seed", type=int, default=None, help="run this seed only (and cache it), no figure")
    args = p.parse_args()
    s = llava.Settings(**(llava.QUICK if args.quick else {}))
    tok = llava.WordTokenizer(llava.build_vocab())
    scenes, images = llava.make_scenes(s.n_train, 0)
    runs = []
    cache = os.path.join(OUT, "llava_runs" + ("_quick" if args.quick else ""))
    for seed in [args.seed] if args.seed is not None else range(1 if args.quick else args.seeds):
        path = os.path.join(cache, f"seed{seed}")
        if not os.path.exists(path + ".json"):  # a finished seed is reused (seeds may run in parallel processes)
            result, model = run_seed(tok, s, scenes, images, seed)
            llava.save(model, tok, path + ".pt")
            write_json(result, path + ".json")
        with open(path + ".json") as f:
            runs.append(json.load(f))
    if args.seed is not None:
        return
    model, _ = llava.load(os.path.join(cache, "seed0.pt"))
    summary = {name: {k: [r["accuracy"][name][k] for r in runs] for k in llava.KINDS} for name in VARIANTS}
    examples = []
    rng = np.random.default_rng(12345)  # held-out scenes (another seed than training's)
    for i in range(4):
        scene = llava.random_scene(rng, 1 + i % 3)
        image = llava.draw(scene, rng)
        for q, a, kind in llava.conversation(scene, rng, 3)[:2]:
            examples.append({"scene": i, "kind": kind, "question": q, "reference": a,
                             "answer": answer(model, tok, image, q)})
        examples[-1]["image"] = image
    results = {"settings": s.__dict__, "chance_zero_shot": 1 / 20,
               "zero_shot": [r["zero_shot"] for r in runs], "accuracy": summary,
               "runs": runs, "examples": [{k: v for k, v in e.items() if k != "image"} for e in examples]}

    pyplot = plt()
    fig = pyplot.figure(figsize=(13, 6.5))
    grid = fig.add_gridspec(2, 4)
    ax = fig.add_subplot(grid[:, :2])
    width = 0.8 / len(VARIANTS)
    for j, name in enumerate(VARIANTS):
        for i, kind in enumerate(llava.KINDS):
            values = summary[name][kind]
            ax.bar(i + (j - 2) * width, np.mean(values), width, color=f"C{j}", label=name if i == 0 else None)
            ax.plot([i + (j - 2) * width] * len(values), values, "k.", ms=4)
    ax.set_xticks(range(3), llava.KINDS)
    ax.set(ylabel="answers exactly right (held-out scenes)", ylim=(0, 1),
           title=f"LLaVA in miniature: bars = mean, dots = {len(runs)} seed(s); CLIP zero-shot "
                 f"{np.mean([z['colour and shape'] for z in results['zero_shot']]):.0%} (chance 5%)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    for n, e in enumerate([e for e in examples if "image" in e]):
        axi = fig.add_subplot(grid[n // 2, 2 + n % 2])
        axi.imshow(e["image"], interpolation="nearest")
        axi.set_xticks([]), axi.set_yticks([])
        lines = [f"Q: {x['question']}\nA: {x['answer']}\n(ref: {x['reference']})"
                 for x in examples if x["scene"] == e["scene"]]
        axi.set_title("\n".join(lines), fontsize=6.5, loc="left")
    write("llava", args.quick, results, fig)


if __name__ == "__main__":
    main()
