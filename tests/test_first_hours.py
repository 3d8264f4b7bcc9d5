"""What a student meets in the first hours: the thread count a command picks, the numbers the
README states, end-of-text in samples, the error for a missing draft model."""

import os
import re

import pytest
import torch

import runs
from conftest import ROOT, one_error_line
from data.tokenizer import EOT, readable
from model import ModelConfig, count_params


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores, load, world, expected", [
    (2, 0.0, 1, 2),   # idle: one thread per core
    (2, 4.3, 1, 1),   # 4 busy processes on 2 cores: one thread
    (2, 0.7, 1, 1),   # a core mostly busy: 1.3 free rounds to 1
    (16, 3.2, 1, 13),
    (16, 0.0, 2, 8),  # torchrun with 2 processes on this machine: half each
])
def test_threads_follow_the_free_cores(cores, load, world, expected, monkeypatch, capsys, threads_restored):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert runs.choose_threads(torch.device("cpu")) == expected == torch.get_num_threads()
    assert capsys.readouterr().out.startswith(f"threads: {expected} of {cores} cores (load average {load:.1f}")


def test_omp_num_threads_decides(monkeypatch, capsys, threads_restored):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert runs.choose_threads(torch.device("cpu")) == 1
    assert capsys.readouterr().out == "threads: 1 (OMP_NUM_THREADS=1)\n"


def test_readme_states_the_presets_parameter_counts():
    """One number per fact: each count the README gives is the one train.py prints (count_params)."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for name in ("debug", "first", "demo", "demo_draft", "tinyllama_1b"):
        assert f"{count_params(ModelConfig.from_name(name)):,}" in readme, name
    # no rounded copies that disagree with them (bench.py's table rows name `demo (12.6M ...)`)
    assert not re.search(r"\b(0\.8M|140k|1\.5M)\b", readme)


def test_end_of_text_is_a_visible_separator():
    text = readable(f"first document{EOT}second")
    assert EOT not in text and text.startswith("first document\n\n---") and text.endswith("---\n\nsecond")
    assert "end of text" in text


def test_a_missing_draft_names_the_command_that_makes_it(capsys, tmp_path):
    import decode
    draft = str(tmp_path / "no_draft")
    err = one_error_line(capsys, decode.main, ["--out_dir", str(tmp_path / "target"), "--draft", draft])
    assert f"python train.py --config demo --model demo_draft --out_dir {draft}" in err and "--draft prompt" in err


@pytest.mark.slow  # about a minute on a busy 2-core CPU
def test_threads_experiment_quick_shows_the_collapse(tmp_path):
    """experiments/threads.py --quick: with 2 busy processes per core beside it, a step on one
    thread per core takes longer than on one thread (the claim behind runs.choose_threads)."""
    import json
    import subprocess
    import sys
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: nothing to compare")
    env = {**os.environ, "EXPERIMENTS_OUT": str(tmp_path)}
    env.pop("OMP_NUM_THREADS", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "threads.py"), "--quick"], env=env,
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "threads_quick.json").read_text())
    loaded = result["loaded"]["debug"]
    assert loaded["1"]["wall"] < loaded[str(result["cores"])]["wall"]
    assert r.stdout.strip().splitlines()[-1].endswith("the real run: python experiments/threads.py")
