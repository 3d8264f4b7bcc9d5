"""Tokenizers round-trip and data/prepare.py writes what training reads."""

import json
import os

import numpy as np
import pytest

from conftest import SHAKESPEARE
import torch

from data.prepare import prepare, pydoc_corpus
from data.tokenizer import EOT, CharTokenizer, bpe_encoding, load_bpe, load_tokenizer, save_bpe, train_bpe

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


# ----------------------------------------------------------------------------- Llama's tokenizer
LLAMA_SAMPLES = SAMPLES + [" ", "a    b", "   three leading", "12345 3.14159 1e-9 007", "x\n\n\ny",
                           "tabs\t\tand\u3000ideographic space", "▁already", "Ünïcödé ÆØÅ ß ﬁ", "🙂🙂 👩‍💻"]


def topics():
    """pydoc's topics alone (instant; the whole pydoc corpus takes seconds to parse)."""
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


def llama_texts():
    return LLAMA_SAMPLES + topics()[150:165]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A Llama-style SentencePiece BPE (byte fallback, digits split, identity normalizer)."""
    spm = pytest.importorskip("sentencepiece", reason="the SentencePiece oracle (pip install sentencepiece)")
    prefix = str(tmp_path_factory.mktemp("sp") / "tokenizer")
    lines = [line for doc in topics()[:150] for line in doc.splitlines()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=800,
                                   model_type="bpe", byte_fallback=True, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   character_coverage=0.99, allow_whitespace_only_pieces=True, minloglevel=2)
    return prefix + ".model"


def test_llama_tokenizer_model_ids_equal_sentencepiece(sp_model):
    import sentencepiece as spm

    from data.llama_tokenizer import load_llama_tokenizer
    ref = spm.SentencePieceProcessor(model_file=sp_model)
    ours = load_llama_tokenizer(sp_model, backend="python")
    assert (ours.n_vocab, ours.bos_token, ours.eot_token) == (800, ref.bos_id(), ref.eos_id())
    for text in llama_texts():
        ids = ours.encode(text)
        assert ids == ref.encode(text), text[:60]
        assert ours.decode(ids) == ref.decode(ids)
    assert any(ours.pieces[i].startswith("<0x") for i in ours.encode("日本語"))  # byte fallback exercised


@pytest.fixture(scope="module", params=["legacy", "metaspace", "legacy-no-bytes"])
def hf_json(request, tmp_path_factory):
    """A Llama-style tokenizer.json trained by `tokenizers`: Llama 2 / TinyLlama's legacy
    normalizer (Prepend + Replace), or the newer Metaspace pre-tokenizer; with Llama's
    256 byte tokens, or without them (unknown characters: one <unk> per run)."""
    pytest.importorskip("tokenizers", reason="the Hugging Face tokenizers oracle")
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    if request.param == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [] if request.param.endswith("no-bytes") else [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
                                  limit_alphabet=90, show_progress=False)
    tok.train_from_iterator((line for doc in topics()[:40] for line in doc.splitlines()), trainer)
    path = str(tmp_path_factory.mktemp("hf") / f"{request.param}.json")
    tok.save(path)
    return path


# literal special-token text: one id wherever it appears, the text between encoded on its own
SPECIAL_TEXTS = ["a<s>b", "<s>hello", "hello </s> world", " <s> x", "x<s>", "<s>", "</s></s>", "<s >", "a <unk> b",
                 "<0x41>B", "  two\n<s>\n", "日本<s>語", "<s><s>", "</s"]


def test_llama_tokenizer_json_ids_equal_tokenizers(hf_json):
    from tokenizers import Tokenizer

    from data.llama_tokenizer import load_llama_tokenizer
    ref = Tokenizer.from_file(hf_json)
    ours, lib = load_llama_tokenizer(hf_json, backend="python"), load_llama_tokenizer(hf_json, backend="library")
    assert (ours.bos_token, ours.eot_token) == (ref.token_to_id("<s>"), ref.token_to_id("</s>"))
    for text in llama_texts() + SPECIAL_TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids == lib.encode(text), text[:60]
    bos, eos = ours.bos_token, ours.eot_token
    assert ours.encode("<s>") == [bos] and ours.encode("</s></s>") == [eos, eos]
    assert ours.encode("a<s>b") == ours.encode("a") + [bos] + (ours.encode("b") if hf_json.endswith("legacy.json")
                                                               else ours.encode_ordinary("b", at_start=False))
    ids = ours.encode("tabs\there, 日本")
    assert ("<unk>" in [ours.pieces[i] for i in ids]) == hf_json.endswith("no-bytes.json")
    if not hf_json.endswith("no-bytes.json"):  # (the library spells <unk> out, ours drops it)
        assert ours.decode(ids) == lib.decode(ids) == "tabs\there, 日本"


def test_load_any_tokenizer_fingerprints(sp_model, tmp_path):
    from data.tokenizer import fingerprint, load_any_tokenizer
    lib, py = load_any_tokenizer(sp_model), load_any_tokenizer(sp_model, backend="python")
    assert lib.fingerprint == py.fingerprint and len(lib.fingerprint) == 64
    assert lib.encode("Hello  world 42") == py.encode("Hello  world 42")
    ranks = train_bpe("the cat sat on the mat " * 20, 270)
    save_bpe(ranks, str(tmp_path / "a.tiktoken"))
    save_bpe(train_bpe("the dog ran to the log " * 20, 270), str(tmp_path / "b.tiktoken"))
    a, b = load_any_tokenizer(str(tmp_path / "a.tiktoken")), load_any_tokenizer(str(tmp_path / "b.tiktoken"))
    assert a.fingerprint == fingerprint(bpe_encoding(ranks)) != b.fingerprint


def test_check_vocab_refuses_a_tokenizer_the_model_cannot_index(sp_model):
    from data.tokenizer import check_vocab, load_any_tokenizer
    tok = load_any_tokenizer(sp_model)
    check_vocab(tok, 800, tok.fingerprint)
    check_vocab(tok, 832)  # a padded embedding is fine
    with pytest.raises(ValueError, match="the tokenizer has 800 tokens but the model has vocab_size 512"):
        check_vocab(tok, 512)
    with pytest.raises(ValueError, match="is not the one the model was trained with"):
        check_vocab(tok, 800, "0" * 64)


# ----------------------------------------------------------------------------- shards
DOCS = [f"document {i}: " + " ".join(f"word{(i * j) % 41}" for j in range(i % 23 + 2)) + (" café ✓" if i % 7 else "")
        for i in range(115)] + [f"text file {i}\n  with lines\n\nand paragraphs {'ok ' * i}\n" for i in range(5)]


def write_corpus(folder, docs=DOCS):
    """The documents across a .jsonl, a .jsonl.gz and (if zstandard is installed) a .jsonl.zst."""
    import gzip
    folder.mkdir(exist_ok=True)
    lines = [json.dumps({"text": d}) + "\n" for d in docs]
    (folder / "a.jsonl").write_text("".join(lines[:50]))
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.write("".join(lines[50:90]))
    try:
        import zstandard
        (folder / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("".join(lines[90:115]).encode()))
    except ImportError:
        (folder / "c.jsonl").write_text("".join(lines[90:115]))
    for i, doc in enumerate(docs[115:]):  # a .txt file is one document
        (folder / f"d{i}.txt").write_text(doc)
    return str(folder)


def read_shards(out, split):
    man = json.load(open(os.path.join(out, "manifest.json")))
    return np.concatenate([np.fromfile(os.path.join(out, s[split]["file"]), dtype=man["dtype"])
                           for s in man["shards"]])


SMALL = dict(vocab_size=300, val_fraction=0.1, batch_chars=400, shard_chars=1500, verbose=False)


def test_shards_decode_back_to_the_documents(tmp_path):
    from data.prepare import prepare_shards
    out = prepare_shards(write_corpus(tmp_path / "corpus"), "bpe", str(tmp_path / "ds"), workers=1, **SMALL)
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert man["complete"] and len(man["shards"]) > 3 and man["eot_id"] == 299
    tok = load_tokenizer(out)
    for split, keep in (("train", False), ("val", True)):  # every 10th document (9, 19, ...) is val
        docs = tok.decode(read_shards(out, split).tolist()).split(EOT)
        assert docs[-1] == "" and docs[:-1] == [d for j, d in enumerate(DOCS) if (j % 10 == 9) == keep]
    assert man["train_tokens"] == len(read_shards(out, "train"))


def test_a_large_txt_file_is_read_in_pieces_cut_at_line_ends(tmp_path):
    from data.prepare import read_pieces
    text = "".join(f"line {i} {'x' * (i % 13)}\n" for i in range(200))
    (tmp_path / "big.txt").write_text(text)
    pieces = list(read_pieces(str(tmp_path / "big.txt"), piece_chars=300))
    assert "".join(p for p, _, _ in pieces) == text and len(pieces) > 5
    assert [(first, last) for _, first, last in pieces] == [(True, False)] + [(False, False)] * (len(pieces) - 2) + [(False, True)]
    for p, _, _ in pieces[:-1]:  # cut at the first line end at or past 300 characters
        assert p.endswith("\n") and len(p) >= 300 > len(p) - len(p[:-1].rsplit("\n", 1)[-1]) - 1


def test_parquet_corpus(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="reading .parquet needs pyarrow")
    import pyarrow.parquet as pq

    from data.prepare import prepare_shards
    pq.write_table(pa.table({"content": DOCS[:30]}), str(tmp_path / "code.parquet"))
    out = prepare_shards(str(tmp_path / "code.parquet"), "bpe", str(tmp_path / "ds"), text_field="content",
                         workers=1, **{**SMALL, "val_fraction": 0.0})
    assert load_tokenizer(out).decode(read_shards(out, "train").tolist()).split(EOT)[:-1] == DOCS[:30]


def test_shards_with_the_llama_tokenizer_frame_documents_with_bos_and_eos(sp_model, tmp_path):
    from data.dataset import open_dataset
    from data.prepare import prepare_shards
    out = prepare_shards(write_corpus(tmp_path / "corpus"), sp_model, str(tmp_path / "ds"), workers=1,
                         **{**SMALL, "val_fraction": 0.0})
    ids = read_shards(out, "train").tolist()
    tok = load_tokenizer(out)  # the tokenizer.model copied into the dataset
    assert ids.count(tok.bos_token) == ids.count(tok.eot_token) == len(DOCS) and ids[0] == tok.bos_token
    bounds = [i for i, t in enumerate(ids) if t == tok.eot_token]
    assert tok.decode(ids[1:bounds[0]]) == DOCS[0] and ids[1:bounds[0]] == tok.encode(DOCS[0])
    assert open_dataset(out, vocab_size=800).fingerprint == tok.fingerprint


def test_prepare_with_two_processes_writes_the_same_shards(tmp_path):
    from data.prepare import prepare_shards
    corpus = write_corpus(tmp_path / "corpus")
    one = prepare_shards(corpus, "bpe", str(tmp_path / "one"), workers=1, **SMALL)
    two = prepare_shards(corpus, "bpe", str(tmp_path / "two"), workers=2, **SMALL)
    for split in ("train", "val"):
        assert np.array_equal(read_shards(one, split), read_shards(two, split))


def test_a_killed_prepare_resumes_exactly(tmp_path, monkeypatch):
    import checkpoint
    from data.prepare import prepare_shards
    corpus = write_corpus(tmp_path / "corpus")
    ref = prepare_shards(corpus, "bpe", str(tmp_path / "ref"), workers=1, **SMALL)
    out = str(tmp_path / "killed")
    prepare_shards(corpus, "bpe", out, workers=1, stop_after_shards=2, **SMALL)  # stopped after 2 shards
    writes = []
    real = checkpoint.atomic_write

    def dies_midway(path, write, text=False):  # then killed while writing the 4th shard's val file
        writes.append(path)
        if len(writes) == 4:
            def half(f):
                f.write(b"\x00" * 10)
                raise KeyboardInterrupt
            return real(path, half, text)
        return real(path, write, text)
    monkeypatch.setattr(checkpoint, "atomic_write", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(corpus, "bpe", out, workers=1, **SMALL)
    monkeypatch.undo()
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert len(man["shards"]) == 3 and not man["complete"]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")] and not os.path.exists(os.path.join(out, "meta.json"))
    prepare_shards(corpus, "bpe", out, workers=1, **SMALL)  # the same command again
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    for name in os.listdir(ref):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(ref, name), "rb").read(), name


def test_an_empty_corpus_is_refused_before_anything_is_written(tmp_path):
    from data.prepare import prepare_shards
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="has no text"):
        prepare_shards(str(tmp_path / "empty.jsonl"), "bpe", str(tmp_path / "out"), verbose=False)
    with pytest.raises(FileNotFoundError, match="matched no"):
        prepare_shards(str(tmp_path / "*.parquet"), "bpe", str(tmp_path / "out"), verbose=False)
    assert not (tmp_path / "out").exists()


def test_prepare_cli_bad_input_is_one_line(tmp_path):
    import subprocess
    import sys
    (tmp_path / "rows.jsonl").write_text(json.dumps({"content": "code"}) + "\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "data", "prepare.py"), "--corpus", str(tmp_path / "rows.jsonl"),
                        "--out", str(tmp_path / "out"), "--workers", "1"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: ") and "has no 'text' field (it has: content); pass --text_field" in r.stderr


# ----------------------------------------------------------------------------- opening datasets
@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """Two sources with one tokenizer, as SlimPajama and StarCoder share Llama's."""
    from data.prepare import prepare_shards
    root = tmp_path_factory.mktemp("mix")
    a = prepare_shards(write_corpus(root / "ca"), "bpe", str(root / "a"), workers=1, **SMALL)
    code = [f"def f{i}(x):\n    return x * {i}\n" for i in range(60)]
    (root / "cb").mkdir()
    (root / "cb" / "code.jsonl").write_text("".join(json.dumps({"text": c}) + "\n" for c in code))
    b = prepare_shards(str(root / "cb"), os.path.join(a, "tokenizer.tiktoken"), str(root / "b"), workers=1, **SMALL)
    return a, b


def copy_dataset(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def test_open_dataset_refuses_a_damaged_or_mismatched_dataset(two_datasets, tmp_path):
    from data.dataset import open_dataset
    ds = open_dataset(two_datasets[0], vocab_size=300)
    assert ds.tokens("train") == json.load(open(os.path.join(two_datasets[0], "manifest.json")))["train_tokens"]
    with pytest.raises(ValueError, match="holds token id 299 but the model's vocab_size is 256"):
        open_dataset(two_datasets[0], vocab_size=256)
    bad = copy_dataset(two_datasets[0], tmp_path / "truncated")
    with open(os.path.join(bad, "train_00001.bin"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=r"train_00001.bin has 10 bytes but its manifest says [\d,]+ tokens x 2"):
        open_dataset(bad)
    bad = copy_dataset(two_datasets[0], tmp_path / "unreadable")
    os.remove(os.path.join(bad, "val_00002.bin"))
    os.mkdir(os.path.join(bad, "val_00002.bin"))  # not a file
    with pytest.raises(ValueError, match="val_00002.bin is missing or unreadable"):
        open_dataset(bad)
    bad = copy_dataset(two_datasets[0], tmp_path / "corrupt")  # an id out of range inside a shard
    ids = np.fromfile(os.path.join(bad, "train_00000.bin"), dtype=np.uint16)
    ids[5] = 4000
    ids.tofile(os.path.join(bad, "train_00000.bin"))
    with pytest.raises(ValueError, match="train_00000.bin holds token id 4,000 but the vocabulary has 300 ids"):
        open_dataset(bad, vocab_size=300)
    bad = copy_dataset(two_datasets[0], tmp_path / "unfinished")
    os.remove(os.path.join(bad, "meta.json"))
    with pytest.raises(ValueError, match="is not finished .* run the same data/prepare.py command again"):
        open_dataset(bad)


def test_open_dataset_reads_the_small_layout(tmp_path):
    from data.dataset import open_dataset
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox. " * 200)
    out = prepare(str(corpus), "char", out=str(tmp_path / "ds"), verbose=False)
    ds = open_dataset(out, vocab_size=17)  # 17 distinct characters
    assert ds.tokens("train") + ds.tokens("val") == 200 * 21
    with pytest.raises(ValueError, match="holds token id 16 but the vocabulary has 10 ids"):
        open_dataset(out, vocab_size=10)


def test_split_too_short_names_the_split_and_the_largest_block_size(two_datasets):
    from data.dataset import check_split_length, draw_windows, open_dataset
    ds = open_dataset(two_datasets[0])
    longest = max(len(s) for s in ds.splits["val"])
    check_split_length(ds, "val", longest - 1)  # the largest block_size the message offers works ...
    xy = draw_windows(ds.splits["val"], 4, longest, torch.Generator().manual_seed(0))
    assert xy.shape == (4, longest)
    with pytest.raises(ValueError, match=rf"the val split of .* longest {longest:,}: fewer than block_size \+ 1 = "
                                         rf"{longest + 1:,} .* use --block_size {longest - 1} or less"):
        check_split_length(ds, "val", longest)  # ... and one more does not


# ----------------------------------------------------------------------------- mixtures
def test_mixture_draws_sources_in_ratio_and_windows_from_them(two_datasets):
    from data.dataset import Mixture
    a, b = two_datasets
    mix = Mixture.from_spec(f"{a}:0.7,{b}:0.3", "train", seq_len=8, vocab_size=300, seed=1)
    counts = torch.zeros(2)
    for _ in range(400):
        xy = mix.draw(100)
        counts += torch.bincount(mix.last_sources, minlength=2)
    assert xy.shape == (100, 9) and xy.dtype == torch.int64
    assert abs(counts[0] / counts.sum() - 0.7) < 0.01  # over 40,000 windows
    streams = {name: torch.from_numpy(np.concatenate(mix.datasets[name].splits["train"]).astype(np.int64))
               for name in mix.names}
    for row, src in zip(xy[:30], mix.last_sources[:30]):  # each window is a slice of the source it was drawn for
        s = streams[mix.names[src]]
        starts = (s[:-8] == row[0]).nonzero().flatten()
        assert any(torch.equal(s[i:i + 9], row) for i in starts.tolist())


def test_mixture_resumes_with_the_identical_next_draws(two_datasets):
    from data.dataset import Mixture
    spec = f"{two_datasets[0]}:0.7,{two_datasets[1]}:0.3"
    run = Mixture.from_spec(spec, "train", seq_len=16, seed=3)
    for _ in range(5):
        run.draw(4)
    state = dict(run.state_dict())
    expected = [run.draw(4) for _ in range(3)]
    resumed = Mixture.from_spec(spec, "train", seq_len=16, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(e, resumed.draw(4)) for e in expected)
    other_rank = Mixture.from_spec(spec, "train", seq_len=16, seed=3, rank=1)
    other_rank.load_state_dict({**state, "rank": 1})
    assert not torch.equal(expected[0], other_rank.draw(4))


@pytest.mark.parametrize("spec, message", [
    ("{a}:0.7,{b}:lots", "the weight of '{b}' is 'lots', not a number"),
    ("{a}:0.7,{b}:-0.3", "the weight of '{b}' is -0.3; weights must be positive"),
    ("{a}:0.7,{b}:0", "weights must be positive"),
    ("{a}:0.7,{a}:0.3", "is named twice"),
    ("{a}:0.7,nowhere_xyz:0.3", "source 'nowhere_xyz' does not exist"),
])
def test_mixture_spec_errors_are_one_line(two_datasets, spec, message):
    from data.dataset import Mixture
    a, b = two_datasets
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        Mixture.from_spec(spec.format(a=a, b=b), "train", seq_len=8)
    assert message.format(a=a, b=b) in str(e.value) and "\n" not in str(e.value)


def test_mixture_refuses_sources_with_different_tokenizers(two_datasets, tmp_path):
    from data.dataset import Mixture
    from data.prepare import prepare_shards
    other = prepare_shards(write_corpus(tmp_path / "c"), "bpe", str(tmp_path / "o"), workers=1,
                           **{**SMALL, "vocab_size": 290})
    with pytest.raises(ValueError, match="were prepared with different tokenizers"):
        Mixture.from_spec(f"{two_datasets[0]}:1,{other}:1", "train", seq_len=8)
