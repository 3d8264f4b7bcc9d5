"""Every command in README.md and EXERCISES.md runs as written, on a fresh copy of the repo.

The commands are read from the documents' indented code blocks, in the order a reader
meets them, and run with NANO_QUICK=1: train.py, sample.py, bench.py and the experiments
then cap iterations, evaluation and sample lengths (see `quick_caps` in train.py), so the
commands are exercised, not the training runs they describe. A command marked
`# needs: internet`, `# needs: gpu` or `# needs: your files` in the document is skipped with
that reason. Every documented command belongs to the slow set (`python -m pytest -m slow
tests`, conftest.py): together they take longer than a lesson's test run.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

DOCS = ["README.md", "EXERCISES.md"]


def commands(doc):
    """(line number, command, reason to skip or None) for each shell command of a document's
    indented code blocks; `\\` continues a command on the next line."""
    out, pending, start = [], "", 0
    lines = open(os.path.join(ROOT, doc)).read().splitlines()
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not pending and (not line.startswith("    ") or not text.startswith(("python ", "torchrun ", "pip "))):
            continue
        start = start if pending else number
        pending += text.removesuffix("\\").strip() + " "
        if text.endswith("\\"):
            continue
        command, _, comment = pending.partition("# ")
        command = command.strip()
        pending = ""
        for part in command.split("&&"):
            part = part.strip()
            if part.startswith("pip "):
                continue  # the environment: CI installs it
            need = re.search(r"needs: ([\w ]+)", comment)
            reason = f"needs {need[1].strip()}" if need else None
            if part.startswith("python -m pytest"):
                reason = "runs part of this test suite, which runs anyway"
            out.append((f"{doc}:{start}", part, reason))
    return out


def first_of_each(found):
    """A command that appears again (word for word) runs once: the later copy is skipped."""
    seen, out = {}, []
    for where, command, reason in found:
        if reason is None and command in seen:
            reason = f"the same command as {seen[command]}, which runs"
        seen.setdefault(command, where)
        out.append((where, command, reason))
    return out


ALL = first_of_each([c for doc in DOCS for c in commands(doc)])


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory):
    """The repository's files (tracked and new, not outputs) in a fresh folder."""
    dst = tmp_path_factory.mktemp("fresh") / "repo"
    ignore = shutil.ignore_patterns(".git", ".venv", "out", "__pycache__", ".pytest_cache", "_doc_*",
                                    "pydoc_*", "shakespeare*")
    shutil.copytree(ROOT, dst, ignore=ignore)
    shutil.rmtree(dst / "experiments" / "out", ignore_errors=True)
    return dst


def test_the_documents_have_commands():
    assert len(commands("README.md")) >= 10 and len(commands("EXERCISES.md")) >= 10
    assert not [c for _, c, _ in ALL if "../shared" in c]  # users do not have the course's files


@pytest.mark.slow
@pytest.mark.parametrize("where, command, reason", ALL, ids=[w for w, _, _ in ALL])
def test_documented_command_runs(where, command, reason, fresh_copy, tmp_path):
    if reason:
        pytest.skip(reason)
    results = tmp_path / "results"
    env = {**os.environ, "NANO_QUICK": "1", "EXPERIMENTS_OUT": str(results), "OMP_NUM_THREADS": "2"}
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"] + argv[1:]
    r = subprocess.run(argv, cwd=fresh_copy, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"{where}: `{command}` failed:\n{r.stderr[-3000:]}"
    if "experiments/" in command and not command.startswith("python -m"):
        made = os.listdir(results) if results.exists() else []
        assert any(f.endswith(".png") for f in made) and any(f.endswith(".json") for f in made), made
