"""Tokenizers: character-level, a byte-level BPE trained here, and GPT-2's (online).

Byte-pair encoding (Sennrich et al. 2016, arXiv:1508.07909; byte-level as in GPT-2,
Radford et al. 2019 section 2.2): start from the 256 byte values and repeatedly merge
the most frequent adjacent pair into a new token. Text is first split into "words" by
GPT-2's regular expression so merges never cross a word boundary.

The trained merges are handed to `tiktoken.Encoding` (its Rust BPE encodes millions of
tokens per second). tiktoken ranks tokens by their bytes: token id = merge order, the
256 single bytes first. The file format is tiktoken's own: one `base64(bytes) id` per line.

Every tokenizer has encode(str) -> list[int], decode(list[int]) -> str and n_vocab.
"""

import base64
import heapq
import json
import os
from collections import Counter, defaultdict

import regex  # a dependency of tiktoken; supports \p{L} like GPT-2's pattern needs

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
EOT_SHOWN = "\n\n---------------- end of text: a new document begins ----------------\n\n"


def readable(text):
    """Generated text for a reader: each end-of-text token as a visible separator line."""
    return text.replace(EOT, EOT_SHOWN)


# ----------------------------------------------------------------------------- char
class CharTokenizer:
    """One token per character of the training text (nanoGPT's shakespeare_char)."""

    def __init__(self, chars):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.n_vocab = len(chars)
        self.eot_token = None

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this character-level vocabulary "
                             f"of {self.n_vocab} characters") from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


# ----------------------------------------------------------------------------- BPE
def train_bpe(text, vocab_size, pattern=GPT2_PATTERN, verbose=False):
    """Learn byte-level BPE merges from text; returns {token bytes: id} for tiktoken.

    vocab_size counts the 256 bytes, the merges and one <|endoftext|> special token.
    Pair counts are kept up to date incrementally: a merge only revisits the words that
    contain the merged pair, so this takes seconds on a megabyte of text.
    """
    if vocab_size < 257:
        raise ValueError(f"a byte-level BPE needs vocab_size >= 257 (256 bytes + <|endoftext|>), got {vocab_size}")
    word_counts = Counter(regex.findall(pattern, text))
    words = [list(w.encode("utf-8")) for w in word_counts]  # each word as a list of token ids
    counts = list(word_counts.values())
    initial = Counter()
    where = defaultdict(set)  # pair -> indices of the words that contain it
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            initial[pair] += counts[i]
            where[pair].add(i)
    pair_counts = PairCounts(initial)

    vocab = [bytes([b]) for b in range(256)]  # id -> bytes
    ranks = {b: i for i, b in enumerate(vocab)}  # bytes -> id
    while len(vocab) < vocab_size - 1 and pair_counts:
        pair = pair_counts.top()  # the most frequent pair (first seen wins ties)
        if pair_counts[pair] < 2:
            break  # nothing left worth merging
        merged = vocab[pair[0]] + vocab[pair[1]]
        new_id = ranks.get(merged)
        if new_id is None:  # the same bytes may arise from two different pairs: keep one id
            new_id = len(vocab)
            vocab.append(merged)
            ranks[merged] = new_id
        for i in list(where[pair]):
            _merge_word(words, i, pair, new_id, counts[i], pair_counts, where)
        if verbose and len(vocab) % 500 == 0:
            print(f"bpe: {len(vocab)} tokens, last {merged!r}")
    return ranks


class PairCounts(Counter):
    """A Counter of pairs that finds its most frequent pair in O(log n): every count it
    takes is also pushed on a heap as (-count, when the pair entered, pair); entries
    whose count or entry time is no longer current are dropped when they surface. Ties
    go to the pair that entered first, as max() over the dict's order would pick."""

    def __init__(self, counts):
        super().__init__()
        dict.update(self, counts)  # the same order as counts
        self.entered = {pair: t for t, pair in enumerate(counts)}
        self.clock = len(counts)
        self.heap = [(-c, self.entered[pair], pair) for pair, c in counts.items()]
        heapq.heapify(self.heap)

    def __setitem__(self, pair, count):
        if pair not in self:
            self.entered[pair], self.clock = self.clock, self.clock + 1
        super().__setitem__(pair, count)
        heapq.heappush(self.heap, (-count, self.entered[pair], pair))

    def top(self):
        while True:
            count, entered, pair = self.heap[0]
            if self.get(pair) == -count and self.entered[pair] == entered:
                return pair
            heapq.heappop(self.heap)  # stale


def _merge_word(words, i, pair, new_id, count, pair_counts, where):
    """Replace every occurrence of `pair` in word i by new_id, updating the pair counts."""
    w = words[i]
    for p in zip(w, w[1:]):  # take the word's old pairs out ...
        pair_counts[p] -= count
        if pair_counts[p] <= 0:
            del pair_counts[p]
        where[p].discard(i)
    out, j = [], 0
    while j < len(w):
        if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
            out.append(new_id)
            j += 2
        else:
            out.append(w[j])
            j += 1
    words[i] = out
    for p in zip(out, out[1:]):  # ... and the new ones in
        pair_counts[p] += count
        where[p].add(i)


def bpe_encoding(ranks, name="bpe"):
    """A tiktoken.Encoding over our merges, with <|endoftext|> as the last id."""
    import tiktoken

    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


def save_bpe(ranks, path):
    """tiktoken's file format: `base64(token bytes) id` per line, in id order, written atomically."""
    from checkpoint import atomic_write  # (imports torch: the tokenizing workers never need it)
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    atomic_write(path, lambda f: f.writelines(lines), text=True)


def load_bpe(path):
    with open(path) as f:
        return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}


# ----------------------------------------------------------------------------- loading
def gpt2_encoding():
    """tiktoken's GPT-2 encoding (50257 tokens); tiktoken downloads it on first use."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise ConnectionError(f"tiktoken could not load the 'gpt2' encoding ({type(e).__name__}: {e}); it is "
                              f"downloaded on first use, which needs the internet. Offline, use --tokenizer bpe "
                              f"(trained here) or --tokenizer char") from None


def load_tokenizer(data_dir, backend="auto"):
    """The tokenizer a prepared dataset (or a training out_dir) was made with, from its meta.json."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: a prepared dataset has one (make it with "
                                f"`python data/prepare.py --out {data_dir}`), and train.py copies it into "
                                f"its out_dir (copy it from the dataset the model was trained on)")
    with open(meta_path) as f:
        meta = json.load(f)
    kind = meta["tokenizer"]
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "bpe":
        path = os.path.join(data_dir, meta["tokenizer_file"])
        if not os.path.exists(path):
            raise FileNotFoundError(f"BPE tokenizer file {path} not found (named in {meta_path}); copy it "
                                    f"from the dataset directory, or re-run data/prepare.py to recreate it")
        return bpe_encoding(load_bpe(path))
    if kind == "gpt2":
        return gpt2_encoding()
    if kind in ("hf", "sentencepiece"):  # Llama's, copied into the dataset by data/prepare.py
        from data.llama_tokenizer import load_llama_tokenizer
        path = os.path.join(data_dir, meta["tokenizer_file"])
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer file {path} not found (named in {meta_path}); copy it from the "
                                    f"dataset directory")
        return load_llama_tokenizer(path, backend)
    raise ValueError(f"{meta_path}: unknown tokenizer {kind!r} (expected char, bpe, gpt2, hf or sentencepiece)")


# ----------------------------------------------------------------------------- any tokenizer
def fingerprint(tok):
    """sha256 of what fixes the ids (the vocabulary and its merges): a checkpoint records
    it so a model is never sampled or trained on with another tokenizer's ids."""
    import hashlib

    if getattr(tok, "fingerprint", None):
        return tok.fingerprint
    h = hashlib.sha256()
    if isinstance(tok, CharTokenizer):
        h.update(b"char\n" + tok.chars.encode("utf-8", "surrogatepass"))
    else:  # a tiktoken.Encoding: its byte-level ranks, pattern and special tokens
        for token, rank in sorted(tok._mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(base64.b64encode(token) + f" {rank}\n".encode())
        h.update(tok._pat_str.encode() + json.dumps(tok._special_tokens, sort_keys=True).encode())
    return h.hexdigest()


def load_any_tokenizer(path, backend="auto"):
    """Any tokenizer this repo reads -> encode, decode, n_vocab, eot_token, fingerprint.

    path: a prepared dataset or training out_dir (its meta.json names the tokenizer), a
    Hugging Face tokenizer.json, a SentencePiece tokenizer.model, a directory holding
    one of those two (a downloaded model), or one of our .tiktoken BPE files. backend:
    for the Llama files, "auto" uses the tokenizers / sentencepiece library when
    installed, else data/llama_tokenizer.py's pure-Python reader ("python")."""
    from data.llama_tokenizer import load_llama_tokenizer

    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "meta.json")):
            tok = load_tokenizer(path, backend)
        else:
            for name in ("tokenizer.json", "tokenizer.model"):
                if os.path.exists(os.path.join(path, name)):
                    return load_any_tokenizer(os.path.join(path, name), backend)
            raise FileNotFoundError(f"{path} holds no meta.json, tokenizer.json or tokenizer.model: give a "
                                    f"prepared dataset, a training out_dir or a tokenizer file")
    elif not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer {path} not found (give a tokenizer.json, tokenizer.model, "
                                f".tiktoken file or a directory holding one)")
    elif path.endswith((".json", ".model")):
        tok = load_llama_tokenizer(path, backend)
    elif path.endswith(".tiktoken"):
        tok = bpe_encoding(load_bpe(path))
    else:
        raise ValueError(f"tokenizer {path}: expected tokenizer.json, tokenizer.model or a .tiktoken file")
    tok.fingerprint = fingerprint(tok)
    return tok


def check_vocab(tok, vocab_size, expected_fingerprint=None, what="the model"):
    """Raise one line if ids from `tok` cannot index a model with `vocab_size` rows, or if
    the model was trained with another tokenizer (its recorded fingerprint differs).
    A smaller tokenizer is fine (embedding tables are often padded, e.g. to a multiple of 64)."""
    if tok.n_vocab > vocab_size:
        raise ValueError(f"the tokenizer has {tok.n_vocab:,} tokens but {what} has vocab_size {vocab_size:,}: "
                         f"ids up to {tok.n_vocab - 1:,} would index past its embedding; use the tokenizer "
                         f"{what} was trained with, or --vocab_size {tok.n_vocab} for a new model")
    if expected_fingerprint and fingerprint(tok) != expected_fingerprint:
        raise ValueError(f"the tokenizer (fingerprint {fingerprint(tok)[:12]}) is not the one {what} was trained "
                         f"with (fingerprint {expected_fingerprint[:12]}): its ids would mean other text")
