"""Every generated block of README.md and EXERCISES.md equals what its experiment makes of the
published results JSON (experiments/docs.py): a figure typed by hand, or a JSON that changed
without the documents, fails here."""

import importlib.util
import os

from conftest import ROOT

spec = importlib.util.spec_from_file_location("experiments_docs", os.path.join(ROOT, "experiments", "docs.py"))
docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs)


def test_documents_match_their_results():
    diffs = docs.check()
    assert not diffs, "\n".join(diffs.values())


def test_a_number_typed_into_a_block_is_found(tmp_path):
    """The check is not vacuous: a block whose text differs from its JSON's rendering is a difference."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    blocks = list(docs.BLOCK.finditer(text))
    assert blocks, "README.md has no generated block"
    m = blocks[0]
    edited = text[:m.start(4)] + "| a figure typed by hand | 0.99 |\n" + text[m.end(4):]
    assert docs.render(edited) == text
    assert docs.render(edited) != edited
