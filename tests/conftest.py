import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")

from model import ModelConfig  # noqa: E402


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
