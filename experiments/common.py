"""Shared by the classroom experiments: small char-level models on the offline pydoc
corpus, trained through train.py itself, and the JSON/PNG outputs."""

import os
import sys
from dataclasses import asdict, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from checkpoint import load_checkpoint, write_json  # noqa: E402

if os.environ.get("NANO_QUICK") and "--quick" not in sys.argv:  # tests/test_docs.py: every experiment, quickly
    sys.argv.append("--quick")

# where results and cached runs go (the tests point it at a temporary folder)
OUT = os.environ.get("EXPERIMENTS_OUT", os.path.join(ROOT, "experiments", "out"))
# The base model of the experiments: 4 x 128, 8 heads, 128 characters of context.
FULL = dict(n_layer=4, n_embd=128, n_head=8, block_size=128, batch=16, iters=400, eval_iters=10)
QUICK = dict(n_layer=1, n_embd=32, n_head=4, block_size=32, batch=2, iters=4, eval_iters=1)


def sizes(quick):
    return QUICK if quick else FULL


def run(out_dir, s, *args, iters=None, eval_every=None):
    """python train.py on the char-level pydoc dataset, in-process: (history, seconds).

    A finished run with the same settings is reused (its checkpoint holds the history);
    one that was cut short is resumed; one made with other settings is trained again."""
    iters = s["iters"] if iters is None else iters
    argv = ["--dataset", "pydoc_char", "--out_dir", out_dir, "--n_layer", str(s["n_layer"]),
            "--n_embd", str(s["n_embd"]), "--n_head", str(s["n_head"]), "--block_size", str(s["block_size"]),
            "--batch_size", str(s["batch"]), "--max_iters", str(iters), "--eval_iters", str(s["eval_iters"]),
            "--eval_interval", str(eval_every or max(iters, 1)), "--log_interval", str(max(iters // 4, 1)),
            "--warmup_iters", str(iters // 10), *map(str, args)]
    if "--n_kv_head" not in argv:
        argv += ["--n_kv_head", str(s["n_head"])]
    cfg, model_args, explicit = train.parse_args(argv)
    ckpt = os.path.join(out_dir, "ckpt.pt")
    runs.check_run_kind(out_dir, "train.py", resume=True)  # a folder of llava.py's or align.py's is not ours to redo
    if os.path.exists(ckpt):
        done = load_checkpoint(ckpt)
        if same_settings(done, cfg, model_args):
            if done["iter_num"] == iters:
                return done["history"], done["history"]["step_seconds"]
            cfg = replace(cfg, resume=True)
        else:
            print(f"{out_dir} was trained with other settings: training it again")
            os.remove(ckpt)
    history = train.train(cfg, model_args, explicit)
    return history, history["step_seconds"]  # training time over all sessions, evaluations excluded


def same_settings(ckpt, cfg, model_args):
    """Whether a cached run was made with these settings (paths aside: the folder may have moved;
    compile aside: it changes the speed, not what is trained, and was a yes / no before "auto")."""
    paths = {"out_dir": "", "init_from": "", "resume": False, "compile": ""}
    return ({**ckpt["train_config"], **paths} == {**asdict(cfg), **paths}
            and all(ckpt["model_config"].get(k) == v for k, v in model_args.items()))


def write(name, quick, results, fig):
    """experiments/out/<name>.json and .png (<name>_quick.* for the smoke test)."""
    stem = os.path.join(OUT, name + ("_quick" if quick else ""))
    if not fig.get_suptitle():  # every figure names the run that made it
        fig.suptitle(" ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:]))
    write_json(results, stem + ".json")
    save_figure(fig, stem + ".png")
    print(f"wrote {stem}.json and {stem}.png")
    if quick:
        print(quick_ending())


def quick_ending():
    """The last line of a --quick run: what its numbers mean, and the command of the real run."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    command = " ".join(["python", script] + [a for a in sys.argv[1:] if a != "--quick"])
    return ("--quick: tiny models, a few steps: this checks that the code runs, its numbers are not results "
            f"(accuracies at or near 0, losses near log(vocabulary), toy speeds); the real run: {command}")


def save_figure(fig, path, dpi=110):
    """tight_layout, then the PNG written atomically (checkpoint.save_figure)."""
    fig.tight_layout()
    checkpoint.save_figure(fig, path, dpi)


def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot
    return matplotlib.pyplot
