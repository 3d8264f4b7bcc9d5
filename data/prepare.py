"""Corpus -> tokenizer -> train.bin / val.bin (a flat array of token ids) + meta.json.

    python data/prepare.py                            # pydoc corpus, BPE 4096  -> data/pydoc_bpe
    python data/prepare.py --tokenizer char           # pydoc corpus, characters -> data/pydoc_char
    python data/prepare.py --corpus shakespeare       # downloads Tiny Shakespeare -> data/shakespeare_bpe
    python data/prepare.py --corpus my.txt --tokenizer bpe --vocab_size 8192 --out data/mine
    python data/prepare.py --corpus my.txt --tokenizer_from data/pydoc_bpe --out data/mine_pydoc_bpe
        # reuse another dataset's (or out_dir's) tokenizer: for fine-tuning a model on a new corpus

Corpora: "pydoc", the documentation text every Python ships (the standard library's
pydoc_data, what `help('assert')` prints, and its docstrings): the offline default; "shakespeare", Tiny
Shakespeare (Karpathy's char-rnn), downloaded once; or the path of any UTF-8 text file.

The token ids are stored as uint16 (uint32 for vocabularies over 65,536) so training
reads them through np.memmap without loading the file. meta.json is written last: a
directory with a meta.json is complete.
"""

import argparse
import ast
import json
import os
import sys
import sysconfig
import urllib.request

import numpy as np

if __package__ in (None, ""):  # run as `python data/prepare.py`: make `data.` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.tokenizer import EOT, CharTokenizer, bpe_encoding, gpt2_encoding, load_bpe, save_bpe, train_bpe

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


# ----------------------------------------------------------------------------- corpora
def pydoc_corpus():
    """Python's own documentation, offline: the pydoc topics (~465k characters) and the
    standard library's longer docstrings, read with `ast` without importing anything
    (~1.2M characters on CPython 3.11)."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    lib = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
    for root, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 200:
                        docs.append(doc)
    return docs


def shakespeare_corpus():
    path = os.path.join(DATA_DIR, "shakespeare", "input.txt")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            urllib.request.urlretrieve(SHAKESPEARE_URL, path + ".tmp")
        except OSError as e:
            raise RuntimeError(f"downloading Tiny Shakespeare from {SHAKESPEARE_URL} failed ({e}). Offline, "
                               f"pass the file itself: --corpus path/to/tinyshakespeare.txt") from None
        os.replace(path + ".tmp", path)
    with open(path, encoding="utf-8") as f:
        return [f.read()]


def load_corpus(corpus):
    """A list of documents (strings) for a corpus name or a text file path."""
    if corpus == "pydoc":
        return pydoc_corpus()
    if corpus == "shakespeare":
        return shakespeare_corpus()
    if not os.path.isfile(corpus):
        raise FileNotFoundError(f"corpus {corpus!r} is neither 'pydoc', 'shakespeare' nor a text file")
    with open(corpus, encoding="utf-8") as f:
        return [f.read()]


def corpus_name(corpus):
    return corpus if corpus in ("pydoc", "shakespeare") else os.path.splitext(os.path.basename(corpus))[0]


# ----------------------------------------------------------------------------- prepare
def dataset_dir(name):
    """A dataset name ('pydoc_bpe') or path -> its directory (names live under data/)."""
    return name if os.sep in name or os.path.isdir(name) else os.path.join(DATA_DIR, name)


def prepare(corpus="pydoc", tokenizer="bpe", vocab_size=4096, out=None, val_fraction=0.1, verbose=True,
            tokenizer_from=None):
    """Tokenize a corpus into out/{train,val}.bin + meta.json; returns the directory.

    tokenizer_from: a prepared dataset or training out_dir whose tokenizer to reuse (its
    kind replaces `tokenizer`), so a pretrained model can be fine-tuned on this corpus."""
    reused = None
    if tokenizer_from:
        meta_path = os.path.join(tokenizer_from, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"--tokenizer_from {tokenizer_from}: no meta.json there; give a prepared "
                                    f"dataset directory or a training out_dir")
        with open(meta_path) as f:
            reused = json.load(f)
        tokenizer = reused["tokenizer"]
    out = out or os.path.join(DATA_DIR, f"{corpus_name(corpus)}_{tokenizer}")
    docs = load_corpus(corpus)
    text = "\n\n".join(docs)
    meta = {"tokenizer": tokenizer, "corpus": corpus}
    os.makedirs(out, exist_ok=True)
    if tokenizer == "char":
        tok = CharTokenizer(reused["chars"] if reused else "".join(sorted(set(text))))
        ids = tok.encode(text)
        meta["chars"] = tok.chars
    elif tokenizer in ("bpe", "gpt2"):
        if tokenizer == "bpe":
            if reused:
                ranks = load_bpe(os.path.join(tokenizer_from, reused["tokenizer_file"]))
            else:
                ranks = train_bpe(text, vocab_size, verbose=verbose)
            save_bpe(ranks, os.path.join(out, "tokenizer.tiktoken"))
            meta["tokenizer_file"] = "tokenizer.tiktoken"
            tok = bpe_encoding(ranks)
        else:
            tok = gpt2_encoding()
        ids = []
        for doc in docs:  # documents separated by <|endoftext|>
            ids += tok.encode_ordinary(doc) + [tok.eot_token]
        meta["eot_id"] = tok.eot_token
        meta["eot"] = EOT
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}: choose char, bpe or gpt2")

    meta["vocab_size"] = tok.n_vocab
    dtype = np.uint16 if tok.n_vocab <= 2**16 else np.uint32
    meta["dtype"] = np.dtype(dtype).name
    ids = np.array(ids, dtype=dtype)
    n_val = max(int(len(ids) * val_fraction), 1)
    for split, part in (("train", ids[:-n_val]), ("val", ids[-n_val:])):
        path = os.path.join(out, f"{split}.bin")
        part.tofile(path + ".tmp")
        os.replace(path + ".tmp", path)
        meta[f"{split}_tokens"] = int(len(part))
    with open(os.path.join(out, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))
    if verbose:
        print(f"{out}: {tokenizer} tokenizer, vocab {tok.n_vocab}, {len(text):,} characters -> "
              f"{meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="pydoc", help="pydoc (offline default), shakespeare, or a text file")
    p.add_argument("--tokenizer", default="bpe", choices=["char", "bpe", "gpt2"])
    p.add_argument("--vocab_size", type=int, default=4096, help="BPE vocabulary size (bpe only)")
    p.add_argument("--out", default=None, help="output directory (default data/<corpus>_<tokenizer>)")
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--tokenizer_from", default=None, help="reuse the tokenizer of this dataset or out_dir")
    args = p.parse_args(argv)
    try:
        prepare(args.corpus, args.tokenizer, args.vocab_size, args.out, args.val_fraction,
                tokenizer_from=args.tokenizer_from)
    except (OSError, RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
