import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")

from model import ModelConfig  # noqa: E402


# ----------------------------------------------------------------------------- the slow set
# `python -m pytest -q tests` is the fast set, minutes on a laptop; tests marked
# @pytest.mark.slow (every documented command, the experiments, long training runs) are
# left out of it and run with `python -m pytest -q -m slow tests`. Any -m expression
# chooses for itself (-m "slow or not slow": everything). .ci/run runs both sets.
def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the slow set (documented commands, experiments, long runs); "
                                       "python -m pytest -m slow tests runs it")


def pytest_collection_modifyitems(config, items):
    if config.option.markexpr:  # -m given: it selects
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_report_header(config):
    if not config.option.markexpr:
        return "the fast set: tests marked slow are deselected (python -m pytest -q -m slow tests runs them)"


def tiny_config(**kw):
    """A model small enough that every test runs in milliseconds."""
    args = dict(vocab_size=97, block_size=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=2)
    return ModelConfig(**{**args, **kw})


@pytest.fixture(scope="session")
def char_dataset(tmp_path_factory):
    """The default pydoc corpus, character-level, prepared once into a temporary directory."""
    from data.prepare import prepare
    return prepare("pydoc", "char", out=str(tmp_path_factory.mktemp("pydoc_char")), verbose=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# a tiny model for train.py runs that take seconds
TINY = ["--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--n_kv_head", "2", "--block_size", "32",
        "--batch_size", "4", "--eval_iters", "2", "--log_interval", "1"]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # for subprocesses on a busy 2-core machine


@pytest.fixture
def one_thread():
    """Tiny models: one thread is as fast, and far faster on a CPU shared with other jobs (no
    spinning). A test file opts in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_train(args, dataset):
    """train.py in-process on a tiny model; returns the history."""
    import train
    train.peak_flops = lambda device, dtype: None  # skip the CPU FLOP/s probe (MFU): seconds per run on a busy CPU
    cfg, model_args, explicit = train.parse_args(["--dataset", dataset] + TINY + args)
    return train.train(cfg, model_args, explicit)


def train_cmd(dataset, out_dir, *args):
    """The command line of a tiny train.py run, for subprocess tests."""
    return [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", dataset, "--out_dir", out_dir] + TINY + \
        list(args)


def one_error_line(capsys, fn, argv):
    """Run a script's main(argv): it must exit 1 printing exactly one `error:` line."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def snapshot(folder):
    """{relative path: bytes} of every file under folder: to show that nothing changed."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out
