"""Tokenizers round-trip and data/prepare.py writes what training reads."""

import json
import os

import numpy as np
import pytest

from conftest import SHAKESPEARE
from data.prepare import prepare, pydoc_corpus
from data.tokenizer import CharTokenizer, bpe_encoding, load_bpe, load_tokenizer, save_bpe, train_bpe

SAMPLES = ["Hello, world!", "  leading spaces\tand\ttabs\n\n\nnewlines  ", "def f(x):\n    return x ** 2  # ok",
           "naïve café — 日本語 emoji 🙂", "'s 're 've don't", ""]


@pytest.fixture(scope="module")
def bpe():
    text = "\n\n".join(pydoc_corpus()[:40])
    return train_bpe(text, 512), text


def test_bpe_round_trips_any_text(bpe):
    enc = bpe_encoding(bpe[0])
    for s in SAMPLES + [bpe[1][:5000]]:
        assert enc.decode(enc.encode_ordinary(s)) == s


def test_bpe_vocabulary_and_compression(bpe):
    ranks, text = bpe
    enc = bpe_encoding(ranks)
    assert enc.n_vocab == 512 and enc.eot_token == 511  # 256 bytes + 255 merges + <|endoftext|>
    assert sorted(ranks.values()) == list(range(511))
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert len(text.encode()) / len(enc.encode_ordinary(text)) > 2.0  # 255 merges: ~2.1 bytes per token
    assert b" the" in ranks  # the most common English word with its space


def test_tiktoken_reproduces_the_trainers_segmentation(monkeypatch):
    """tiktoken merges by token rank; training merged by pair frequency. On the training
    text both must give the same tokens, word for word."""
    import regex
    from collections import Counter

    from data import tokenizer as t
    text = "\n\n".join(pydoc_corpus()[:10])
    seen = {}

    def spy(words, *args):
        seen["words"] = words  # the trainer's final segmentation of every distinct word
        return merge_word(words, *args)
    merge_word = t._merge_word
    monkeypatch.setattr(t, "_merge_word", spy)
    enc = bpe_encoding(train_bpe(text, 400))
    for word, ids in zip(Counter(regex.findall(t.GPT2_PATTERN, text)), seen["words"]):
        assert enc.encode_ordinary(word) == ids


def test_bpe_file_round_trip(bpe, tmp_path):
    save_bpe(bpe[0], str(tmp_path / "tok.tiktoken"))
    assert load_bpe(str(tmp_path / "tok.tiktoken")) == bpe[0]


def test_bpe_needs_room_for_the_bytes():
    with pytest.raises(ValueError, match="vocab_size >= 257"):
        train_bpe("abc", 100)


def test_char_round_trip_and_unknown_character():
    tok = CharTokenizer("".join(sorted(set("".join(SAMPLES)))))
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    with pytest.raises(ValueError, match="'Z' is not in this character-level vocabulary"):
        tok.encode("Z")


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_prepare_writes_bins_that_decode_to_the_corpus(tokenizer, tmp_path):
    corpus = tmp_path / "corpus.txt"
    text = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(300))
    corpus.write_text(text)
    out = prepare(str(corpus), tokenizer, vocab_size=300, out=str(tmp_path / "ds"), verbose=False)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["dtype"] == "uint16"
    train = np.fromfile(os.path.join(out, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(out, "val.bin"), dtype=np.uint16)
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    assert abs(len(val) / (len(train) + len(val)) - 0.1) < 0.01
    tok = load_tokenizer(out)
    decoded = tok.decode(np.concatenate([train, val]).tolist())
    assert decoded.replace("<|endoftext|>", "") == text


def test_default_corpus_is_offline_python_documentation():
    docs = pydoc_corpus()
    assert any('The "assert" statement' in d for d in docs)
    assert sum(map(len, docs)) > 400_000


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make it with `python data/prepare.py --out"):
        load_tokenizer(str(tmp_path))


def test_gpt2_offline_error_says_what_to_do(monkeypatch):
    import tiktoken

    from data import tokenizer as t

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(ConnectionError, match="needs the internet. Offline, use --tokenizer bpe"):
        t.gpt2_encoding()


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="../shared/data/tinyshakespeare.txt not present")
def test_shakespeare_char_vocabulary(tmp_path):
    out = prepare(SHAKESPEARE, "char", out=str(tmp_path / "sc"), verbose=False)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["vocab_size"] == 65  # as in nanoGPT's shakespeare_char
    assert meta["train_tokens"] + meta["val_tokens"] == 1_115_394
