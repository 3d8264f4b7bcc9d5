"""Reading prepared data: token shards checked on opening, (B, T+1) windows drawn from them,
and mixtures of datasets sampled by weight, as TinyLlama's SlimPajama : StarCoder = 7 : 3.

TinyLlama (arXiv:2401.02385, section 2) samples natural language (SlimPajama) and code
(StarCoderData) at about 7:3. Here each row of a batch picks its source with
probability weight / sum(weights), then a shard of that source in proportion to the
windows it holds, then a window uniformly: over many rows the sources' shares of the
tokens trained on match the weights.

Determinism and resume: draw number k of a sampler uses a torch.Generator seeded from
(seed, rank, k) alone, so the whole state is the counter k: `state_dict()` is
{"seed", "rank", "draws"} and a sampler restored from it draws exactly what the
original would have drawn next.

    ds = open_dataset("data/slimpajama", vocab_size=32000)     # checks shards and ids
    mix = Mixture.from_spec("slimpajama:0.7,starcoder:0.3", "train", seq_len=2048, vocab_size=32000, seed=1337)
    xy = mix.draw(8)                                             # (8, 2049) int64: x = xy[:, :-1], y = xy[:, 1:]
    state = mix.state_dict()                                     # into the checkpoint
"""

import json
import os

import numpy as np
import torch

from data.prepare import dataset_dir

SCAN_TOKENS = 1 << 20  # ids checked at each end of every shard when a dataset opens


# ----------------------------------------------------------------------------- opening
class TokenDataset:
    """A prepared dataset: meta (its meta.json), splits {"train": [shard arrays], "val": [...]}
    as read-only memory maps, and the tokenizer's fingerprint (None for older datasets)."""

    def __init__(self, path, meta, splits):
        self.path, self.meta, self.splits = path, meta, splits
        self.fingerprint = meta.get("fingerprint")

    def tokens(self, split):
        return sum(len(s) for s in self.splits[split])


def open_dataset(name, vocab_size=None, full_check=False):
    """Open a prepared dataset (shards + manifest.json, or the small train.bin/val.bin
    layout) and check it: every shard present, readable and of the size its manifest
    says, and no token id >= vocab_size (the model's embedding rows). The manifest's
    recorded largest id is checked, and the ids themselves at both ends of every shard
    (all of them with full_check=True, and always for the small layout).
    Raises FileNotFoundError / ValueError with one line naming the file and the fix."""
    path = dataset_dir(name)
    manifest_path, meta_path = os.path.join(path, "manifest.json"), os.path.join(path, "meta.json")
    redo = f"re-run the data/prepare.py command that made {path}"
    if not os.path.exists(meta_path):
        if os.path.exists(manifest_path):
            done = len(_read_json(manifest_path)["shards"])
            raise ValueError(f"dataset {path} is not finished ({done} shards so far): run the same data/prepare.py "
                             f"command again to resume it")
        raise FileNotFoundError(f"dataset {path} is not prepared (no meta.json): run `python data/prepare.py "
                                f"--corpus CORPUS --tokenizer TOKENIZER --out {path}`")
    meta = _read_json(meta_path)
    if meta.get("vocab_size", 1) < 1:
        raise ValueError(f"dataset {path} has an empty vocabulary (meta.json: vocab_size {meta['vocab_size']}): it "
                         f"was prepared from a corpus without text; prepare one with text into another --out")
    dtype = np.dtype(meta["dtype"])
    if meta.get("format") == "shards":
        manifest = _read_json(manifest_path)
        entries = {split: [(s[split]["file"], s[split]["tokens"]) for s in manifest["shards"]]
                   for split in ("train", "val")}
        recorded_max = max((s["max_id"] for s in manifest["shards"]), default=0)
    else:  # data/prepare.py's small layout: one train.bin and one val.bin
        entries = {split: [(f"{split}.bin", meta[f"{split}_tokens"])] for split in ("train", "val")}
        recorded_max, full_check = None, True
    if vocab_size is not None and recorded_max is not None and recorded_max >= vocab_size:
        raise ValueError(f"dataset {path} holds token id {recorded_max:,} but the model's vocab_size is "
                         f"{vocab_size:,}: it was prepared with another tokenizer than the model's")
    splits = {}
    for split, files in entries.items():
        splits[split] = []
        for file, n in files:
            shard = _open_shard(os.path.join(path, file), n, dtype, redo)
            if vocab_size is not None:
                _check_ids(shard, vocab_size, os.path.join(path, file), full_check)
            splits[split].append(shard)
    return TokenDataset(path, meta, splits)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is unreadable or not valid JSON ({getattr(e, 'strerror', None) or e}); "
                         f"re-run the data/prepare.py command that made it") from None


def _open_shard(path, n_tokens, dtype, redo):
    """A shard as a read-only memory map, after checking its size against the manifest."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"shard {path} is missing or unreadable ({e.strerror}); {redo}") from None
    if size != n_tokens * dtype.itemsize:
        raise ValueError(f"shard {path} has {size:,} bytes but its manifest says {n_tokens:,} tokens x "
                         f"{dtype.itemsize} bytes = {n_tokens * dtype.itemsize:,}: it is truncated or another "
                         f"file; {redo}")
    if n_tokens == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _check_ids(shard, vocab_size, path, full):
    parts = [shard] if full or len(shard) <= 2 * SCAN_TOKENS else [shard[:SCAN_TOKENS], shard[-SCAN_TOKENS:]]
    top = max((int(p.max()) for p in parts if len(p)), default=None)  # None: an empty shard holds no ids
    if top is not None and top >= vocab_size:
        raise ValueError(f"shard {path} holds token id {top:,} but the vocabulary has {vocab_size:,} ids: it "
                         f"was prepared with another tokenizer than the model's (or is corrupt)")


def check_split_length(dataset, split, block_size):
    """A window is block_size + 1 tokens inside one shard: say so in one line when the
    split's longest shard is shorter, with the largest block_size it allows."""
    shards = dataset.splits[split]
    longest = max((len(s) for s in shards), default=0)
    if longest < block_size + 1:
        total = sum(len(s) for s in shards)
        fix = f"use --block_size {longest - 1} or less, or " if longest >= 2 else ""
        raise ValueError(f"the {split} split of {dataset.path} has {total:,} tokens in {len(shards)} shard(s), the "
                         f"longest {longest:,}: fewer than block_size + 1 = {block_size + 1:,} for one window; "
                         f"{fix}prepare more text (or a larger --val_fraction)")


# ----------------------------------------------------------------------------- windows
def draw_windows(shards, n, length, generator):
    """n windows of `length` tokens, (n, length) int64: a shard in proportion to the windows
    it holds (len - length + 1), then a start uniformly among them."""
    starts = torch.tensor([max(len(s) - length + 1, 0) for s in shards], dtype=torch.float64)
    which = torch.multinomial(starts, n, replacement=True, generator=generator)  # (n,)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    offsets = (u * starts[which]).long().clamp_max(starts[which].long() - 1)  # uniform in [0, windows)
    rows = [np.asarray(shards[s][o:o + length], dtype=np.int64) for s, o in zip(which.tolist(), offsets.tolist())]
    return torch.from_numpy(np.stack(rows))


# ----------------------------------------------------------------------------- mixtures
def parse_mixture(spec):
    """'slimpajama:0.7,starcoder:0.3' -> [("slimpajama", 0.7), ("starcoder", 0.3)]; a name
    alone has weight 1. One ValueError naming the part that is wrong."""
    sources = []
    for part in spec.split(","):
        name, sep, weight = part.strip().rpartition(":") if ":" in part else (part.strip(), "", "1")
        if not name:
            raise ValueError(f"--dataset {spec!r}: empty source name in {part!r}; write name:weight,name:weight")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"--dataset {spec!r}: the weight of {name!r} is {weight!r}, not a number") from None
        if not w > 0 or w == float("inf"):
            raise ValueError(f"--dataset {spec!r}: the weight of {name!r} is {weight}; weights must be positive "
                             f"and finite")
        if name in (n for n, _ in sources):
            raise ValueError(f"--dataset {spec!r}: {name!r} is named twice")
        sources.append((name, w))
    return sources


class Mixture:
    """Draws (B, T+1) token windows from several datasets by weight; resumable from a counter."""

    def __init__(self, datasets, weights, split, seq_len, seed=0, rank=0):
        self.datasets, self.split, self.seq_len = datasets, split, seq_len
        self.names = list(datasets)
        self.probs = torch.tensor([weights[n] for n in self.names], dtype=torch.float64)
        self.probs /= self.probs.sum()
        self.seed, self.rank, self.draws = seed, rank, 0
        for ds in datasets.values():
            check_split_length(ds, split, seq_len)

    @classmethod
    def from_spec(cls, spec, split, seq_len, vocab_size=None, seed=0, rank=0):
        """Open every source of a --dataset spec (checked as open_dataset does); all must
        share one tokenizer."""
        sources = parse_mixture(spec)
        datasets = {}
        for name, _ in sources:
            if not os.path.exists(os.path.join(dataset_dir(name), "meta.json")) and \
                    not os.path.exists(os.path.join(dataset_dir(name), "manifest.json")):
                raise FileNotFoundError(f"--dataset: source {name!r} does not exist ({dataset_dir(name)} has no "
                                        f"meta.json); prepare it with `python data/prepare.py --corpus CORPUS "
                                        f"--tokenizer TOKENIZER --out {dataset_dir(name)}`")
            datasets[name] = open_dataset(name, vocab_size)
        first = sources[0][0]
        for name, _ in sources[1:]:
            a, b = datasets[first].fingerprint, datasets[name].fingerprint
            if a != b or datasets[first].meta["vocab_size"] != datasets[name].meta["vocab_size"]:
                raise ValueError(f"--dataset: {first!r} and {name!r} were prepared with different tokenizers "
                                 f"(fingerprints {str(a)[:12]} and {str(b)[:12]}); prepare both with the same --tokenizer")
        return cls(datasets, dict(sources), split, seq_len, seed, rank)

    def generator(self, k):
        """Draw k's generator: a function of (seed, rank, k) only."""
        return torch.Generator().manual_seed((self.seed * 0x9E3779B97F4A7C15 + self.rank * 0xBF58476D1CE4E5B9 + k)
                                             % 2**63)

    def draw(self, batch_size):
        """(batch_size, seq_len + 1) int64 windows; x = [:, :-1], y = [:, 1:]."""
        g = self.generator(self.draws)
        self.draws += 1
        source = torch.multinomial(self.probs, batch_size, replacement=True, generator=g)  # (B,)
        out = torch.empty(batch_size, self.seq_len + 1, dtype=torch.int64)
        for i, name in enumerate(self.names):
            rows = (source == i).nonzero().flatten()
            if len(rows):
                out[rows] = draw_windows(self.datasets[name].splits[self.split], len(rows), self.seq_len + 1, g)
        self.last_sources = source
        return out

    def state_dict(self):
        return {"seed": self.seed, "rank": self.rank, "draws": self.draws}

    def load_state_dict(self, state):
        self.seed, self.rank, self.draws = state["seed"], state["rank"], state["draws"]
