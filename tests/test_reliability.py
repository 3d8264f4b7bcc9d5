"""Nothing lost on a crash, nothing run from a file, one clear line for bad input.

SIGKILL at random moments (and in the middle of a checkpoint write), a pickle with a code
payload, and a table of bad inputs, each answered with one
`error: ...` line and exit status 1.
"""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import sample
import checkpoint
import train
from conftest import ROOT, TINY, one_error_line, train_cmd
from model import ModelConfig, Transformer
from checkpoint import load_checkpoint

# ----------------------------------------------------------------------------- crash safety
@pytest.mark.slow  # an uninterrupted run, then runs killed at random moments and resumed: a long run
def test_sigkill_at_random_moments_then_resume_is_bit_identical(char_dataset, tmp_path):
    """Kill training 3 times at random iterations (plus a random delay), resume each time:
    every checkpoint on disk loads, and the end result equals an uninterrupted run bit for bit."""
    args = ["--max_iters", "24", "--eval_interval", "3", "--lr_decay_iters", "24", "--dropout", "0.1"]
    ref = str(tmp_path / "uninterrupted")
    done = subprocess.run(train_cmd(char_dataset, ref, *args), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    out, rng, kills = str(tmp_path / "killed"), random.Random(0), 0
    ckpt_path = os.path.join(out, "ckpt.pt")
    while True:
        resume = ["--resume"] if os.path.exists(ckpt_path) else []
        proc = subprocess.Popen(train_cmd(char_dataset, out, *args, *resume), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        target = rng.randrange(1, 25) if kills < 3 else None
        for line in proc.stdout:  # "iter 17/40 | ..." lines, flushed as they happen
            if target is not None and line.startswith("iter ") and int(line.split()[1].split("/")[0]) >= target:
                time.sleep(rng.uniform(0, 0.05))  # anywhere: mid-step, mid-evaluation, mid-save
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=300)
        stderr = proc.stderr.read()
        proc.stdout.close(), proc.stderr.close()
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
        kills += 1
        if os.path.exists(ckpt_path):
            load_checkpoint(ckpt_path)  # whatever is on disk is complete
        assert kills <= 3
    assert kills == 3
    a, b = load_checkpoint(ref), load_checkpoint(out)
    assert b["iter_num"] == 24 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["history"]["train_loss"] == b["history"]["train_loss"]


WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from checkpoint import save_checkpoint
for i in range(1000):
    save_checkpoint({{"model": {{"w": torch.full((40_000_000,), float(i))}}, "model_config": {{}}, "iter_num": i}}, {path!r})
    print(i, flush=True)
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    """Kill the process while ckpt.pt.tmp is half written: ckpt.pt is the last complete one."""
    path = str(tmp_path / "ckpt.pt")
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=ROOT, path=path)], stdout=subprocess.PIPE,
                            text=True)
    saved = int(proc.stdout.readline())  # one complete checkpoint (160 MB) is on disk
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the next one is partly written, then kill
        temps = glob.glob(path + ".*.tmp")  # checkpoint.atomic_write's temporary file
        size = os.path.getsize(temps[0]) if temps else 0
        if 0 < size < 100_000_000:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    partial = os.path.getsize(temps[0])
    assert 0 < partial < 160_000_000  # the kill did land inside a write
    ckpt = load_checkpoint(path)
    assert ckpt["iter_num"] >= saved and torch.equal(ckpt["model"]["w"], torch.full((40_000_000,),
                                                                                    float(ckpt["iter_num"])))
    with pytest.raises(ValueError, match="corrupt, truncated"):  # the partial file itself is refused
        load_checkpoint(temps[0])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(char_dataset, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    cfg, model_args, explicit = train.parse_args(["--dataset", char_dataset, "--out_dir", out, "--max_iters", "8",
                                                  "--eval_interval", "4"] + TINY)
    real_forward = Transformer.forward

    def poisoned(self, idx, targets=None, **kw):  # the loss turns to NaN at iteration 6
        logits, loss = real_forward(self, idx, targets, **kw)
        if self.training and len(calls) >= 6:
            loss = loss * float("nan")
        calls.append(1) if self.training else None
        return logits, loss

    calls = []
    monkeypatch.setattr(Transformer, "forward", poisoned)
    with pytest.raises(FloatingPointError, match=r"loss is nan at iteration 6.*ckpt.pt \(iteration 4\) was kept"):
        train.train(cfg, model_args, explicit)
    ckpt = load_checkpoint(out)
    assert ckpt["iter_num"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_same_seed_same_losses(char_dataset, tmp_path):
    """Determinism on CPU: the same command twice gives the same losses, to the last bit."""
    runs = []
    for name in ("a", "b"):
        cfg, model_args, explicit = train.parse_args(["--dataset", char_dataset, "--out_dir", str(tmp_path / name),
                                                      "--max_iters", "6", "--eval_interval", "3",
                                                      "--dropout", "0.1"] + TINY)
        runs.append(train.train(cfg, model_args, explicit))
    assert runs[0]["train_loss"] == runs[1]["train_loss"] and runs[0]["val_loss"] == runs[1]["val_loss"]


# ----------------------------------------------------------------------------- nothing runs from a file
class Payload:
    """Unpickling this runs `open(path, 'w')`: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_with_a_code_payload_is_refused(tmp_path, capsys):
    marker = str(tmp_path / "PWNED")
    os.makedirs(tmp_path / "run")
    torch.save({"model": {}, "config": {}, "x": Payload(marker)}, str(tmp_path / "run" / "ckpt.pt"))
    with pytest.raises(ValueError, match="corrupt, truncated or not a plain-data checkpoint"):
        load_checkpoint(str(tmp_path / "run"))
    with pytest.raises(SystemExit) as e:
        sample.main(["--out_dir", str(tmp_path / "run")])
    assert e.value.code == 1 and not os.path.exists(marker)  # refused before any code ran
    assert "not a plain-data checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input, one line each
@pytest.fixture(scope="module")
def trained(tmp_path_factory, char_dataset):
    out = str(tmp_path_factory.mktemp("trained"))
    cfg, model_args, explicit = train.parse_args(["--dataset", char_dataset, "--out_dir", out, "--max_iters", "2",
                                                  "--eval_interval", "2"] + TINY)
    train.train(cfg, model_args, explicit)
    return out


TRAIN_ERRORS = [
    (["--config", "nope"], "unknown config 'nope'; known configs: debug, first, demo, tinyllama_1b"),
    (["--n_layr", "3"], "unknown option --n_layr; did you mean --n_layer?"),
    (["--max_iters", "many"], "--max_iters expects a int, got 'many'"),
    (["--n_kv_head", "3"], "n_head (4) must be divisible by n_kv_head (3)"),
    (["--n_embd", "66"], "n_embd (66) must be divisible by n_head (4)"),
    (["--dataset", "/nonexistent/set"], "is not prepared (no meta.json): run `python data/prepare.py"),
    (["--peft", "lora", "--init_from", "/nonexistent", "--lora_targets", "q,query"],  # checked before any loading
     "unknown LoRA targets ['query']; valid names: q, k, v, o, gate, up, down or 'all'"),
    (["--dataset", "/nonexistent/set", "--top_k", "5"], "unknown option --top_k"),
]


@pytest.mark.parametrize("argv, message", TRAIN_ERRORS, ids=[a[0] for a, _ in TRAIN_ERRORS])
def test_train_bad_arguments(argv, message, capsys):
    assert message in one_error_line(capsys, train.main, argv)


def test_train_corrupt_and_truncated_checkpoints(trained, tmp_path, capsys):
    for name, damage in [("truncated", lambda b: b[:len(b) // 2]), ("corrupt", lambda b: b"\0" * 64 + b[64:])]:
        run = tmp_path / name
        shutil.copytree(trained, run)
        data = (run / "ckpt.pt").read_bytes()
        (run / "ckpt.pt").write_bytes(damage(data))
        err = one_error_line(capsys, train.main, ["--out_dir", str(run), "--resume"])
        assert "is corrupt, truncated" in err and str(run) in err


def test_train_resume_with_a_different_config_names_the_field(trained, capsys):
    err = one_error_line(capsys, train.main, ["--out_dir", trained, "--resume", "--n_embd", "64"])
    assert "trained with n_embd=32 but the config asks for n_embd=64" in err


def test_train_unwritable_out_dir_fails_before_training(char_dataset, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")  # a directory cannot be created under a file, even as root
    err = one_error_line(capsys, train.main, ["--dataset", char_dataset, "--out_dir", str(tmp_path / "a_file" / "out")]
                         + TINY)
    assert "is not writable" in err and "choose another --out_dir" in err


def test_train_disk_full_fails_before_training(char_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    err = one_error_line(capsys, train.main, ["--dataset", char_dataset, "--out_dir", str(tmp_path / "out")] + TINY)
    assert "1,000 B free but two checkpoints (the new one is written before the old one is replaced) need about" in err
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")


def test_sample_bad_arguments(trained, tmp_path, capsys):
    cases = [
        (["--out_dir", str(tmp_path / "missing")], "missing/ckpt.pt not found"),
        (["--out_dir", trained, "--top_p", "1.5"], "top_p must be in (0, 1]"),
        (["--out_dir", trained, "--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--out_dir", trained, "--prompt", "FILE:/nonexistent.txt"], "prompt file /nonexistent.txt not found"),
    ]
    for argv, message in cases:
        assert message in one_error_line(capsys, sample.main, argv + ["--max_new_tokens", "2"])
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(trained, no_tokenizer)
    os.remove(no_tokenizer / "meta.json")
    err = one_error_line(capsys, sample.main, ["--out_dir", str(no_tokenizer)])
    assert "meta.json not found" in err


def test_sample_checkpoints_that_do_not_fit(trained, tmp_path, capsys):
    """A checkpoint whose tensors do not match its config; an --eos_id outside the vocabulary;
    --quantize on a model that is already quantized (BitNet's BitLinear)."""
    ckpt = load_checkpoint(trained)
    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    checkpoint.save_checkpoint({**ckpt, "model_config": {**ckpt["model_config"], "n_layer": 3}}, str(bad / "ckpt.pt"))
    err = one_error_line(capsys, sample.main, ["--out_dir", str(bad)])
    assert "does not match its own config: missing ['layers.2." in err
    err = one_error_line(capsys, sample.main, ["--out_dir", trained, "--eos_id", "100000"])
    assert "--eos_id 100000 is not a token id of this model" in err
    bit = tmp_path / "bit"
    shutil.copytree(trained, bit)
    config = ModelConfig.from_dict({**ckpt["model_config"], "bitlinear": True})
    checkpoint.save_checkpoint({**ckpt, "model_config": config.to_dict(), "model": Transformer(config).state_dict()},
                          str(bit / "ckpt.pt"))
    err = one_error_line(capsys, sample.main, ["--out_dir", str(bit), "--quantize", "nf4"])
    assert "nf4 quantization replaces nn.Linear layers, but this model's layers are BitNet BitLinear" in err


def test_sample_prompt_longer_than_the_context_is_cropped_with_a_one_line_warning(trained):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--out_dir", trained, "--prompt", "def " * 20,
                        "--max_new_tokens", "2"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    crop = [line for line in r.stderr.splitlines() if "longer than the context" in line]
    assert crop == ["warning: prompt of 80 tokens is longer than the context block_size=32; keeping its last 32 tokens"]


def test_sample_unsupported_hugging_face_architecture(tmp_path, capsys):
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (hf / "tokenizer.json").write_text("{}")
    err = one_error_line(capsys, sample.main, ["--hf_dir", str(hf)])
    assert "unsupported architecture 'GPT2LMHeadModel'" in err


def test_token_ids_outside_the_vocabulary_are_refused():
    model = Transformer(ModelConfig.from_name("debug"))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\), got \[0, 300\]"):
        model.generate(torch.tensor([[0, 300]]), 2)


def test_the_real_command_line_prints_no_traceback():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", "nope"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
