"""The figures in README.md and EXERCISES.md, written once: from each experiment's results JSON.

A block of a document between two markers,

    <!-- results: align.win_rates -->
    ...generated text...
    <!-- /results -->

is the text that `tables(results)["win_rates"]` returns in experiments/align.py, where
`results` is experiments/results/align.json: the JSON of the full run, committed, so that
the documents and a fresh clone agree without running anything. Typing a number into a
block by hand is a difference this check finds.

    python experiments/docs.py            # check every block; exit 1 and show what differs
    python experiments/docs.py --update align icl
                                          # take experiments/out/align.json (a full run) as the
                                          # published results, then rewrite the blocks

tests/test_docs_figures.py runs the check, so a figure that no longer matches its JSON fails CI.
"""

import argparse
import difflib
import importlib.util
import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the repository's modules first (experiments/align.py must not shadow align.py)
sys.path.append(HERE)  # then the experiments' own (common.py)

from checkpoint import atomic_write, read_json  # noqa: E402

DOCS = ("README.md", "EXERCISES.md")
RESULTS = os.path.join(HERE, "results")
BLOCK = re.compile(r"(<!-- results: (\w+)\.(\w+) -->\n)(.*?)(<!-- /results -->)", re.S)


def experiment(name):
    """experiments/<name>.py as a module (by path: experiments/align.py and the root's align.py share a name)."""
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(text, cache=None):
    """The document with every block replaced by what its experiment's tables() make of its results."""
    cache = {} if cache is None else cache

    def block(m):
        name, table = m[2], m[3]
        if name not in cache:
            results = read_json(os.path.join(RESULTS, f"{name}.json"), f"the published results of {name}")
            cache[name] = experiment(name).tables(results)
        if table not in cache[name]:
            raise ValueError(f"experiments/{name}.py's tables() has no {table!r} (it has {', '.join(cache[name])})")
        return m[1] + cache[name][table].rstrip("\n") + "\n" + m[5]

    return BLOCK.sub(block, text)


def check(root=ROOT):
    """{document: unified diff} for each document whose blocks differ from their results."""
    out = {}
    for doc in DOCS:
        path = os.path.join(root, doc)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = render(text)
        if new != text:
            out[doc] = "".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True), doc, doc + " (from JSON)"))
    return out


def update(names):
    for name in names:
        src = os.path.join(HERE, "out", f"{name}.json")
        if not os.path.exists(src):
            raise FileNotFoundError(f"{src} not found: run `python experiments/{name}.py` (the full run, not --quick)")
        if read_json(src).get("quick"):
            raise ValueError(f"{src} is a --quick run; publish only a full run's results")
        os.makedirs(RESULTS, exist_ok=True)
        shutil.copyfile(src, os.path.join(RESULTS, f"{name}.json"))
    for doc in DOCS:
        path = os.path.join(ROOT, doc)
        with open(path, encoding="utf-8") as f:
            new = render(f.read())
        atomic_write(path, lambda f: f.write(new), text=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--update", nargs="*", metavar="EXPERIMENT",
                   help="publish experiments/out/<name>.json, then rewrite the documents' blocks")
    args = p.parse_args()
    try:
        if args.update is not None:
            update(args.update)
        diffs = check()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    for diff in diffs.values():
        print(diff)
    if diffs:
        print(f"error: {', '.join(diffs)} differ from experiments/results/*.json; "
              "run `python experiments/docs.py --update` to rewrite the blocks", file=sys.stderr)
        sys.exit(1)
    print("every generated block matches its results JSON")


if __name__ == "__main__":
    main()
