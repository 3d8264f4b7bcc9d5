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

Corpora of any size (streamed, several processes, resumable) -> token shards + manifest.json:

    python data/prepare.py --corpus 'slimpajama/train/**/*.jsonl.zst' --tokenizer tokenizer.model --out data/slimpajama
    python data/prepare.py --corpus starcoder/ --text_field content --tokenizer tokenizer.json --out data/starcoder
    python data/prepare.py --corpus hf:cerebras/SlimPajama-627B --tokenizer tokenizer.json --out data/sp  # online
    python data/prepare.py --corpus big.txt --tokenizer bpe --vocab_size 32000 --shards --out data/big

A file, a directory (searched recursively) or a glob of .txt, .jsonl, .jsonl.gz,
.jsonl.zst (pip install zstandard) and .parquet (pip install pyarrow) files; or `hf:NAME`
(`hf:NAME:CONFIG`), a Hugging Face dataset streamed with `datasets` (online). The
tokenizer is ours (bpe, trained on the corpus's first --bpe_sample_chars characters;
gpt2) or a file: Llama's tokenizer.json / tokenizer.model (data/llama_tokenizer.py).
Each document becomes [<s>] + its ids + [end-of-text] (<s> where the tokenizer has one,
as TinyLlama's prepare did). Every (1/val_fraction)-th document goes to val.
Memory stays bounded: documents are read one at a time, tokenized in batches of
--batch_chars characters by --workers processes (at most 2 batches per worker in
flight) and written as one train/val shard per --shard_chars characters of input. Each
shard is written atomically and then entered in manifest.json; killed, the same command
resumes after the last shard entered (the input is re-read, not re-tokenized).
"""

import ast
import base64
import glob
import gzip
import io
import json
import multiprocessing
import os
import sys
import sysconfig
import time
import urllib.request
from collections import deque

import numpy as np

if __package__ in (None, ""):  # run as `python data/prepare.py`: make `data.` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import Number, Parser  # noqa: E402
from data.tokenizer import (EOT, CharTokenizer, bpe_encoding, fingerprint, gpt2_encoding, load_any_tokenizer, load_bpe,
                            save_bpe, train_bpe)

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
VAL_FRACTION = Number(float, 0, 1, high_open=True)  # the share of the corpus held out for validation
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
    try:
        with open(corpus, encoding="utf-8") as f:
            return [f.read()]
    except UnicodeDecodeError as e:
        raise ValueError(not_utf8(corpus, e, [], 1)) from None


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
    VAL_FRACTION.check("--val_fraction", val_fraction)
    out = out or os.path.join(DATA_DIR, f"{corpus_name(corpus)}_{tokenizer}")
    docs = load_corpus(corpus)
    text = "\n\n".join(docs)
    if not text.strip():  # before writing anything
        raise ValueError(f"--corpus {corpus!r} has no text (no documents, or only empty ones)")
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
    from checkpoint import atomic_write, write_json  # (imports torch: the tokenizing workers never need it)
    for split, part in (("train", ids[:-n_val]), ("val", ids[-n_val:])):
        atomic_write(os.path.join(out, f"{split}.bin"), lambda f: f.write(part.tobytes()))
        meta[f"{split}_tokens"] = int(len(part))
    write_json(meta, os.path.join(out, "meta.json"))  # last: a dataset with a meta.json is complete
    if verbose:
        print(f"{out}: {tokenizer} tokenizer, vocab {tok.n_vocab}, {len(text):,} characters -> "
              f"{meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens")
    return out


# ----------------------------------------------------------------------------- corpora of any size
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
STRUCTURED = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")  # one document per line / row; anything else is text


def list_files(corpus):
    """A file, a directory (recursively) or a glob -> the sorted corpus files in it."""
    if os.path.isfile(corpus):
        return [corpus]  # named explicitly: read it whatever its suffix (.md, .rst, .py, ... are text)
    if os.path.isdir(corpus):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(corpus) for f in names)
    else:
        files = sorted(glob.glob(corpus, recursive=True))
    files = [f for f in files if f.endswith(SUFFIXES) and os.path.isfile(f)]
    if not files:
        raise FileNotFoundError(f"--corpus {corpus!r} matched no {', '.join(SUFFIXES)} file")
    return files


def open_text(path):
    """A text stream over a (possibly compressed) file."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"{path}: reading .zst files needs `pip install zstandard`") from None
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True),
                                encoding="utf-8")
    return open(path, encoding="utf-8")


def read_pieces(path, text_field="text", piece_chars=1 << 23):
    """Yield (text, first, last) pieces of the documents of one file, in order.

    .jsonl: one document per line, its `text_field`; .parquet: the `text_field` column;
    .txt: the file is one document, read in pieces of about piece_chars characters cut
    at line ends (each piece is tokenized alone: at a cut, whitespace may split into
    tokens differently than in one pass over the file)."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading .parquet files needs `pip install pyarrow`") from None
        for batch in pq.ParquetFile(path).iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                yield text or "", True, True
        return
    with open_text(path) as f:
        if not path.endswith(STRUCTURED):
            lines, n, first = [], 0, True
            for line in f:
                lines.append(line)
                n += len(line)
                if n >= piece_chars:
                    yield "".join(lines), first, False
                    lines, n, first = [], 0, False
            if lines or first:
                yield "".join(lines), first, True
            return
        from checkpoint import json_lines  # (imports torch: only for JSON-lines corpora)
        for i, row in json_lines(f, path):
            if not isinstance(row, dict) or text_field not in row:
                fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path} line {i} has no {text_field!r} field (it has: {fields}); "
                                 f"pass --text_field") from None
            yield str(row[text_field]), True, True


def hf_pieces(name, text_field="text"):
    """A Hugging Face dataset, streamed (online): `hf:NAME` or `hf:NAME:CONFIG`, split train."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise ImportError("--corpus hf:... streams with Hugging Face datasets: pip install datasets") from None
    path, _, config = name.partition(":")
    for row in load_dataset(path, config or None, split="train", streaming=True):
        yield str(row[text_field]), True, True


def iter_pieces(corpus, text_field="text"):
    if corpus.startswith("hf:"):
        yield from hf_pieces(corpus[3:], text_field)
        return
    files = list_files(corpus)
    for n, path in enumerate(files):
        try:
            yield from read_pieces(path, text_field)
        except UnicodeDecodeError as e:
            raise ValueError(not_utf8(path, e, files[:n], len(files))) from None


def not_utf8(path, e, read, total):
    """One line: which file is not UTF-8, where, and which files were read before it."""
    before = ", ".join(read[:3]) + (f" and {len(read) - 3} more" if len(read) > 3 else "") if read else "none"
    return (f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); read before it ({len(read)} of {total} "
            f"files): {before}; convert it to UTF-8 (iconv -f latin1 -t utf-8) or move it out of the corpus")


# ----------------------------------------------------------------------------- tokenizing workers
_worker_tok = None


def _init_worker(spec):
    global _worker_tok
    _worker_tok = resolve_tokenizer(spec)


def resolve_tokenizer(spec):
    """("gpt2", None) or (kind, path of the tokenizer file in the output directory) -> tokenizer."""
    kind, path = spec
    return gpt2_encoding() if kind == "gpt2" else load_any_tokenizer(path)


def tokenize_batch(batch, dtype, tok=None):
    """[(text, first, last, to_val)] -> (train ids, val ids, max id, UTF-8 bytes, documents)."""
    tok = tok or _worker_tok
    bos = getattr(tok, "bos_token", None)
    encode = getattr(tok, "encode_ordinary", tok.encode)  # tiktoken: <|endoftext|> in text is plain text
    ids = {False: [], True: []}
    n_bytes = docs = 0
    for text, first, last, to_val in batch:
        part = ids[to_val]
        if first and bos is not None:
            part.append(bos)
        part += encode(text)
        if last:
            part.append(tok.eot_token)
            docs += 1
        n_bytes += len(text.encode("utf-8"))
    train, val = np.array(ids[False], dtype=dtype), np.array(ids[True], dtype=dtype)
    top = max(int(train.max(initial=0)), int(val.max(initial=0)))
    return train, val, top, n_bytes, docs


def batches_and_shards(pieces, val_fraction, batch_chars, shard_chars):
    """Group pieces into batches and batches into shards; yields (shard index, batch, closes
    shard). Depends only on the input and the sizes, so a resumed run cuts the same shards."""
    batch, n_batch, n_shard, shard, doc = [], 0, 0, 0, 0
    for text, first, last in pieces:
        # document j goes to val when floor((j + 1) f) > floor(j f): every (1/f)-th one
        to_val = int((doc + 1) * val_fraction) > int(doc * val_fraction)
        batch.append((text, first, last, to_val))
        doc += last
        n_batch += len(text)
        if n_batch >= batch_chars:
            n_shard += n_batch
            yield shard, batch, n_shard >= shard_chars
            batch, n_batch = [], 0
            if n_shard >= shard_chars:
                shard, n_shard = shard + 1, 0
    if batch or n_shard:
        yield shard, batch, True


# ----------------------------------------------------------------------------- shards + manifest
def peak_memory_bytes():
    """This process's peak resident memory (VmHWM, Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None


def setup_tokenizer(corpus, tokenizer, out, vocab_size, text_field, bpe_sample_chars, verbose):
    """Copy the tokenizer file into `out` (training our BPE first if asked); returns (spec, meta)."""
    from checkpoint import atomic_write

    if tokenizer == "gpt2":
        return ("gpt2", None), {"tokenizer": "gpt2"}
    if tokenizer == "bpe":
        path = os.path.join(out, "tokenizer.tiktoken")
        if not os.path.exists(path):  # a resumed run keeps the BPE it trained
            sample, n = [], 0
            for text, _, _ in iter_pieces(corpus, text_field):
                sample.append(text[:bpe_sample_chars - n])
                n += len(sample[-1])
                if n >= bpe_sample_chars:
                    break
            t0 = time.time()
            ranks = train_bpe("\n\n".join(sample), vocab_size)
            if verbose:
                print(f"bpe: trained {len(ranks) + 1:,} tokens on {n:,} characters in {time.time() - t0:.0f} s")
            atomic_write(path, lambda f: f.writelines(f"{base64.b64encode(t).decode()} {r}\n" for t, r in
                                                       sorted(ranks.items(), key=lambda kv: kv[1])), text=True)
        return ("bpe", path), {"tokenizer": "bpe", "tokenizer_file": "tokenizer.tiktoken"}
    if os.path.isdir(tokenizer):
        found = [n for n in ("tokenizer.json", "tokenizer.model") if os.path.exists(os.path.join(tokenizer, n))]
        if not found:
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no tokenizer.json or tokenizer.model there")
        tokenizer = os.path.join(tokenizer, found[0])
    if not os.path.isfile(tokenizer):
        raise FileNotFoundError(f"--tokenizer {tokenizer!r} is neither bpe, gpt2 nor a tokenizer file")
    name = {".json": "tokenizer.json", ".model": "tokenizer.model", ".tiktoken": "tokenizer.tiktoken"}.get(
        os.path.splitext(tokenizer)[1])
    if name is None:
        raise ValueError(f"--tokenizer {tokenizer}: expected a tokenizer.json, tokenizer.model or .tiktoken file")
    with open(tokenizer, "rb") as f:
        data = f.read()
    atomic_write(os.path.join(out, name), lambda f: f.write(data))
    kind = {"tokenizer.json": "hf", "tokenizer.model": "sentencepiece", "tokenizer.tiktoken": "bpe"}[name]
    return (kind, os.path.join(out, name)), {"tokenizer": kind, "tokenizer_file": name}


def prepare_shards(corpus, tokenizer="bpe", out=None, vocab_size=32000, text_field="text", val_fraction=0.01,
                   workers=None, batch_chars=1 << 20, shard_chars=1 << 28, bpe_sample_chars=1 << 22,
                   verbose=True, stop_after_shards=None):
    """Stream a corpus of any size into out/{train,val}_NNNNN.bin shards + manifest.json +
    meta.json; resumes a killed run. Returns out. stop_after_shards: stop (as if killed)
    once that many shards are entered in the manifest (for tests)."""
    if out is None:  # data/<the corpus's path or glob, its odd characters as _>_shards
        name = "".join(c if c.isalnum() or c in "-." else "_" for c in corpus.removeprefix("hf:").strip("/*."))
        out = os.path.join(DATA_DIR, f"{name.strip('_')}_shards")
    VAL_FRACTION.check("--val_fraction", val_fraction)
    if tokenizer == "char":  # its vocabulary is every character of the corpus, known only after reading it all
        raise ValueError(f"--tokenizer char is for the small path (pydoc, shakespeare or one text file); for "
                         f"--corpus {corpus!r}, read in shards, use bpe, gpt2 or a tokenizer file")
    if not any(text.strip() for text, _, _ in iter_pieces(corpus, text_field)):  # before writing anything
        raise ValueError(f"--corpus {corpus!r} has no text (no documents, or only empty ones)")
    from checkpoint import atomic_write, read_json, write_json  # (imports torch: after the quick checks)

    manifest_path = os.path.join(out, "manifest.json")
    settings = {"corpus": corpus, "text_field": text_field, "val_fraction": val_fraction,
                "batch_chars": batch_chars, "shard_chars": shard_chars}
    manifest = None
    if os.path.exists(manifest_path):
        manifest = read_json(manifest_path, "the manifest of a prepare")
        if manifest["settings"] != settings:
            changed = [k for k in settings if manifest["settings"].get(k) != settings[k]]
            raise ValueError(f"{out} holds a prepare with other {', '.join(changed)}; to resume give the same "
                             f"arguments, or choose another --out")
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    try:
        spec, meta = setup_tokenizer(corpus, tokenizer, out, vocab_size, text_field, bpe_sample_chars, verbose)
    except BaseException:
        if created and not os.listdir(out):
            os.rmdir(out)  # a prepare refused at its tokenizer leaves no empty folder behind
        raise
    tok = resolve_tokenizer(spec)
    dtype = np.uint16 if tok.n_vocab <= 2**16 else np.uint32
    if manifest is None:
        manifest = {"settings": settings, "tokenizer": meta["tokenizer"], "fingerprint": fingerprint(tok),
                    "vocab_size": tok.n_vocab, "eot_id": tok.eot_token, "bos_id": getattr(tok, "bos_token", None),
                    "dtype": np.dtype(dtype).name, "shards": [], "complete": False}
    elif manifest["fingerprint"] != fingerprint(tok):
        raise ValueError(f"{out} was prepared with another tokenizer (fingerprint {manifest['fingerprint'][:12]}, "
                         f"this one {fingerprint(tok)[:12]}); choose another --out")
    if manifest["complete"]:
        if verbose:
            print(f"{out}: already prepared ({len(manifest['shards'])} shards)")
        return out
    done = len(manifest["shards"])

    workers = workers or os.cpu_count() or 1
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (spec,)) if workers > 1 else None
    inflight = deque()  # (shard, closes, result): at most 2 batches per worker, so memory stays bounded
    buffers = {"train": [], "val": []}
    stats = {"max_id": 0, "bytes": 0, "docs": 0}
    t0, n_bytes, n_tokens = time.time(), 0, 0

    def collect():
        nonlocal n_bytes, n_tokens
        shard, closes, result = inflight.popleft()
        train, val, top, nb, docs = result.get() if pool else result
        buffers["train"].append(train)
        buffers["val"].append(val)
        stats["max_id"] = max(stats["max_id"], top)
        stats["bytes"] += nb
        stats["docs"] += docs
        n_bytes, n_tokens = n_bytes + nb, n_tokens + len(train) + len(val)
        if closes:
            write_shard(shard)

    def write_shard(shard):
        entry = {"index": shard, "docs": stats["docs"], "bytes": stats["bytes"], "max_id": stats["max_id"]}
        for split in ("train", "val"):
            ids = np.concatenate(buffers[split]) if buffers[split] else np.zeros(0, dtype)
            name = f"{split}_{shard:05d}.bin"
            atomic_write(os.path.join(out, name), lambda f: f.write(ids.tobytes()))
            entry[split] = {"file": name, "tokens": int(len(ids))}
            buffers[split] = []
        stats.update(max_id=0, bytes=0, docs=0)
        manifest["shards"].append(entry)
        write_json(manifest, manifest_path)  # the shard is complete only once it is entered here
        if verbose:
            elapsed = time.time() - t0
            print(f"shard {shard}: {entry['train']['tokens']:,} train + {entry['val']['tokens']:,} val tokens "
                  f"| {n_bytes / 1e6 / elapsed:.1f} MB/s, {n_tokens / elapsed:,.0f} tokens/s")

    try:
        for shard, batch, closes in batches_and_shards(iter_pieces(corpus, text_field), val_fraction,
                                                       batch_chars, shard_chars):
            if shard < done:
                continue  # entered in the manifest by an earlier run
            if stop_after_shards is not None and shard >= stop_after_shards:
                break
            job = pool.apply_async(tokenize_batch, (batch, dtype)) if pool else tokenize_batch(batch, dtype, tok)
            inflight.append((shard, closes, job))
            while len(inflight) > 2 * workers:
                collect()
        while inflight:
            collect()
    finally:
        if pool:
            pool.terminate()
    if stop_after_shards is not None and len(manifest["shards"]) >= stop_after_shards:
        return out
    manifest["complete"] = True
    for split in ("train", "val"):
        manifest[f"{split}_tokens"] = sum(s[split]["tokens"] for s in manifest["shards"])
    write_json(manifest, manifest_path)
    meta.update(format="shards", corpus=corpus, vocab_size=tok.n_vocab, eot_id=tok.eot_token, dtype=manifest["dtype"],
                fingerprint=manifest["fingerprint"], train_tokens=manifest["train_tokens"],
                val_tokens=manifest["val_tokens"])
    write_json(meta, os.path.join(out, "meta.json"))  # written last: a directory with a meta.json is complete
    if verbose:
        elapsed, peak = time.time() - t0, peak_memory_bytes()
        print(f"{out}: {len(manifest['shards'])} shards, {manifest['train_tokens']:,} train + "
              f"{manifest['val_tokens']:,} val tokens; this run {n_bytes / 1e6:,.0f} MB in {elapsed:.0f} s = "
              f"{n_bytes / 1e6 / elapsed:.1f} MB/s, {n_tokens / elapsed:,.0f} tokens/s"
              + (f"; peak memory (VmHWM) of this process {peak / 2**20:,.0f} MiB" if peak else ""))
    return out


def use_shards(corpus, tokenizer):
    """The streaming path for anything but the small built-in corpora / one .txt with our tokenizers."""
    small = corpus in ("pydoc", "shakespeare") or (os.path.isfile(corpus) and not corpus.endswith(STRUCTURED))
    return not (small and tokenizer in ("char", "bpe", "gpt2"))


def argument_parser():
    p = Parser(__doc__)
    p.add_argument("--corpus", default="pydoc", help="pydoc (offline default), shakespeare, a file, a directory, "
                   "a glob of .txt/.jsonl/.jsonl.gz/.jsonl.zst/.parquet files, or hf:NAME[:CONFIG] (online)")
    p.add_argument("--tokenizer", default="bpe", help="char, bpe (trained here), gpt2, or a tokenizer.json / "
                   "tokenizer.model / .tiktoken file (or a directory holding one)")
    p.add_argument("--vocab_size", type=Number(int, 257), default=None, help="BPE vocabulary size: 256 bytes, "
                   "the merges and <|endoftext|> (bpe only; default 4096, 32000 for shards)")
    p.add_argument("--out", default=None, help="output directory (default data/<corpus>_<tokenizer>)")
    p.add_argument("--val_fraction", type=VAL_FRACTION, default=None, help="the share of the corpus held out for "
                   "validation (default 0.1, 0.01 for shards)")
    p.add_argument("--tokenizer_from", default=None, help="reuse the tokenizer of this dataset or out_dir")
    p.add_argument("--shards", action="store_true", help="stream into shards even for a small corpus")
    p.add_argument("--text_field", default="text", help="the JSON field / parquet column holding the text")
    p.add_argument("--workers", type=Number(int, 1), default=None, help="tokenizing processes (default: every CPU)")
    p.add_argument("--batch_chars", type=Number(int, 1), default=1 << 20, help="characters per tokenizing task")
    p.add_argument("--shard_chars", type=Number(int, 1), default=1 << 28, help="characters of input per shard")
    p.add_argument("--bpe_sample_chars", type=Number(int, 1), default=1 << 22, help="characters our BPE trains on "
                   "(shards; train_bpe takes minutes per million characters at 32,000 tokens)")
    return p


def parse_args(argv):
    return argument_parser().parse_args(argv)


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.shards or use_shards(args.corpus, args.tokenizer):
            prepare_shards(args.corpus, args.tokenizer, args.out, args.vocab_size or 32000, args.text_field,
                           0.01 if args.val_fraction is None else args.val_fraction, args.workers,
                           args.batch_chars, args.shard_chars, args.bpe_sample_chars)
        else:
            prepare(args.corpus, args.tokenizer, args.vocab_size or 4096, args.out,
                    0.1 if args.val_fraction is None else args.val_fraction, tokenizer_from=args.tokenizer_from)
    except (OSError, RuntimeError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
