"""train.py and sample.py end to end on tiny models: overrides, schedule, checkpoints,
exact resume, two processes (DDP and FSDP), fine-tuning from a Hugging Face directory."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import hf

from conftest import ROOT, TINY, run_train
from model import ModelConfig, Transformer
import distributed
from checkpoint import load_checkpoint
from train import TrainConfig, get_lr, parse_args, train

def final_weights(out_dir):
    return load_checkpoint(out_dir)["model"]


# ----------------------------------------------------------------------------- config
def test_overrides_are_parsed_by_type():
    cfg, model_args, explicit = parse_args(["--config", "demo", "--n_layer=4", "--learning_rate", "3e-4",
                                            "--compile", "--tie_embeddings", "true", "--out_dir", "x"])
    assert (cfg.model, cfg.learning_rate, cfg.compile, cfg.out_dir) == ("demo", 3e-4, "true", "x")
    assert model_args == {"n_layer": 4, "tie_embeddings": True}
    assert explicit == {"learning_rate", "compile", "out_dir"}


@pytest.mark.parametrize("argv,match", [
    (["--config", "gpt9"], "unknown config 'gpt9'; known configs: debug, first, demo, tinyllama_1b"),
    (["--n_layers", "4"], "unknown option --n_layers; did you mean --n_layer"),
    (["--learning_rate", "fast"], "--learning_rate expects a float, got 'fast'"),
    (["--n_layer", "2.5"], "--n_layer expects a int"),
    (["--compile", "maybe"], "--compile expects auto or a bool"),
    (["--dist", "horovod"], "--dist must be one of 'ddp', 'fsdp', got 'horovod'"),
    (["--batch_size", "0"], "batch_size must be >= 1"),
    (["--max_iters"], "--max_iters: expected one argument"),
    (["--min_lr", "0.1"], r"min_lr \(0.1\) is above learning_rate \(0.001\)"),
    (["--learning_rate", "nan"], "learning_rate must be a finite number > 0, got nan"),
    (["--beta2", "1.5"], r"beta2 must be in \[0, 1\)"),
    (["--dropout", "1.0"], r"dropout must be in \[0, 1\)"),
])
def test_bad_overrides_are_named(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(argv)


def test_tinyllama_recipe():
    cfg, _, _ = parse_args(["--config", "tinyllama_1b"])
    model = ModelConfig.from_name(cfg.model)
    assert cfg.grad_accum * cfg.batch_size * model.block_size == 2 ** 21  # 2M tokens per step
    assert (cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.weight_decay, cfg.grad_clip) == (4e-4, 4e-5, 2000, 0.1, 1.0)
    assert (cfg.beta1, cfg.beta2) == (0.9, 0.95)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert get_lr(0, cfg) == pytest.approx(1 / 11)
    assert get_lr(9, cfg) == pytest.approx(10 / 11)
    assert get_lr(10, cfg) == pytest.approx(1.0)
    assert get_lr(60, cfg) == pytest.approx(0.55)  # halfway down the cosine
    assert get_lr(110, cfg) == pytest.approx(0.1) and get_lr(500, cfg) == 0.1
    lrs = [get_lr(i, cfg) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


# ----------------------------------------------------------------------------- training
def test_debug_run_learns_and_writes_a_plain_checkpoint(char_dataset, tmp_path):
    out = str(tmp_path / "run")
    history = run_train(["--out_dir", out, "--max_iters", "60", "--eval_interval", "30"], char_dataset)
    assert history["val_loss"][-1] < history["val_loss"][0] - 0.8  # 4.87 -> 3.84-3.89 nats (measured)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)  # plain data only
    assert ckpt["iter_num"] == 60 and set(ckpt) >= {"model", "optimizer", "model_config", "rng", "train_config"}
    assert ckpt["model_config"]["vocab_size"] == 128  # the debug preset's (>= the 110 characters)
    model = Transformer(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    for name in ("loss.png", "meta.json"):
        assert os.path.exists(os.path.join(out, name))
    assert not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))


def test_resume_is_bit_identical(char_dataset, tmp_path):
    """Stop at iteration 10, resume to 20: the same weights as 20 iterations in one go."""
    common = ["--eval_interval", "5", "--lr_decay_iters", "20", "--dropout", "0.1"]
    run_train(["--out_dir", str(tmp_path / "a"), "--max_iters", "20"] + common, char_dataset)
    run_train(["--out_dir", str(tmp_path / "b"), "--max_iters", "10"] + common, char_dataset)
    cfg, model_args, explicit = parse_args(["--out_dir", str(tmp_path / "b"), "--resume", "--max_iters", "20"])
    history = train(cfg, model_args, explicit)
    a, b = final_weights(str(tmp_path / "a")), final_weights(str(tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert history["iter"] == list(range(20))


def test_a_cpu_peak_measured_on_a_busy_machine_is_measured_again_once(char_dataset, tmp_path, monkeypatch,
                                                                       capsys):
    """MFU's CPU peak is measured at start-up; when a step outdoes it (the machine was busy
    then), the next log measures it again, once, instead of printing MFU over 100%."""
    import re
    import train as train_module
    peaks, calls = iter([1.0, 1e15]), []  # start-up: far too low; then the quiet machine's
    monkeypatch.setattr(train_module, "peak_flops", lambda device, dtype: calls.append(device) or next(peaks))
    cfg, model_args, explicit = parse_args(["--dataset", char_dataset, "--out_dir", str(tmp_path), "--max_iters", "3"]
                                           + TINY)
    train(cfg, model_args, explicit)
    mfus = [float(m) for m in re.findall(r"mfu ([0-9.]+)%", capsys.readouterr().out)]
    assert len(calls) == 2 and len(mfus) == 3 and max(mfus) < 1


def test_resume_refuses_a_different_model(char_dataset, tmp_path):
    run_train(["--out_dir", str(tmp_path), "--max_iters", "2"], char_dataset)
    cfg, model_args, explicit = parse_args(["--out_dir", str(tmp_path), "--resume", "--n_layer", "3"])
    with pytest.raises(ValueError, match="trained with n_layer=2 but the config asks for n_layer=3"):
        train(cfg, model_args, explicit)


def torchrun(args, dataset, out_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), "--dataset", dataset, "--out_dir", out_dir] + TINY + args
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_checkpoint(out_dir)


TWO_PROCESS_ARGS = ["--max_iters", "6", "--eval_interval", "3"]


@pytest.fixture(scope="module")
def one_process(char_dataset, tmp_path_factory):
    """The reference: 1 process x 2 micro-batches (history, final weights), run once."""
    out = str(tmp_path_factory.mktemp("one_process"))
    history = run_train(["--out_dir", out, "--grad_accum", "2"] + TWO_PROCESS_ARGS, char_dataset)
    return history, final_weights(out)


@pytest.mark.slow  # torchrun with two processes, three times
@pytest.mark.parametrize("mode, accum", [("ddp", "2"), ("fsdp", "2"), ("ddp", "1")])
def test_two_processes_match_one(mode, accum, char_dataset, one_process, tmp_path):
    """2 CPU processes x 1 micro-batch == 1 process x 2 micro-batches, same global batch.
    grad_accum=1 (the presets' value) is raised to one micro-batch per process."""
    single, one = one_process
    ckpt = torchrun(TWO_PROCESS_ARGS + ["--dist", mode, "--grad_accum", accum], char_dataset, str(tmp_path / mode))
    assert ckpt["train_config"]["grad_accum"] == 2
    assert ckpt["history"]["train_loss"] == pytest.approx(single["train_loss"], abs=1e-5)
    assert ckpt["history"]["val_loss"] == pytest.approx(single["val_loss"], abs=1e-5)
    assert all((one[k] - v).abs().max() < 1e-5 for k, v in ckpt["model"].items())


def test_grad_accum_that_does_not_split_names_the_count_that_does():
    cfg, _, _ = parse_args(["--grad_accum", "3"])
    with pytest.raises(ValueError, match="grad_accum=3 does not split over 2 processes; use --grad_accum 4"):
        distributed.split_grad_accum(cfg, world=2, master=True)


def test_a_fine_tune_never_writes_into_its_base(char_dataset, tmp_path):
    base = str(tmp_path / "base")
    run_train(["--out_dir", base, "--max_iters", "2", "--eval_interval", "2"], char_dataset)
    with pytest.raises(ValueError, match=f"--init_from {base} is the run's own --out_dir.*--out_dir {base}_ft"):
        parse_args(["--init_from", base, "--out_dir", base])
    cfg, _, _ = parse_args(["--config", "demo", "--init_from", base])  # no --out_dir: the preset's, suffixed
    assert cfg.out_dir == "out/demo_ft" or cfg.out_dir.startswith("out/demo_ft")


def test_init_from_hugging_face_directory(char_dataset, tmp_path):
    base = Transformer(ModelConfig(vocab_size=128, block_size=32, n_layer=2, n_embd=32, n_head=4, n_kv_head=2))
    hf.save_llama(base, str(tmp_path / "hf"))
    cfg, model_args, explicit = parse_args(["--dataset", char_dataset, "--init_from", str(tmp_path / "hf"),
                                            "--out_dir", str(tmp_path / "ft"), "--max_iters", "0",
                                            "--batch_size", "2", "--eval_iters", "1"])
    train(cfg, model_args, explicit)
    tuned = final_weights(str(tmp_path / "ft"))
    assert all(torch.equal(tuned[k], v) for k, v in base.state_dict().items())  # 0 steps: the same weights


# ----------------------------------------------------------------------------- sampling
def run_script(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_sample_streams_reproducibly(char_dataset, tmp_path):
    out = str(tmp_path / "run")
    run_train(["--out_dir", out, "--max_iters", "30", "--eval_interval", "30"], char_dataset)
    args = ["--out_dir", out, "--prompt", "The ", "--max_new_tokens", "40", "--seed", "7", "--top_p", "0.9"]
    a, b = run_script("sample.py", *args), run_script("sample.py", *args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("The ") and len(a.stdout) == len("The ") + 40 + 1
    (tmp_path / "prompt.txt").write_text("x" * 100)  # longer than the 32-token context: cropped
    greedy = run_script("sample.py", "--out_dir", out, "--prompt", f"FILE:{tmp_path / 'prompt.txt'}",
                        "--temperature", "0", "--max_new_tokens", "5")
    assert greedy.returncode == 0, greedy.stderr
    assert greedy.stdout.startswith("x" * 100) and "longer than the context" in greedy.stderr


def test_sample_errors_name_the_path(tmp_path):
    r = run_script("sample.py", "--out_dir", str(tmp_path / "missing"))
    assert r.returncode == 1 and "missing/ckpt.pt not found" in r.stderr and "Traceback" not in r.stderr


def test_a_mixture_of_datasets_trains_and_resumes_exactly(char_dataset, tmp_path):
    """--dataset a:0.7,b:0.3 (TinyLlama's 7:3 of two sources): the sampler's position is in
    the checkpoint, so a resumed run equals an uninterrupted one bit for bit."""
    other = str(tmp_path / "other")
    shutil.copytree(char_dataset, other)
    spec = f"{char_dataset}:0.7,{other}:0.3"
    args = ["--max_iters", "4", "--eval_interval", "2", "--lr_decay_iters", "4"]
    cfg, model_args, explicit = parse_args(["--dataset", spec, "--out_dir", str(tmp_path / "a")] + TINY + args)
    train(cfg, model_args, explicit)
    run_train(["--out_dir", str(tmp_path / "b"), "--max_iters", "2"] + args[2:], spec)
    cfg, model_args, explicit = parse_args(["--out_dir", str(tmp_path / "b"), "--resume", "--max_iters", "4"])
    train(cfg, model_args, explicit)
    a, b = final_weights(str(tmp_path / "a")), final_weights(str(tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint(str(tmp_path / "b"))["rng"]["data"]["draws"] == 4
