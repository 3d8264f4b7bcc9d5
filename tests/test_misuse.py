"""Misuse, class by class: each case ends with exit status 1, one `error:` line and no
change on disk. One place in the code makes each class impossible:

 1. a failing run never damages its out_dir      train.save (nothing written before it), tokenizer fingerprints
 2. two runs into one out_dir                     checkpoint.lock_out_dir
 3. a PEFT run whose base changed                 runs.base_fingerprint
 4. Hugging Face configs                          hf.config_from_hf
 5. numbers out of range                          train.check_train_config, ModelConfig, model.check_sampling_args
 6. devices                                       runs.resolve_device
 7. data                                          data.dataset.open_dataset, check_split_length
 8. adapters                                      peft.parse_targets, hf.read_lora_config, train.setup
 9. interrupts                                    train.loop's signal handler, sample.main
10. tools check before they work                  runs.check_finite, bench.py's out_dir check
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import sample
import train
from checkpoint import load_checkpoint, save_checkpoint, write_json
from conftest import ONE_THREAD, ROOT, TINY, one_error_line, run_train, snapshot, train_cmd
import hf
from conftest import tiny_config
from hf import config_from_hf
from model import Transformer



@pytest.fixture(scope="module")
def trained(tmp_path_factory, char_dataset):
    out = str(tmp_path_factory.mktemp("trained"))
    run_train(["--out_dir", out, "--max_iters", "2", "--eval_interval", "2"], char_dataset)
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, char_dataset, trained):
    base = str(tmp_path_factory.mktemp("base"))
    shutil.copytree(trained, base, dirs_exist_ok=True)
    out = str(tmp_path_factory.mktemp("lora"))
    run_train(["--init_from", base, "--peft", "lora", "--lora_r", "2", "--out_dir", out, "--max_iters", "2",
         "--eval_interval", "2"], char_dataset)
    return base, out


def tiny_dataset(folder, train_tokens, val_tokens, vocab=40):
    """A character dataset written by hand: meta.json, train.bin, val.bin."""
    os.makedirs(folder, exist_ok=True)
    chars = "".join(chr(32 + i) for i in range(vocab))
    write_json({"tokenizer": "char", "chars": chars, "vocab_size": vocab, "dtype": "uint16",
                "train_tokens": len(train_tokens), "val_tokens": len(val_tokens)}, os.path.join(folder, "meta.json"))
    np.array(train_tokens, dtype=np.uint16).tofile(os.path.join(folder, "train.bin"))
    np.array(val_tokens, dtype=np.uint16).tofile(os.path.join(folder, "val.bin"))
    return folder


# ----------------------------------------------------------------------------- 1. a failing run changes nothing
def test_a_run_that_fails_at_its_first_evaluation_leaves_the_out_dir_as_it_was(trained, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(trained, out)
    before = snapshot(out)
    short_val = tiny_dataset(str(tmp_path / "short_val"), list(range(40)) * 50, [1, 2, 3])
    err = one_error_line(capsys, train.main, ["--dataset", short_val, "--out_dir", out] + TINY)
    assert "the val split of" in err and "has 3 tokens in 1 shard(s), the longest 3: fewer than block_size + 1 = 33" in err
    assert snapshot(out) == before  # the old tokenizer and checkpoint are untouched


def test_a_checkpoint_never_samples_with_another_runs_tokenizer(trained, tmp_path, capsys):
    out = str(tmp_path / "mixed")
    shutil.copytree(trained, out)
    meta = json.load(open(os.path.join(out, "meta.json")))
    write_json({**meta, "chars": meta["chars"][::-1]}, os.path.join(out, "meta.json"))  # another run's tokenizer
    before = snapshot(out)
    err = one_error_line(capsys, sample.main, ["--out_dir", out, "--max_new_tokens", "2"])
    assert "are not the ones the checkpoint was trained with" in err
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- 2. one run per out_dir
@pytest.mark.slow  # two train.py processes racing, then a resume: about 15 s
def test_two_runs_into_one_out_dir_exactly_one_proceeds(char_dataset, tmp_path):
    out = str(tmp_path / "shared")
    first = subprocess.Popen(train_cmd(char_dataset, out, "--max_iters", "100000", "--eval_interval", "100000"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    for line in first.stdout:  # the lock is taken before the header is printed
        if line.startswith("model "):
            break
    second = subprocess.run(train_cmd(char_dataset, out, "--max_iters", "2"), capture_output=True, text=True,
                            timeout=120, env=ONE_THREAD)
    first.send_signal(signal.SIGTERM)  # the first run ends only now: a final checkpoint, exit 143
    first.communicate(timeout=120)
    assert second.returncode == 1 and "is in use by process" in second.stderr, second.stderr
    assert first.returncode == 143 and load_checkpoint(out)["train_config"]["max_iters"] == 100000
    after = subprocess.run(train_cmd(char_dataset, out, "--max_iters", "2", "--resume"), capture_output=True,
                           text=True, timeout=120, env=ONE_THREAD)
    assert after.returncode == 0, after.stderr  # the lock was released at exit


# ----------------------------------------------------------------------------- 3. the base of an adapter
def test_a_peft_run_refuses_a_base_that_changed(lora_run, char_dataset, capsys):
    base, out = lora_run
    ckpt = load_checkpoint(base)
    changed = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    save_checkpoint({**ckpt, "model": changed}, os.path.join(base, "ckpt.pt"))
    before = snapshot(out)
    err = one_error_line(capsys, sample.main, ["--out_dir", out, "--max_new_tokens", "2"])
    assert f"the base {base} of the --peft run" in err and "changed since the adapter was trained" in err
    err = one_error_line(capsys, train.main, ["--dataset", char_dataset, "--out_dir", out, "--resume",
                                              "--max_iters", "4"])
    assert "changed since the adapter was trained" in err
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- 4. Hugging Face configs
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 97, "hidden_size": 64,
         "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64}
HF_CONFIGS = [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling 'linear'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling 'llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope scaling 'yarn'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"mlp_bias": True}, "biases in attention or MLP"),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
    ({"head_dim": 32}, "head_dim=32 with hidden_size != num_attention_heads * head_dim"),
    ({"hidden_size": None}, "field 'hidden_size' is missing"),
    ({"num_hidden_layers": "2"}, "field 'num_hidden_layers' must be int, got '2'"),
    ({"tie_word_embeddings": "yes"}, "field 'tie_word_embeddings' must be bool"),
    ({"rope_theta": "big"}, "field 'rope_theta' must be float"),
    ({"num_key_value_heads": 3}, "n_head (4) must be divisible by n_kv_head (3)"),
]


@pytest.mark.parametrize("change, message", HF_CONFIGS, ids=[m[:30] for _, m in HF_CONFIGS])
def test_hugging_face_config_fields_are_read_or_refused(change, message):
    config = {k: v for k, v in {**LLAMA, **change}.items() if v is not None}
    with pytest.raises(ValueError, match="^cfg/config.json: ") as e:
        config_from_hf(config, "cfg/config.json")
    assert message in str(e.value)


@pytest.mark.parametrize("spelling", [{"rope_theta": 5e5}, {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
                                      {"rope_scaling": {"rope_type": "default", "rope_theta": 5e5}}])
def test_rope_theta_is_read_in_every_spelling_as_transformers_reads_it(spelling):
    ours = config_from_hf({**LLAMA, **spelling})
    assert ours.rope_theta == 5e5
    transformers = pytest.importorskip("transformers", reason="the oracle is transformers' LlamaConfig")
    theirs = transformers.LlamaConfig(**{k: v for k, v in {**LLAMA, **spelling}.items()
                                         if k not in ("architectures", "model_type")})
    assert theirs.rope_parameters["rope_theta"] == ours.rope_theta
    assert (theirs.rms_norm_eps, theirs.num_key_value_heads) == (ours.norm_eps, ours.n_kv_head)


def test_hugging_face_files_that_do_not_fit(tmp_path, capsys):
    path = tmp_path / "hf"
    hf.save_llama(Transformer(tiny_config()), str(path))
    (path / "tokenizer.json").write_text("{}")
    (path / "config.json").write_text('{"model_type": "llama",')  # malformed JSON
    err = one_error_line(capsys, sample.main, ["--hf_dir", str(path)])
    assert "config.json is not valid JSON" in err
    hf.save_llama(Transformer(tiny_config()), str(path))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    err = one_error_line(capsys, sample.main, ["--hf_dir", str(path)])
    assert "tensor 'model.layers.0.mlp.gate_proj.weight' has shape (256, 64) but config.json implies (128, 64)" in err


# ----------------------------------------------------------------------------- 5. numbers out of range
TRAIN_NUMBERS = [
    (["--learning_rate", "-1"], "learning_rate must be a finite number > 0, got -1.0"),
    (["--learning_rate", "inf"], "learning_rate must be a finite number > 0, got inf"),
    (["--min_lr", "0.5"], "min_lr (0.5) is above learning_rate (0.001)"),
    (["--beta1", "1"], "beta1 must be in [0, 1), got 1.0"),
    (["--lora_dropout", "-0.1"], "lora_dropout must be in [0, 1)"),
    (["--grad_accum", "0"], "grad_accum must be >= 1, got 0"),
    (["--eval_iters", "0"], "eval_iters must be >= 1, got 0"),
    (["--max_iters", "-5"], "max_iters must be >= 0, got -5"),
    (["--weight_decay", "nan"], "weight_decay must be a finite number >= 0, got nan"),
    (["--dropout", "1.5"], "dropout must be in [0, 1), got 1.5"),
    (["--n_layer", "0"], "n_layer must be a positive integer, got 0"),
]


@pytest.mark.parametrize("argv, message", TRAIN_NUMBERS, ids=[a[0] for a, _ in TRAIN_NUMBERS])
def test_train_numbers_out_of_range(argv, message, char_dataset, tmp_path, capsys):
    out = tmp_path / "never"
    assert message in one_error_line(capsys, train.main, ["--dataset", char_dataset, "--out_dir", str(out)] + argv)
    assert not out.exists()


SAMPLE_NUMBERS = [
    (["--num_samples", "0"], "--num_samples must be >= 1, got 0"),
    (["--max_new_tokens", "-1"], "--max_new_tokens must be >= 1, got -1"),
    (["--temperature", "nan"], "temperature must be a finite number >= 0 (0 is greedy), got nan"),
    (["--temperature", "1e-45"], "temperature 1e-45 is so small that logits / temperature overflow"),
    (["--top_k", "0"], "--top_k must be >= 1, got 0"),
]


@pytest.mark.parametrize("argv, message", SAMPLE_NUMBERS, ids=[a[0] + a[1] for a, _ in SAMPLE_NUMBERS])
def test_sample_numbers_out_of_range(argv, message, trained, capsys):
    before = snapshot(trained)
    assert message in one_error_line(capsys, sample.main, ["--out_dir", trained] + argv)
    assert snapshot(trained) == before


# ----------------------------------------------------------------------------- 6. devices
@pytest.mark.slow  # every tool as a process, bench.py with transformers among them
@pytest.mark.parametrize("device, message", [("tpu", "unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
                                             ("cuda", "this machine has no CUDA GPU; use --device cpu")])
def test_devices_are_one_line_in_every_tool(device, message, trained, char_dataset, tmp_path, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert message in one_error_line(capsys, train.main, ["--dataset", char_dataset, "--out_dir",
                                                          str(tmp_path / "x"), "--device", device])
    assert message in one_error_line(capsys, sample.main, ["--out_dir", trained, "--device", device])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--device", device, "--quick",
                        "--out_dir", str(tmp_path / "b")], capture_output=True, text=True, timeout=120, env=ONE_THREAD)
    assert r.returncode == 1 and r.stderr.strip() == f"error: {message}" or message in r.stderr, r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()


def test_debug_1_shows_the_traceback_instead_of_the_line(trained, monkeypatch):
    """runs.exit_with_error, every tool's end on bad input: DEBUG=1 raises the error itself."""
    monkeypatch.setenv("DEBUG", "1")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        sample.main(["--out_dir", trained, "--device", "tpu"])


# ----------------------------------------------------------------------------- 7. data
def test_token_ids_beyond_the_vocabulary_are_found_when_the_dataset_opens(tmp_path, capsys):
    bad = tiny_dataset(str(tmp_path / "bad"), list(range(40)) * 50 + [45], list(range(40)) * 5)
    out = tmp_path / "never"
    err = one_error_line(capsys, train.main, ["--dataset", bad, "--out_dir", str(out)] + TINY)
    assert "train.bin holds token id 45" in err and "40" in err
    assert not out.exists()


# ----------------------------------------------------------------------------- 8. adapters
def test_adapter_misuse(lora_run, trained, char_dataset, tmp_path, capsys):
    _, out = lora_run
    err = one_error_line(capsys, train.main, ["--dataset", char_dataset, "--init_from", trained, "--peft", "lora",
                                              "--lora_targets", "q,v,q", "--out_dir", str(tmp_path / "dup")])
    assert "LoRA targets ['q'] are named more than once" in err and not (tmp_path / "dup").exists()
    before = snapshot(out)
    err = one_error_line(capsys, train.main, ["--dataset", char_dataset, "--out_dir", out, "--resume",
                                              "--peft", "prefix"])
    assert "is a --peft lora run; it cannot be resumed with --peft prefix" in err
    assert snapshot(out) == before
    adapter = tmp_path / "adapter"
    shutil.copytree(os.path.join(out, "adapter"), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    for change, message in [({"r": "2"}, "r is '2', not a int"), ({"lora_alpha": [1]}, "lora_alpha is [1]"),
                            ({"lora_dropout": 2}, "lora_dropout must be a number in [0, 1)")]:
        (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
        err = one_error_line(capsys, sample.main, ["--out_dir", trained, "--adapter", str(adapter)])
        assert message in err


# ----------------------------------------------------------------------------- 9. interrupts
def test_sigterm_saves_a_final_checkpoint_and_exits_143(char_dataset, tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen(train_cmd(char_dataset, out, "--max_iters", "100000", "--eval_interval", "100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    for line in proc.stdout:
        if line.startswith("iter 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    saved = load_checkpoint(out)["iter_num"]
    assert saved >= 3 and f"stopped by SIGTERM at iteration {saved}: saved" in err and "--resume" in err
    # said at once, before the evaluation and the save
    assert err.lstrip().startswith(f"SIGTERM: finishing the step in progress, then evaluating (2 batches per split) "
                                   f"and saving {out}/ckpt.pt before stopping")


def test_ctrl_c_before_the_first_checkpoint_does_not_claim_one(char_dataset, monkeypatch, tmp_path, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "build_model", interrupted)  # Ctrl-C while the model is being built
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", char_dataset, "--out_dir", str(tmp_path / "x")] + TINY)
    err = capsys.readouterr().err
    assert e.value.code == 130 and "nothing was saved" in err and "complete" not in err


def test_ctrl_c_in_sample_ends_the_stream_cleanly(trained):
    # the child starts with Ctrl-C's default action even when pytest runs in the background,
    # where the shell ignores SIGINT and its children inherit that (Python then never raises
    # KeyboardInterrupt)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), "--out_dir", trained,
                             "--max_new_tokens", "100000", "--num_samples", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.5)
    while proc.poll() is None and not proc.stdout.read(1):  # wait for the first streamed text
        pass
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, err


# ----------------------------------------------------------------------------- 10. tools check before they work
def test_nan_in_loaded_weights_is_bad_input_not_a_divergence(trained, char_dataset, tmp_path, capsys):
    bad = tmp_path / "nan"
    shutil.copytree(trained, bad)
    ckpt = load_checkpoint(str(bad))
    ckpt["model"]["layers.0.attention.wq.weight"][0, 0] = float("nan")
    save_checkpoint(ckpt, str(bad / "ckpt.pt"))
    err = one_error_line(capsys, sample.main, ["--out_dir", str(bad)])
    assert "tensor layers.0.attention.wq.weight holds NaN or inf values; the checkpoint is damaged" in err
    err = one_error_line(capsys, train.main, ["--dataset", char_dataset, "--init_from", str(bad), "--out_dir",
                                              str(tmp_path / "ft")] + TINY)
    assert "holds NaN or inf values" in err and "diverged" not in err


@pytest.mark.slow  # bench.py as a process: transformers' import alone takes seconds
def test_bench_checks_its_out_dir_first(tmp_path):
    (tmp_path / "a_file").write_text("x")
    start = time.time()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--out_dir", str(tmp_path / "a_file" / "o")],
                       capture_output=True, text=True, timeout=120, env=ONE_THREAD)
    assert r.returncode == 1 and "is not writable" in r.stderr and time.time() - start < 60, r.stderr


# ============================================================================= second round (issue 28)
# Numbers in every command's options: tests/test_options.py (the guard). Here, the other classes.
@pytest.fixture(scope="module")
def llava_run(tmp_path_factory):
    import llava
    out = tmp_path_factory.mktemp("llava_run")
    tok = llava.WordTokenizer(llava.build_vocab())
    llava.save(llava.new_llava(tok, llava.Settings(**llava.QUICK), "mlp"), tok, str(out / "ckpt.pt"))
    return str(out)


# ----------------------------------------------------------------------------- 1. a writer never replaces a run
def test_every_writer_refuses_a_run_of_another_kind(trained, llava_run, char_dataset, capsys):
    import bench
    import llava
    before, before_llava = snapshot(trained), snapshot(llava_run)
    err = one_error_line(capsys, llava.main, ["--out_dir", trained, "--quick"])
    assert f"out_dir {trained} holds a train.py run (ckpt.pt) and llava.py would overwrite it" in err
    err = one_error_line(capsys, bench.main, ["--out_dir", trained, "--quick", "--only", "kv"])
    assert "holds a train.py run (ckpt.pt) and bench.py would overwrite it" in err
    for resume in ([], ["--resume"]):
        err = one_error_line(capsys, train.main, ["--dataset", char_dataset, "--out_dir", llava_run] + TINY + resume)
        assert f"out_dir {llava_run} holds a llava.py run (ckpt.pt) and train.py would overwrite it" in err
    assert snapshot(trained) == before and snapshot(llava_run) == before_llava


def test_a_run_is_continued_or_left_alone_never_restarted_over(trained, llava_run, char_dataset, capsys):
    import llava
    before = snapshot(trained)
    err = one_error_line(capsys, train.main, ["--dataset", char_dataset, "--out_dir", trained] + TINY)
    assert f"out_dir {trained} holds a train.py run (ckpt.pt) that this command would overwrite; continue it " \
           f"with --resume or write elsewhere, e.g. --out_dir {trained}_new" in err
    assert snapshot(trained) == before
    before = snapshot(llava_run)
    err = one_error_line(capsys, llava.main, ["--out_dir", llava_run, "--quick"])
    assert "holds a llava.py run (ckpt.pt) that this command would overwrite; write elsewhere" in err
    assert snapshot(llava_run) == before


def test_no_message_advises_writing_over_the_run_it_names(trained, capsys):
    """sample.py --image on a train.py run once advised `python llava.py --out_dir <that run>`."""
    err = one_error_line(capsys, sample.main, ["--out_dir", trained, "--image", "x.png"])  # refused before the image
    assert "is not a llava.py checkpoint" in err and f"--out_dir {trained}" not in err


def test_llava_holds_the_out_dir_lock(tmp_path, capsys):
    import llava
    from checkpoint import lock_out_dir, unlock_out_dir
    out = str(tmp_path / "busy")
    lock_out_dir(out)  # another process's run, as far as the lock can tell: flock is per open file
    try:
        err = one_error_line(capsys, llava.main, ["--out_dir", out, "--quick"])
    finally:
        unlock_out_dir(out)
    assert "is in use by process" in err and os.listdir(out) == []


# ----------------------------------------------------------------------------- 2. regressions
def test_values_that_start_with_a_minus_sign_are_values():
    with pytest.raises(ValueError, match=r"^--learning_rate must be a finite number > 0, got -0.001$"):
        train.parse_args(["--learning_rate", "-1e-3"])
    assert sample.parse_args(["--prompt", "-1e-3", "--temperature", "0"]).prompt == "-1e-3"
    assert sample.parse_args(["--prompt=-inf"]).prompt == "-inf"


def test_a_corpus_folder_names_the_file_that_is_not_utf8(tmp_path, capsys):
    from data import prepare
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("plain text\n")
    (corpus / "b.txt").write_bytes(b"caf\xe9\n")  # Latin-1
    err = one_error_line(capsys, prepare.main, ["--corpus", str(corpus), "--tokenizer", "bpe", "--vocab_size", "300",
                                                "--out", str(tmp_path / "out"), "--workers", "1"])
    assert err == f"error: {corpus / 'b.txt'} is not UTF-8 text (byte 3: invalid continuation byte); read before " \
                  f"it (1 of 2 files): {corpus / 'a.txt'}; convert it to UTF-8 (iconv -f latin1 -t utf-8) or move " \
                  f"it out of the corpus"
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 3. empty and degenerate data
@pytest.mark.parametrize("corpus, argv, message", [
    ("empty.txt", ["--tokenizer", "char"], "has no text (no documents, or only empty ones)"),
    ("empty.txt", ["--tokenizer", "bpe", "--vocab_size", "300"], "has no text (no documents, or only empty ones)"),
    ("docs.txt", ["--tokenizer", "char", "--val_fraction", "1.5"], "--val_fraction must be in [0, 1), got 1.5"),
    ("docs.txt", ["--tokenizer", "char", "--val_fraction", "-0.2"], "--val_fraction must be in [0, 1), got -0.2"),
    ("docs.jsonl", ["--tokenizer", "char"], "--tokenizer char is for the small path"),
], ids=["empty-char", "empty-bpe", "val1.5", "val-0.2", "char-jsonl"])
def test_prepare_refuses_data_it_cannot_split(corpus, argv, message, tmp_path, capsys):
    from data import prepare
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "docs.txt").write_text("a document\n")
    (tmp_path / "docs.jsonl").write_text('{"text": "a document"}\n')
    err = one_error_line(capsys, prepare.main, ["--corpus", str(tmp_path / corpus), "--out", str(tmp_path / "out")]
                         + argv)
    assert message in err and not (tmp_path / "out").exists()


def test_a_dataset_with_an_empty_vocabulary_says_so(tmp_path):
    from data.dataset import open_dataset
    folder = tiny_dataset(str(tmp_path / "empty"), [], [])
    meta = json.load(open(os.path.join(folder, "meta.json")))
    write_json({**meta, "chars": "", "vocab_size": 0}, os.path.join(folder, "meta.json"))
    with pytest.raises(ValueError, match="has an empty vocabulary .meta.json: vocab_size 0.: it was prepared from a "
                                         "corpus without text"):
        open_dataset(folder, vocab_size=0)


# ----------------------------------------------------------------------------- 4. numbers the tools run on
def test_a_huge_evaluation_is_announced_before_the_run(capsys):
    cfg, _, _ = train.parse_args(["--eval_iters", "1000000000", "--max_iters", "200"])
    train.check_evaluation_cost(cfg)
    assert capsys.readouterr().out == (
        "note: evaluation costs more than training: 5 evaluation(s) x 2 splits x 1,000,000,000 batches = "
        "10,000,000,000 forward passes against 200 steps x 1 micro-batch(es) x 3 = 600; lower --eval_iters or raise "
        "--eval_interval\n")
    train.check_evaluation_cost(train.parse_args(["--config", "first"])[0])  # the README's run: nothing to say
    assert capsys.readouterr().out == ""


def test_bench_rounds_are_what_was_asked(capsys):
    import bench
    err = one_error_line(capsys, bench.main, ["--rounds", "0"])
    assert err == "error: --rounds must be >= 1, got 0"


# ----------------------------------------------------------------------------- 5. tracebacks left
def test_sample_on_a_llava_run_without_an_image_is_one_line(llava_run, capsys):
    err = one_error_line(capsys, sample.main, ["--out_dir", llava_run])
    assert err == f"error: {llava_run} holds a llava.py run (ckpt.pt), not a train.py or align.py run; sample.py " \
                  f"reads it with --image PNG"


def test_a_file_size_limit_while_writing_a_checkpoint_is_one_line_and_the_old_file_stays(tmp_path):
    path = tmp_path / "ckpt.pt"
    code = (f"import resource, signal, sys, torch; sys.path.insert(0, {ROOT!r})\n"
            "from checkpoint import save_checkpoint\nfrom runs import exit_with_error\n"
            f"save_checkpoint({{'w': torch.zeros(10)}}, {str(path)!r})\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000))\n"
            f"try:\n    save_checkpoint({{'w': torch.zeros(100000)}}, {str(path)!r})\n"
            "except OSError as e:\n    exit_with_error(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ONE_THREAD)
    assert r.returncode == 1 and r.stderr == f"error: writing {path} failed (File too large): the previous ckpt.pt " \
                                             f"is unchanged; is the disk full, or a file-size limit (ulimit -f) set?\n"
    assert torch.load(path, weights_only=True)["w"].shape == (10,) and os.listdir(tmp_path) == ["ckpt.pt"]


# ----------------------------------------------------------------------------- 6. messages that say what is wrong
def test_qlora_on_a_bitnet_model_says_what_it_is():
    import quant
    with pytest.raises(ValueError, match=r"^nf4-dq quantization replaces nn.Linear layers, but this model's layers "
                                         r"are BitNet BitLinear \(bitlinear=True\)"):
        quant.quantize_model(Transformer(tiny_config(bitlinear=True)), "nf4-dq")


# ----------------------------------------------------------------------------- 7. Hugging Face configs
@pytest.mark.parametrize("rope, read", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
      "rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "rope scaling 'linear'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
      "rope_scaling": {"rope_type": "default", "rope_theta": 7e5}}, 7e5),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "rope_scaling": None}, 5e5),
], ids=["scaling-over-parameters", "theta-of-scaling", "scaling-null"])
def test_rope_parameters_and_rope_scaling_together_as_transformers_reads_them(rope, read):
    """transformers: a rope_scaling, when given, replaces rope_parameters (type, factor and theta)."""
    if isinstance(read, str):
        with pytest.raises(ValueError, match=read):
            config_from_hf({**LLAMA, **rope})
    else:
        assert config_from_hf({**LLAMA, **rope}).rope_theta == read
    transformers = pytest.importorskip("transformers", reason="the oracle is transformers' LlamaConfig")
    theirs = transformers.LlamaConfig(**{k: v for k, v in {**LLAMA, **json.loads(json.dumps(rope))}.items()
                                         if k not in ("architectures", "model_type")}).rope_parameters
    assert theirs["rope_type"] == ("linear" if isinstance(read, str) else "default")
    if not isinstance(read, str):
        assert theirs["rope_theta"] == read
