"""Llama's tokenizer, read from either of its two files: SentencePiece's `tokenizer.model`
and Hugging Face's `tokenizer.json` (TinyLlama and Llama 2 ship both).

LLaMA (Touvron et al. 2023, arXiv:2302.13971, section 2.1 "Tokenizer"): byte-pair
encoding with SentencePiece (Kudo & Richardson 2018, arXiv:1808.06226), numbers split
into digits, unknown UTF-8 characters decomposed into bytes ("byte fallback"), 32,000
tokens. TinyLlama (arXiv:2401.02385, section 2) reuses Llama 2's unchanged.

How it encodes, unlike GPT-2's byte-level BPE in data/tokenizer.py:
  1. no splitting into words: spaces become "▁" (U+2581) and one "▁" is put in front,
     "Hello  world" -> "▁Hello▁▁world", and the whole string is one sequence to merge;
  2. start from the string's characters (not its bytes);
  3. repeatedly merge the adjacent pair with the best priority, leftmost first:
     SentencePiece ranks a pair by the score of the piece it makes, Hugging Face by the
     pair's line in its `merges` list (its converter writes them in score order);
  4. a character left that is not in the vocabulary becomes its UTF-8 bytes, "<0xE2>"...

This file is a readable reference that needs neither library. `load_llama_tokenizer`
uses the `tokenizers` / `sentencepiece` library when it is installed (Rust / C++, tens
of MB/s) and this one otherwise; tests/test_data.py checks both give the same ids.
"""

import hashlib
import heapq
import json
import re
import struct

SPACE = "\u2581"  # "▁", SentencePiece's visible space


# ----------------------------------------------------------------------------- the encoder
class LlamaTokenizer:
    """SentencePiece-style BPE with byte fallback; encode(str) -> ids, decode(ids) -> str.

    pieces: id -> piece string. Exactly one of merges (list of (left, right) pairs in
    priority order, Hugging Face) or scores (id -> float, SentencePiece) ranks the merges.
    added: {text: id} of tokenizer.json's added tokens ("<s>", "</s>", ...): where their
    text appears literally it is that one id, as the `tokenizers` library reads it; the
    text between them is encoded piece by piece, each with its "▁" in front, or only the
    one at the start of the text when prefix_first_only (Metaspace's prepend_scheme "first").
    """

    def __init__(self, pieces, merges=None, scores=None, byte_fallback=True, add_prefix=True,
                 prefix_if_missing=False, unk_id=0, bos_id=1, eos_id=2, fuse_unk=True, source="",
                 added=None, prefix_first_only=False):
        self.pieces = list(pieces)
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        if merges is not None:
            self.rank = {(a, b): r for r, (a, b) in enumerate(merges)}
        else:  # SentencePiece: any pair whose concatenation is a piece, the higher its score the sooner
            self.rank = None
            self.score = {p: scores[i] for i, p in enumerate(self.pieces)}
        self.byte_fallback, self.add_prefix, self.prefix_if_missing = byte_fallback, add_prefix, prefix_if_missing
        self.prefix_first_only = prefix_first_only
        self.added = dict(added or {})  # the longest match first, as the library's leftmost-longest search
        self.added_pattern = re.compile("|".join(map(re.escape, sorted(self.added, key=len, reverse=True))) or "(?!)")
        self.fuse_unk = fuse_unk  # a run of unknown characters becomes one <unk>
        self.byte_ids = [self.ids.get(f"<0x{b:02X}>") for b in range(256)]
        self.unk_token, self.bos_token, self.eot_token = unk_id, bos_id, eos_id
        self.n_vocab = len(self.pieces)
        self.source = source

    def priority(self, a, b):
        """Lower merges first; None: the pair never merges."""
        if self.rank is not None:
            return self.rank.get((a, b))
        s = self.score.get(a + b)
        return None if s is None else -s

    def normalize(self, text, at_start=True):
        text = text.replace(" ", SPACE)
        prefix = self.add_prefix and (at_start or not self.prefix_first_only)
        if prefix and not (self.prefix_if_missing and text.startswith(SPACE)):
            text = SPACE + text
        return text

    def encode(self, text):
        """Added tokens' literal text first ("a<s>b" -> "a", <s>, "b"), then BPE on the rest."""
        ids, start = [], 0
        for m in self.added_pattern.finditer(text):
            ids += self.encode_ordinary(text[start:m.start()], at_start=start == 0)
            ids.append(self.added[m.group()])
            start = m.end()
        return ids + self.encode_ordinary(text[start:], at_start=start == 0)

    def encode_ordinary(self, text, at_start=True):
        if not text:
            return []
        sym = list(self.normalize(text, at_start))  # one symbol per character; merged symbols grow in place
        n = len(sym)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))  # a doubly linked list over positions
        heap = []

        def push(i):
            j = nxt[i]
            if j < n:
                p = self.priority(sym[i], sym[j])
                if p is not None:
                    heapq.heappush(heap, (p, i, sym[i], sym[j]))  # ties: the leftmost pair first

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i]
            if sym[i] != a or j >= n or sym[j] != b:
                continue  # stale: one of the two was merged since this pair was pushed
            sym[i], sym[j] = a + b, None
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        ids, i, unk_before = [], 0, False
        while i < n:
            piece = sym[i]
            fallback = [self.byte_ids[b] for b in piece.encode("utf-8")] if self.byte_fallback else [None]
            if piece in self.ids:
                ids.append(self.ids[piece])
            elif None not in fallback:
                ids += fallback
            elif not (self.fuse_unk and unk_before):
                ids.append(self.unk_token)
            unk_before = piece not in self.ids and None in fallback
            i = nxt[i]
        return ids

    def decode(self, ids):
        out, pending = [], bytearray()  # byte pieces are gathered, then decoded together
        for i in ids:
            piece = self.pieces[i]
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                pending.append(int(piece[3:5], 16))
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
            if i in (self.bos_token, self.eot_token, self.unk_token):
                continue
            out.append(piece.replace(SPACE, " "))
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        text = "".join(out)
        return text[1:] if self.add_prefix and text.startswith(" ") else text


# ----------------------------------------------------------------------------- tokenizer.json
def read_hf_json(path):
    """A Llama-format Hugging Face tokenizer.json -> LlamaTokenizer (ours, pure Python).

    Understood: model BPE (byte_fallback), the legacy normalizer [Prepend("▁"),
    Replace(" ", "▁")] of Llama 2 / TinyLlama, or a Metaspace pre-tokenizer that does
    not split; added tokens matched on the raw text. Anything else is refused with a
    ValueError naming it."""
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r}; only Llama-style BPE is read here "
                         f"(pip install tokenizers to load any tokenizer.json)")
    vocab = model["vocab"]
    for t in spec.get("added_tokens", []):
        vocab.setdefault(t["content"], t["id"])
    pieces = [None] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        pieces[i] = piece
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    add_prefix, prefix_if_missing, first_only = _hf_prefix_rule(spec, path)
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    odd = [t["content"] for t in spec.get("added_tokens", [])
           if t.get("normalized") or t.get("lstrip") or t.get("rstrip") or t.get("single_word")]
    if odd:
        raise ValueError(f"{path}: added tokens {odd[:3]} are matched after normalization or strip spaces, "
                         f"which is not Llama's layout read here; pip install tokenizers to load it")
    return LlamaTokenizer(pieces, merges=merges, byte_fallback=model.get("byte_fallback", False),
                          add_prefix=add_prefix, prefix_if_missing=prefix_if_missing,
                          added=special, prefix_first_only=first_only,
                          unk_id=vocab.get(model.get("unk_token") or "<unk>", 0),
                          bos_id=special.get("<s>", vocab.get("<s>")), eos_id=special.get("</s>", vocab.get("</s>")),
                          fuse_unk=model.get("fuse_unk", False), source=path)


def _hf_prefix_rule(spec, path):
    """(add "▁" in front?, only when the text does not already start with one?, only in
    front of the whole text, not after each added token?)"""
    norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    steps = (norm or {}).get("normalizers", [norm] if norm else [])
    kinds = [s["type"] for s in steps]
    if pre is None and kinds in (["Prepend", "Replace"], ["Replace"]):
        return kinds[0] == "Prepend", False, False  # Llama 2 / TinyLlama (the "legacy" format)
    if not steps and pre and pre.get("type") == "Metaspace" and not pre.get("split", True):
        scheme = pre.get("prepend_scheme", "always")
        return scheme != "never", True, scheme == "first"  # Metaspace: no prefix on a text starting with "▁"
    raise ValueError(f"{path}: normalizer {kinds} with pre-tokenizer {(pre or {}).get('type')} is not the "
                     f"Llama layout read here; pip install tokenizers to load it")


# ----------------------------------------------------------------------------- tokenizer.model
def _protobuf_fields(buf):
    """The (field number, value) pairs of one protobuf message (the wire format, enough
    for SentencePiece's ModelProto): varints, 32-bit floats and length-delimited bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def _varint(buf, i):
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def read_sentencepiece(path):
    """A SentencePiece tokenizer.model (ModelProto, sentencepiece_model.proto) -> LlamaTokenizer.

    pieces = field 1 (piece 1, score 2, type 3); trainer_spec = field 2 (model_type 3:
    2 is BPE; byte_fallback 35); normalizer_spec = field 3 (name 1, add_dummy_prefix 3,
    remove_extra_whitespaces 4)."""
    with open(path, "rb") as f:
        buf = f.read()
    pieces, scores, types, trainer, normalizer = [], [], [], {}, {}
    try:
        for field, value in _protobuf_fields(buf):
            if field == 1:
                piece = dict(_protobuf_fields(value))
                pieces.append(piece[1].decode("utf-8"))
                scores.append(struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0)
                types.append(piece.get(3, 1))  # 1 normal, 2 unknown, 3 control, 4 user defined, 6 byte
            elif field == 2:
                trainer = dict(_protobuf_fields(value))
            elif field == 3:
                normalizer = dict(_protobuf_fields(value))
    except (IndexError, KeyError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not a SentencePiece model ({type(e).__name__})") from None
    if trainer.get(3, 1) != 2:
        raise ValueError(f"{path}: SentencePiece model type {trainer.get(3, 1)} (1 unigram, 2 BPE); only BPE "
                         f"(Llama's) is read here; pip install sentencepiece to load it")
    name = normalizer.get(1, b"nmt_nfkc").decode()
    if name != "identity" or normalizer.get(4, 1):
        raise ValueError(f"{path}: normalizer {name!r} (remove_extra_whitespaces={bool(normalizer.get(4, 1))}); "
                         f"only Llama's identity normalizer is read here; pip install sentencepiece to load it")
    # only normal (and user-defined) pieces come out of a merge: not <unk>, <s>, </s> or <0x..>
    scores = [s if t in (1, 4) else float("-inf") for s, t in zip(scores, types)]
    tok = LlamaTokenizer(pieces, scores=scores, byte_fallback=bool(trainer.get(35, 0)),
                         add_prefix=bool(normalizer.get(3, 1)), unk_id=types.index(2) if 2 in types else 0,
                         bos_id=pieces.index("<s>") if "<s>" in pieces else None,
                         eos_id=pieces.index("</s>") if "</s>" in pieces else None, source=path)
    tok.score = {p: s for p, s in tok.score.items() if s != float("-inf")}
    return tok


# ----------------------------------------------------------------------------- the libraries
class LibraryTokenizer:
    """The same interface over the `tokenizers` or `sentencepiece` library (fast, native)."""

    def __init__(self, path, reference):
        self.source, self.reference = path, reference  # reference: our LlamaTokenizer (ids, specials)
        self.n_vocab, self.eot_token = reference.n_vocab, reference.eot_token
        self.bos_token, self.unk_token = reference.bos_token, reference.unk_token
        if path.endswith(".model"):
            import sentencepiece as spm
            self.sp = spm.SentencePieceProcessor(model_file=path)
            self.encode = lambda text: self.sp.encode(text)
            self.decode = lambda ids: self.sp.decode(list(ids))
        else:
            from tokenizers import Tokenizer
            self.hf = Tokenizer.from_file(path)
            self.encode = lambda text: self.hf.encode(text, add_special_tokens=False).ids
            specials = {reference.bos_token, reference.eot_token}
            self.decode = lambda ids: self.hf.decode([i for i in ids if i not in specials], skip_special_tokens=False)


def load_llama_tokenizer(path, backend="auto"):
    """tokenizer.json or tokenizer.model -> an object with encode, decode, n_vocab,
    eot_token (</s>), bos_token (<s>) and fingerprint.

    backend: "python" (this file), "library" (tokenizers / sentencepiece) or "auto"
    (the library when importable, else this file)."""
    ours = read_sentencepiece(path) if path.endswith(".model") else read_hf_json(path)
    tok = ours
    if backend in ("auto", "library"):
        module = "sentencepiece" if path.endswith(".model") else "tokenizers"
        try:
            tok = LibraryTokenizer(path, ours)
        except ImportError:
            if backend == "library":
                raise ImportError(f"{path} needs `pip install {module}` for backend='library'") from None
    tok.fingerprint = llama_fingerprint(ours)
    tok.kind = "sentencepiece" if path.endswith(".model") else "hf"
    return tok


def llama_fingerprint(tok):
    """sha256 over the pieces in id order and the merge priorities: equal iff the same ids."""
    h = hashlib.sha256()
    h.update("\n".join(tok.pieces).encode("utf-8", "surrogatepass"))
    if tok.rank is not None:
        h.update(b"merges\n" + "\n".join(f"{a} {b}" for a, b in sorted(tok.rank, key=tok.rank.get)).encode())
    else:
        h.update(b"scores\n" + json.dumps([tok.score.get(p) for p in tok.pieces]).encode())
    h.update(f"prefix={tok.add_prefix},{tok.prefix_if_missing} bytes={tok.byte_fallback}".encode())
    return h.hexdigest()
