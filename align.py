"""Alignment in miniature: SFT, a reward model, PPO, DPO and GRPO.

    python align.py base --out_dir out/al/base            # pretrain: pydoc text + a little chat text
    python align.py sft  --init_from out/al/base --out_dir out/al/sft   [--peft lora|qlora]
    python align.py rm   --init_from out/al/sft  --out_dir out/al/rm    # samples K, gold labels, trains
    python align.py ppo  --init_from out/al/sft  --reward_model out/al/rm --out_dir out/al/ppo \\
        [--beta 0.05] [--gamma 1.0] [--peft lora]
    python align.py dpo  --init_from out/al/sft  --prefs out/al/rm/prefs.jsonl --out_dir out/al/dpo
    python align.py grpo --init_from out/al/sft  --out_dir out/al/grpo
    python align.py pipeline --out_dir out/al [--quick]   # all of the above, in order
    python sample.py --out_dir out/al/ppo --chat          # talk to it

It reads next to these papers, each loss directly above the stage that uses it:
  - FLAN (Wei et al. 2021, arXiv:2109.01652): many tasks phrased as instructions, several
    templates each; zero-shot accuracy on task families held out of training.
  - InstructGPT (Ouyang et al. 2022, arXiv:2203.02155) section 3.5: (1) SFT, (2) a reward
    model trained on K ranked responses per prompt, (3) PPO against it with a per-token KL
    penalty to the SFT model (beta) and, for PPO-ptx, gamma times the pretraining loss.
  - PPO (Schulman et al. 2017, arXiv:1707.06347) eq. 7 (the clipped surrogate); GAE
    (Schulman et al. 2015, arXiv:1506.02438) eq. 16.
  - DPO (Rafailov et al. 2023, arXiv:2305.18290) eq. 7: the same preferences, no reward
    model and no sampling.
  - GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300) section 4.1: a group of samples
    per prompt, advantage = (r - mean) / std within the group, no value function.

We follow TRL's PPO conventions (PPOTrainer, 2024): the KL penalty is folded into the
per-token reward, the reward model's score is added at the last response token, and the
advantages are whitened per batch. Where we differ it is said next to the code.

The instruction data (task families, the chat template Ⓤ{instruction}␃Ⓐ{response}␃ and
the gold labeler) are in data/tasks.py.
"""

import argparse
import copy
import itertools
import json
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import peft
import quant
from checkpoint import (atomic_write, json_lines, load_checkpoint, lock_out_dir, read_json, save_checkpoint,
                        unlock_out_dir)
from cli import Number, Parser, field_comments
import train
from data.prepare import prepare, pydoc_corpus
from data.tasks import (BOT, EOT, FAMILIES, USER, correct, edit_distance, gold_score, make_task,  # noqa: F401
                        render, split_families)
from data.tokenizer import load_tokenizer
from model import ModelConfig, Transformer
from runs import apply_peft, copy_tokenizer, exit_with_error, load_run, resolve_device


# ----------------------------------------------------------------------------- 1. prompts and batches
def encode_prompt(tokenizer, prompt, block_size, room):
    """Token ids of a rendered prompt, refusing one that leaves no room for `room` response tokens."""
    ids = tokenizer.encode(render(prompt))
    if len(ids) + room > block_size:
        raise ValueError(f"a prompt of {len(ids)} tokens does not fit the context block_size={block_size} with "
                         f"room for a {room}-token response ({prompt[:40]!r}...); shorten it or lower "
                         f"--max_new_tokens")
    return ids


def pad_batch(prompts, responses, device="cpu"):
    """Right-padded prompt+response ids (B, L) and the response mask (B, L - 1).

    mask[b, t] = 1 where position t predicts a response token (token t + 1): the actions
    of the policy. last[b] is the index in the sequence of row b's last response token.
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    seq = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    mask = torch.zeros(len(prompts), max(lengths) - 1)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        seq[b, :lengths[b]] = torch.tensor(p + r)
        mask[b, len(p) - 1:lengths[b] - 1] = 1
    last = torch.tensor(lengths) - 1
    return seq.to(device), mask.to(device), last.to(device)


def token_logprobs(logits, seq, n_vocab):
    """log pi(token t+1 | tokens <= t) for every position: (B, L, V), (B, L) -> (B, L - 1).
    Over the tokenizer's n_vocab ids, the distribution the sampler draws from."""
    logp = F.log_softmax(logits[:, :-1, :n_vocab].float(), dim=-1)
    return logp.gather(-1, seq[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def sample(model, rows, max_new_tokens, temperature, eot_id, n_vocab, generator):
    """One response per row of prompt ids, decoded together with the KV cache
    (model.generate_tokens). The rows have equal lengths, so none needs left padding.
    Each response is cut after its first EOT."""
    x = torch.tensor(rows, device=model.tok_embeddings.weight.device)  # (B, T)
    steps = [t.tolist() for t in model.generate_tokens(x, max_new_tokens, temperature, eos_id=eot_id,
                                                        generator=generator, n_vocab=n_vocab)]
    out = []
    for b in range(len(rows)):
        ids = [s[b] for s in steps]
        out.append(ids[:ids.index(eot_id) + 1] if eot_id in ids else ids)
    return out


# ----------------------------------------------------------------------------- config
@dataclass
class AlignConfig:
    init_from: str = ""  # the run to start from: the base for sft, the SFT run for rm/ppo/dpo/grpo
    out_dir: str = "out/align"  # the run's folder (ckpt.pt, meta.json; rm: prefs.jsonl)
    resume: bool = False  # continue out_dir/ckpt.pt exactly
    seed: int = 1337  # seeds the weights' init and every step's prompts and samples
    device: str = "cpu"  # cpu, cuda, cuda:N or auto
    threads: int = 0  # torch CPU threads; 0: torch's default (1 is faster on an oversubscribed machine)
    iters: int = 200  # optimizer iterations (PPO / GRPO: rollout batches)
    batch_size: int = 32  # sft / dpo: sequences or pairs; rm: prompts (all their pairs)
    learning_rate: float = 1e-3  # AdamW's rate after the warmup (constant)
    warmup_iters: int = 10  # linear warmup, then constant (InstructGPT's PPO uses a constant rate)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay, on matrices
    grad_clip: float = 1.0  # clip the global gradient norm; 0: off
    eval_every: int = 50  # also the checkpoint interval
    eval_prompts: int = 48  # prompts per family (sft) or in all (rm, ppo, dpo, grpo) at each evaluation
    heldout: str = "last,min"  # task families never trained on (FLAN's held-out clusters)
    families: str = ""  # the task families trained on, comma-separated (empty: all but --heldout)
    max_new_tokens: int = 12  # the longest sampled response
    temperature: float = 1.0  # sampling temperature of rollouts and evaluations (0: greedy)
    # parameter-efficient (runs.apply_peft); for ppo/dpo/grpo the reference model is then the
    # same weights with the adapters off
    peft: str = ""  # "" (full fine-tuning), lora or qlora
    lora_r: int = 8  # LoRA's rank
    lora_alpha: float = 16.0  # LoRA's scale: the update is alpha / r * BA
    lora_dropout: float = 0.0  # dropout on LoRA's input
    lora_targets: str = "all"  # the projections LoRA adapts (all, or a comma list such as wq,wv)
    # base: the pretrained model (train.py on pydoc text mixed with chat-format text)
    n_layer: int = 3  # base: transformer blocks
    n_embd: int = 96  # base: model width
    n_head: int = 4  # base: attention heads
    block_size: int = 64  # base: context length in characters
    mix: int = 1000  # chat-format examples of the trained families in the pretraining text
    pretrain_docs: int = 0  # pydoc documents in the pretraining text; 0: all
    # rm: K samples per prompt, all C(K, 2) comparisons of a prompt in one batch
    k: int = 4  # rm: samples ranked per prompt (InstructGPT's K)
    rm_prompts: int = 400  # rm: prompts whose K samples the gold labeler ranks
    rm_demo: bool = False  # rm: the demonstration is one of the K (always a decidable pair; an RM may learn its style)
    prefs: str = ""  # dpo (and rm): a prefs.jsonl; rm writes out_dir/prefs.jsonl when empty
    rm_lm: bool = True  # rm: add the RM's own mean log-probability of the response (False: the head alone)
    # ppo / grpo
    reward_model: str = ""  # ppo: the rm run
    prompts_per_step: int = 8  # ppo, grpo: prompts per rollout batch
    samples_per_prompt: int = 4  # grpo: the group size G
    beta: float = 0.05  # KL penalty to the SFT model
    gamma: float = 0.0  # sft and PPO-ptx: + gamma * the next-token loss on the base's text (0: none)
    ptx_data: str = ""  # the pretraining dataset (default: the base's)
    ppo_epochs: int = 4  # ppo, grpo: passes over each rollout batch
    minibatches: int = 2  # ppo: minibatches per pass
    clip: float = 0.2  # ppo, grpo: the ratio's clip range epsilon (PPO eq. 7)
    clip_value: float = 0.2  # ppo: the value's clip range around its old estimate
    vf_coef: float = 0.1  # ppo: weight of the value loss
    vf_shared: bool = False  # ppo: the value loss also trains the policy's trunk (TRL's shared model)
    gae_gamma: float = 1.0  # ppo: GAE's discount
    gae_lambda: float = 0.95  # ppo: GAE's lambda
    # dpo
    dpo_beta: float = 0.1  # dpo: the temperature of DPO's implicit reward (eq. 7's beta)


# --quick on the command line: seconds per stage, to try the commands (CI runs each documented one)
SMOKE = dict(iters=3, batch_size=4, eval_every=3, eval_prompts=4, n_layer=1, n_embd=32, n_head=2, block_size=64,
             mix=50, pretrain_docs=100, k=3, rm_prompts=20, rm_demo=True, prompts_per_step=2, samples_per_prompt=2,
             ppo_epochs=1, minibatches=1, max_new_tokens=8)
# experiments/align.py --quick: a small model trained enough to show each effect's direction
QUICK = dict(n_layer=2, n_embd=64, n_head=4, block_size=64, mix=600, pretrain_docs=100, eval_prompts=8,
             max_new_tokens=8, families="upper,reverse,repeat")  # --quick: three families, a small model
# (the stages' budgets are in PIPELINE_QUICK)


# Every number of AlignConfig and the values it may take: checked where the command line is
# parsed (--help states each range) and again on the config itself (a resumed run's, a caller's).
AT_LEAST_1 = ("k", "batch_size", "eval_every", "eval_prompts", "max_new_tokens", "prompts_per_step",
              "samples_per_prompt", "ppo_epochs", "minibatches", "n_layer", "n_embd", "n_head", "block_size",
              "lora_r", "rm_prompts")
AT_LEAST_0 = ("seed", "iters", "threads", "warmup_iters", "mix", "pretrain_docs", "weight_decay", "grad_clip",
              "lora_alpha", "beta", "gamma", "dpo_beta", "vf_coef", "temperature")
ABOVE_0 = ("learning_rate", "clip", "clip_value")
AT_MOST_1 = ("lora_dropout", "gae_gamma", "gae_lambda")  # and at least 0


def ranges():
    """{field: cli.Number} for every numeric field of AlignConfig."""
    kind = {f.name: type(f.default) for f in fields(AlignConfig)}
    return {**{n: Number(kind[n], 1) for n in AT_LEAST_1}, **{n: Number(kind[n], 0) for n in AT_LEAST_0},
            **{n: Number(kind[n], 0, low_open=True) for n in ABOVE_0}, **{n: Number(kind[n], 0, 1) for n in AT_MOST_1}}


def check_config(cfg, stage):
    """Each setting in its range, with one line naming the option and what it takes."""
    for name, number in ranges().items():
        number.check(f"--{name}", getattr(cfg, name))
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"--n_embd {cfg.n_embd} must be a multiple of --n_head {cfg.n_head}")
    if cfg.peft not in ("", "lora", "qlora"):
        raise ValueError(f"--peft must be lora or qlora (or empty for full fine-tuning), got {cfg.peft!r}")
    if stage in ("sft", "rm", "ppo", "dpo", "grpo") and not cfg.init_from and not cfg.resume:
        raise ValueError(f"align.py {stage} starts from a run: give it with --init_from DIR")
    if stage == "ppo" and not cfg.reward_model and not cfg.resume:
        raise ValueError("align.py ppo needs the reward model: --reward_model DIR (an `align.py rm` run)")
    if stage == "rm" and cfg.k < 2:
        raise ValueError(f"--k must be >= 2 (a comparison needs two responses), got {cfg.k}")
    if stage == "grpo" and cfg.samples_per_prompt < 2:
        raise ValueError("GRPO compares samples within a group: --samples_per_prompt must be >= 2")
    split_families(cfg.heldout, cfg.families)
    for name in ("init_from", "reward_model"):  # a run never writes into a run it reads
        path = getattr(cfg, name)
        if path and os.path.abspath(path.removesuffix("ckpt.pt")) == os.path.abspath(cfg.out_dir):
            raise ValueError(f"--{name} {path} is the run's own --out_dir: it would overwrite the model it reads; "
                             f"write elsewhere, e.g. --out_dir {cfg.out_dir.rstrip('/')}_{stage}")


# What --resume may change: how long, how often, where. Anything else would make the run a
# mixture of two settings, and the checkpoint would record only the second.
RESUMABLE = ("iters", "eval_every", "device", "threads", "resume", "out_dir")


def resumed_config(stage, cfg, explicit):
    """The run's own settings from out_dir/ckpt.pt, refusing another stage's run or a setting
    the command line contradicts."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: {path} not found; to start this run, drop --resume")
    saved = load_checkpoint(path)["train_config"]
    if saved.get("stage") != stage:
        kind = f"an align.py {saved['stage']} run" if saved.get("stage") else "a train.py run"
        hint = f"; resume it with `python align.py {saved['stage']} --resume --out_dir {cfg.out_dir}`" \
            if saved.get("stage") in STAGES else ""
        raise ValueError(f"--resume: {cfg.out_dir} holds {kind}, not an align.py {stage} run{hint}")
    for k, v in explicit.items():
        if k not in RESUMABLE and k in saved and saved[k] != v:
            raise ValueError(f"--resume: --{k} {v} contradicts the run's {k} {saved[k]!r}; drop --{k} to "
                             f"resume, or start a new run in another --out_dir")
    known = {f.name for f in fields(AlignConfig)}
    return AlignConfig(**{**{k: v for k, v in saved.items() if k in known}, **explicit, "resume": True})


# ----------------------------------------------------------------------------- runs on disk
def load_policy(path, device):
    """(a plain Transformer, tokenizer, ckpt) of any run; a LoRA run's adapters merged in."""
    model, tokenizer, ckpt = load_run(path, device)
    if peft.lora_layers(model):
        if quant.quantization_method(model):
            raise ValueError(f"{path} is a --peft qlora run: its base is NF4; start from a full or --peft lora run")
        peft.merge_lora(model)
        state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
        model = Transformer(model.config).to(device)
        model.load_state_dict(state)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train(), tokenizer, ckpt


def same_tokenizer(dir_a, dir_b):
    """Whether two runs were made with the same tokenizer (meta.json and the BPE file agree)."""
    keys = ("tokenizer", "chars", "vocab_size", "eot_id")
    a, b = (read_json(os.path.join(d, "meta.json"), "the run's tokenizer") for d in (dir_a, dir_b))
    if any(a.get(k) != b.get(k) for k in keys):
        return False
    files = [os.path.join(d, "tokenizer.tiktoken") for d in (dir_a, dir_b)]
    if os.path.exists(files[0]) or os.path.exists(files[1]):
        return all(os.path.exists(f) for f in files) and read_bytes(files[0]) == read_bytes(files[1])
    return True


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@contextmanager
def adapters_off(model):
    """The base alone: every LoRA layer's scaling set to 0, so base(x) + 0 * BAx = base(x) exactly.
    With LoRA, the reference (SFT) model is the policy with its adapters off: one copy of the weights."""
    layers = peft.lora_layers(model)
    saved = [m.scaling for m in layers]
    for m in layers:
        m.scaling = 0.0
    try:
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.scaling = s


class Run:
    """What every stage shares: the policy (or trunk) from init_from, its tokenizer, the heads,
    the optimizer, and checkpoints in train.py's layout (so runs.load_run and sample.py read them)."""

    def __init__(self, cfg, stage, peft_ok=True):
        self.cfg, self.stage = cfg, stage
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        model, self.tokenizer, init_ckpt = load_policy(cfg.init_from, self.device)
        self.dataset = cfg.ptx_data or init_ckpt["train_config"].get("dataset", "")
        self.eot_id = self.tokenizer.encode(EOT)[0]
        self.n_vocab = self.tokenizer.n_vocab
        self.base_path = ""
        if cfg.peft and not peft_ok:
            raise ValueError(f"align.py {stage} trains the whole trunk; drop --peft {cfg.peft}")
        if cfg.peft:  # one frozen base + adapters; a merged base is written if init_from had adapters
            self.base_path = os.path.abspath(cfg.init_from)
            if init_ckpt["train_config"].get("peft"):
                self.base_path = os.path.abspath(os.path.join(cfg.out_dir, "base.pt"))
                if not os.path.exists(self.base_path):
                    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()},
                                    self.base_path)
            model = apply_peft(model, self.train_config())
        self.model = model
        self.heads = nn.ModuleDict()
        self.ref = None
        self.history = {"train": [], "eval": []}
        self.iter_num = 0

    def train_config(self):
        """The run's config as the checkpoint's train_config: AlignConfig plus the keys runs.build_model reads."""
        return {**asdict(self.cfg), "stage": self.stage, "dataset": self.dataset, "model": "debug", "kv_init": "",
                "prefix_len": 0, "prefix_hidden": 0}

    def frozen_reference(self):
        """The SFT model as the KL reference: a frozen copy, or (with --peft) the policy with adapters off.

        What sharing saves, for N base parameters in fp32 and A adapter parameters:
          full policy:  4N weights + 4N reference copy + 4N gradients + 8N AdamW moments = 20N bytes
          LoRA policy:  4N (one frozen base, also the reference) + 16A for the adapters
        (the value head reads the same trunk in both; the RM is a separate model in both).
        With qlora the shared base, and so the reference, is the NF4-quantized SFT model."""
        if not self.cfg.peft:
            self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)

    @contextmanager
    def reference(self):
        if self.ref is not None:
            yield self.ref
        else:
            with adapters_off(self.model) as m:
                yield m

    def parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.heads.parameters())

    def save(self, optimizer):
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        state = {n: t for n, t in self.model.state_dict().items() if not self.cfg.peft or n in trainable}
        extra = {"base": self.base_path, "peft": self.model.peft_config} if self.cfg.peft else {}
        os.makedirs(self.cfg.out_dir, exist_ok=True)
        copy_tokenizer(self.cfg.init_from, self.cfg.out_dir)
        save_checkpoint({"model": state, "heads": self.heads.state_dict(), "optimizer": optimizer.state_dict(),
                         "iter_num": self.iter_num, "model_config": self.model.config.to_dict(),
                         "train_config": self.train_config(), "history": self.history,
                         "rng": torch.get_rng_state(), **extra}, os.path.join(self.cfg.out_dir, "ckpt.pt"))

    def fit(self, step, evaluate):
        """The loop of every stage: resume, then step(it, optimizer) -> logs; evaluate and
        checkpoint every eval_every iterations and at the end. Each step draws its data
        from generators seeded by (seed, it) (step_rngs), so a resumed run is exact."""
        cfg = self.cfg
        opt = train.make_optimizer(nn.ModuleList([self.model, self.heads]), self.schedule(), self.device)
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        resumed = cfg.resume and os.path.exists(path)
        if resumed:
            ckpt = load_checkpoint(path)
            self.model.load_state_dict({**self.model.state_dict(), **ckpt["model"]})
            self.heads.load_state_dict(ckpt["heads"])
            opt.load_state_dict(ckpt["optimizer"])
            self.iter_num, self.history = ckpt["iter_num"], ckpt["history"]
            torch.set_rng_state(ckpt["rng"])
        start = self.iter_num
        while True:
            it = self.iter_num
            if (it % cfg.eval_every == 0 or it >= cfg.iters) and not (resumed and it == start):
                logs = evaluate(it)
                self.history["eval"].append({"iter": it, **logs})
                print(f"{self.stage} eval {it}: " + " | ".join(f"{k} {v:.4f}" for k, v in logs.items()), flush=True)
                self.save(opt)
            if it >= cfg.iters:
                return self.history
            for group in opt.param_groups:
                group["lr"] = train.get_lr(it, self.schedule())
            t0 = time.perf_counter()
            logs = step(it, opt)
            logs["seconds"] = time.perf_counter() - t0
            self.history["train"].append({"iter": it, **logs})
            self.iter_num = it + 1
            if it % max(cfg.eval_every // 5, 1) == 0 or it == cfg.iters - 1:
                print(f"{self.stage} {it}: " + " | ".join(f"{k} {v:.4f}" for k, v in logs.items()), flush=True)

    def schedule(self):
        """train.py's optimizer settings: AdamW (0.9, 0.95), linear warmup, then a constant rate
        (min_lr = learning_rate: InstructGPT's PPO keeps its rate constant)."""
        c = self.cfg
        return SimpleNamespace(learning_rate=c.learning_rate, min_lr=c.learning_rate, warmup_iters=c.warmup_iters,
                               lr_decay_iters=0, max_iters=c.iters, weight_decay=c.weight_decay, beta1=0.9,
                               beta2=0.95, peft=c.peft)

    def update(self, optimizer, loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters(), self.cfg.grad_clip)
        optimizer.step()

    # ------------------------------------------------------------------------- shared pieces
    def step_rngs(self, it, salt=0):
        """A Python and a torch generator for iteration `it`: the data of a step depends only on (seed, it)."""
        s = (self.cfg.seed * 1_000_003 + it * 7919 + salt) % 2**63
        return random.Random(s), torch.Generator(device=self.device).manual_seed(s)

    def tasks(self, r, n, families=None):
        families = families or split_families(self.cfg.heldout, self.cfg.families)[0]
        return [make_task(r.choice(families), r) for _ in range(n)]

    def prompt_ids(self, task):
        return encode_prompt(self.tokenizer, task["prompt"], self.model.config.block_size, self.cfg.max_new_tokens)

    def rollouts(self, model, tasks, n, generator, temperature=None):
        """n sampled responses per task: (prompt ids, response ids, response texts), task-major.
        The prompts of equal length are decoded in one batch."""
        ids = [self.prompt_ids(t) for t in tasks]
        by_length = {}
        for i, p in enumerate(ids):
            by_length.setdefault(len(p), []).append(i)
        responses = [None] * (len(tasks) * n)
        was_training = model.training
        model.eval()
        for idxs in by_length.values():
            rows = [i * n + j for i in idxs for j in range(n)]  # where each sample goes, task-major
            outs = sample(model, [ids[row // n] for row in rows], self.cfg.max_new_tokens,
                          self.cfg.temperature if temperature is None else temperature, self.eot_id,
                          self.n_vocab, generator)
            for row, out in zip(rows, outs):
                responses[row] = out
        model.train(was_training)
        prompts = [p for p in ids for _ in range(n)]
        return prompts, responses, [self.tokenizer.decode(r) for r in responses]

    def accuracy(self, model, families, n, it=10**6):
        """Greedy accuracy per family on n fresh prompts each (their own seeds, never trained on)."""
        out = {}
        for f in families:
            r, g = self.step_rngs(it, salt=list(FAMILIES).index(f) + 17)
            tasks = [make_task(f, r) for _ in range(n)]
            _, _, texts = self.rollouts(model, tasks, 1, g, temperature=0.0)
            out[f] = sum(correct(t, x) for t, x in zip(tasks, texts)) / n
        return out

    def logprobs_and_hidden(self, model, seq):
        h = model.hidden_states(seq)  # (B, L, C)
        return token_logprobs(model.output(h), seq, self.n_vocab), h


# ----------------------------------------------------------------------------- base (pretraining)
def pretrain_text(cfg):
    """The pretraining corpus: Python's documentation (data/prepare.py) with `mix` chat-format
    examples of the trained families interleaved, so the vocabulary holds the template's markers."""
    r = random.Random(cfg.seed)
    if cfg.pretrain_docs:  # a few pydoc topics only (quick runs): no pass over the standard library
        from pydoc_data.topics import topics
        docs = [topics[k] for k in sorted(topics)][:cfg.pretrain_docs]
    else:
        docs = pydoc_corpus()
    trained, _ = split_families(cfg.heldout, cfg.families)
    for _ in range(cfg.mix):
        task = make_task(r.choice(trained), r)
        docs.insert(r.randrange(len(docs) + 1), render(task["prompt"], task["answer"]))
    return "\n\n".join(docs)


def run_base(cfg, quick=False):
    """Pretrain with train.py itself on the mixed text (character-level tokenizer)."""
    data_dir = os.path.abspath(os.path.join(cfg.out_dir, "data"))
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        corpus = os.path.join(data_dir, "corpus.txt")
        text = pretrain_text(cfg)
        atomic_write(corpus, lambda f: f.write(text), text=True)
        prepare(corpus, "char", out=data_dir, verbose=False)
    vocab = load_tokenizer(data_dir).n_vocab
    argv = ["--dataset", data_dir, "--out_dir", cfg.out_dir, "--vocab_size", vocab, "--n_layer", cfg.n_layer,
            "--n_embd", cfg.n_embd, "--n_head", cfg.n_head, "--n_kv_head", cfg.n_head, "--block_size",
            cfg.block_size, "--max_iters", cfg.iters, "--batch_size", cfg.batch_size, "--seed", cfg.seed,
            "--eval_interval", cfg.eval_every, "--eval_iters", 2 if quick else 10, "--learning_rate",
            cfg.learning_rate, "--warmup_iters", cfg.warmup_iters, "--device", cfg.device,
            "--log_interval", max(cfg.iters // 10, 1)] + (["--resume"] if cfg.resume else [])
    tc, model_args, explicit = train.parse_args([str(a) for a in argv])
    return train.train(tc, model_args, explicit)


def pretrain_batch(data, n, block_size, generator, device):
    ix = torch.randint(len(data) - block_size - 1, (n,), generator=generator).tolist()
    x = torch.stack([torch.from_numpy(data[i:i + block_size + 1].astype(np.int64)) for i in ix]).to(device)
    return x[:, :-1], x[:, 1:]


def load_pretrain_split(dataset, split):
    meta = read_json(os.path.join(dataset, "meta.json"), "the pretraining dataset (--ptx_data)")
    return np.memmap(os.path.join(dataset, f"{split}.bin"), dtype=meta["dtype"], mode="r")


@torch.no_grad()
def pretrain_loss(model, data, n_batches=8, batch_size=16, seed=0):
    """Mean next-token loss on fixed batches of pretraining text: the alignment tax (InstructGPT
    section 4.2 measures it as performance regressions on public NLP datasets)."""
    g = torch.Generator().manual_seed(seed)
    was = model.training
    model.eval()
    dev = model.tok_embeddings.weight.device
    losses = [model(*pretrain_batch(data, batch_size, model.config.block_size, g, dev))[1].item()
              for _ in range(n_batches)]
    model.train(was)
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------- step 1: SFT
def sft_targets(seq, mask):
    """SFT's loss is on the response tokens only: the prompt's targets are -100 (ignored)."""
    targets = seq[:, 1:].clone()  # (B, L - 1)
    return targets.masked_fill(mask == 0, -100)


def run_sft(cfg):
    """InstructGPT step 1 / FLAN: cross-entropy on the response tokens of instruction examples."""
    run = Run(cfg, "sft")
    trained, held = split_families(cfg.heldout, cfg.families)
    base_model = load_policy(cfg.init_from, run.device)[0].eval()
    base_acc = run.accuracy(base_model, trained + held, cfg.eval_prompts)
    del base_model

    def batch(r, n):
        tasks = run.tasks(r, n)
        prompts = [run.prompt_ids(t) for t in tasks]
        responses = [run.tokenizer.encode(t["answer"] + EOT) for t in tasks]
        return pad_batch(prompts, responses, run.device)

    ptx = load_pretrain_split(run.dataset, "train") if cfg.gamma > 0 else None
    ptx_val = load_pretrain_split(run.dataset, "val") if run.dataset else None

    def step(it, opt):
        r, g = run.step_rngs(it)
        seq, mask, _ = batch(r, cfg.batch_size)
        _, loss = run.model(seq[:, :-1], sft_targets(seq, mask))
        logs = {"loss": loss.item()}
        if ptx is not None:  # pretraining text mixed in: gamma * its next-token loss (as PPO-ptx)
            lm = run.model(*pretrain_batch(ptx, cfg.batch_size, run.model.config.block_size, g, run.device))[1]
            loss = loss + cfg.gamma * lm
            logs["ptx_loss"] = lm.item()
        run.update(opt, loss)
        return logs

    def evaluate(it):
        r, _ = run.step_rngs(-1)  # the same validation examples at every evaluation
        seq, mask, _ = batch(r, 64)
        with torch.no_grad():
            loss = run.model(seq[:, :-1], sft_targets(seq, mask))[1].item()
        acc = run.accuracy(run.model, trained + held, cfg.eval_prompts)
        tax = {"pretrain_val_loss": pretrain_loss(run.model, ptx_val)} if ptx_val is not None else {}
        return {"val_loss": loss, "trained_acc": mean(acc[f] for f in trained),
                "heldout_acc": mean(acc[f] for f in held) if held else float("nan"), **tax,
                **{f"acc_{f}": a for f, a in acc.items()}}

    run.history["base_acc"] = base_acc
    return run.fit(step, evaluate)


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


# ----------------------------------------------------------------------------- step 2: reward model
def reward_loss(r_chosen, r_rejected):
    """InstructGPT eq. 1: -E[log sigmoid(r(x, y_w) - r(x, y_l))], the mean over comparisons."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def make_prefs(run, n_prompts, k):
    """K samples per prompt from the SFT policy, ranked by the gold labeler (InstructGPT section
    3.5: labelers rank K = 4..9 of the model's own outputs). Every pair of distinct responses
    with different gold scores is a comparison (chosen = the higher). One JSON line each.

    No demonstration is among the K: a written answer differs from a sample in style, and an
    RM can learn to spot the demonstration instead of judging the answer."""
    r, g = run.step_rngs(-2)
    rows = []
    tasks = run.tasks(r, n_prompts)
    n = k - 1 if run.cfg.rm_demo else k
    _, _, samples = run.rollouts(run.model, tasks, n, g)
    for i, task in enumerate(tasks):
        demo = [task["answer"] + EOT] if run.cfg.rm_demo else []
        texts = sorted(set(samples[i * n:(i + 1) * n] + demo))
        scored = sorted(((gold_score(task, t), t) for t in texts), reverse=True)
        for (sa, a), (sb, b) in itertools.combinations(scored, 2):
            if sa > sb:
                rows.append({"prompt": task["prompt"], "chosen": a, "rejected": b, "family": task["family"],
                             "group": i, "gold": [sa, sb]})
    return rows


def load_prefs(path, tokenizer, block_size):
    """Comparisons from a JSON-lines file: {"prompt", "chosen", "rejected"} each (responses end with ␃
    when the model ended its turn). Grouped by prompt, the way the reward model trains on them."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"preference file {path} not found")
    groups = {}
    with open(path, encoding="utf-8") as f:
        for n, row in json_lines(f, path):
            try:
                prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
            except (KeyError, TypeError):
                raise ValueError(f"{path} line {n}: expected a JSON object with prompt, chosen and rejected") from None
            if not all(isinstance(x, str) for x in (prompt, chosen, rejected)):
                raise ValueError(f"{path} line {n}: prompt, chosen and rejected must be strings (text), got "
                                 f"{type(prompt).__name__}, {type(chosen).__name__}, {type(rejected).__name__}")
            if chosen == rejected:
                raise ValueError(f"{path} line {n}: chosen and rejected responses are identical ({chosen!r}); a "
                                 f"comparison needs two different responses: drop that line")
            p = encode_prompt(tokenizer, prompt, block_size, 1)
            for resp in (chosen, rejected):
                if len(p) + len(tokenizer.encode(resp)) > block_size:
                    raise ValueError(f"{path} line {n}: prompt and response are {len(p) + len(tokenizer.encode(resp))} "
                                     f"tokens, longer than the context block_size={block_size}; shorten them")
            groups.setdefault(prompt, []).append((chosen, rejected))
    if not groups:
        raise ValueError(f"{path} holds no comparisons")
    return list(groups.items())


def split_prompts(path, groups, every=10):
    """(train, held out): every 10th distinct prompt of each task family is held out, so that no
    held-out prompt is trained on and each family is measured in proportion (a family whose
    prompts repeat, like the word tasks, would otherwise be almost absent from a plain tail split)."""
    family = {}
    with open(path, encoding="utf-8") as f:
        for _, row in json_lines(f, path):
            family.setdefault(row["prompt"], row.get("family", ""))
    seen, train, val = {}, [], []
    for prompt, pairs in groups:
        k = family[prompt]
        seen[k] = seen.get(k, 0) + 1
        (val if seen[k] % every == 0 else train).append((prompt, pairs))
    if not val and len(train) > 1:  # a few prompts only (a smoke run): hold out the last
        val.append(train.pop())
    if not val:
        raise ValueError(f"{path} holds comparisons for one prompt only; the RM needs at least two (one held out)")
    return train, val


def reward_scores(trunk, head, lm, seq, mask, last):
    """r(x, y) of each row, (B,): InstructGPT's scalar head on the hidden state of the last
    response token, plus (lm=True) the mean log-probability that the RM's own language-model
    head gives the response's tokens (mask: (B, L - 1), as pad_batch makes it).

    The second term is ours. Initialized from the SFT model, it starts as the SFT model's own
    confidence in the answer, which already ranks most comparisons right; the head alone must
    learn to read that knowledge from one position's hidden state out of a few thousand
    comparisons, and does not at this size (experiments/align.py measures both). It is DPO's
    observation (Rafailov et al. 2023, section 5) that a language model's log-probabilities
    are a reward model, used as the RM's starting point."""
    h = trunk.hidden_states(seq)  # (B, L, C)
    r = head(h[torch.arange(seq.shape[0]), last]).squeeze(-1)
    if lm:
        logp = token_logprobs(trunk.output(h), seq, trunk.config.vocab_size)  # (B, L - 1)
        r = r + (logp * mask).sum(1) / mask.sum(1)
    return r


def comparison_batch(run, groups):
    """Comparisons as one forward pass: each prompt's K unique responses once (InstructGPT section
    3.5: C(K, 2) comparisons from K passes, all of a prompt's in the same batch), right-padded,
    and the (chosen, rejected) row indices into them. groups: [(prompt, [(chosen, rejected)])]."""
    prompts, responses, ci, ri = [], [], [], []
    for prompt, pairs in groups:
        unique = sorted({r for pair in pairs for r in pair})
        index = {r: len(responses) + i for i, r in enumerate(unique)}
        p = run.tokenizer.encode(render(prompt))
        prompts += [p] * len(unique)
        responses += [run.tokenizer.encode(r) for r in unique]
        ci += [index[c] for c, _ in pairs]
        ri += [index[r] for _, r in pairs]
    seq, mask, last = pad_batch(prompts, responses, run.device)
    return seq, mask, last, torch.tensor(ci, device=run.device), torch.tensor(ri, device=run.device)


@torch.no_grad()
def demonstration_score(run, rm, n=64):
    """The RM's mean score of the demonstrations (right answers) on fixed prompts. InstructGPT
    section 3.5 normalizes the RM so that they score 0 on average before RL: load_reward_model
    subtracts this, so a reward above 0 means "better than the written answer"."""
    r, _ = run.step_rngs(-6)
    tasks = run.tasks(r, n)
    seq, mask, last = pad_batch([run.tokenizer.encode(render(t["prompt"])) for t in tasks],
                                [run.tokenizer.encode(t["answer"] + EOT) for t in tasks], run.device)
    return reward_scores(*rm, seq, mask, last).mean().item()


def run_rm(cfg):
    """InstructGPT step 2: the SFT trunk, its unembedding replaced by a scalar head, trained on
    the gold labeler's rankings of the SFT model's own samples."""
    run = Run(cfg, "rm", peft_ok=False)
    path = cfg.prefs or os.path.join(cfg.out_dir, "prefs.jsonl")
    if not cfg.prefs and not os.path.exists(path):
        rows = make_prefs(run, cfg.rm_prompts, cfg.k)
        atomic_write(path, lambda f: f.write("".join(json.dumps(row) + "\n" for row in rows)), text=True)
        print(f"{path}: {len(rows)} comparisons from {cfg.rm_prompts} prompts x {cfg.k} samples")
    train_groups, val_groups = split_prompts(path, load_prefs(path, run.tokenizer, run.model.config.block_size))
    run.heads["reward"] = nn.Linear(run.model.config.n_embd, 1).to(run.device)
    nn.init.zeros_(run.heads["reward"].weight)

    def loss_on(gs):
        seq, mask, last, ci, ri = comparison_batch(run, gs)
        r = reward_scores(run.model, run.heads["reward"], cfg.rm_lm, seq, mask, last)  # (rows,)
        return reward_loss(r[ci], r[ri]), (r[ci] > r[ri]).float().mean().item()

    def step(it, opt):
        r, _ = run.step_rngs(it)
        loss, acc = loss_on(r.sample(train_groups, min(cfg.batch_size, len(train_groups))))
        run.update(opt, loss)
        return {"loss": loss.item(), "acc": acc}

    def evaluate(it):
        with torch.no_grad():
            loss, acc = loss_on(val_groups)
        return {"val_loss": loss.item(), "val_acc": acc, "val_pairs": sum(len(p) for _, p in val_groups),
                "demo_score": demonstration_score(run, (run.model, run.heads["reward"], cfg.rm_lm))}

    return run.fit(step, evaluate)


def load_reward_model(path, policy_dir, device):
    """(trunk, head, lm) of an rm run (reward_scores' first three arguments), refusing one trained
    with another tokenizer than the policy's."""
    if not same_tokenizer(path, policy_dir):
        raise ValueError(f"reward model {path} was trained with another tokenizer than {policy_dir}; its "
                         f"scores would read other tokens: train the reward model from this SFT run")
    ckpt = load_checkpoint(os.path.join(path, "ckpt.pt"))
    if "reward.weight" not in ckpt.get("heads", {}):
        raise ValueError(f"{path} is not a reward model run (its checkpoint has no reward head)")
    trunk = Transformer(ModelConfig.from_dict(ckpt["model_config"]))
    trunk.load_state_dict(ckpt["model"])
    head = nn.Linear(trunk.config.n_embd, 1)
    head.load_state_dict({k.removeprefix("reward."): v for k, v in ckpt["heads"].items()})
    evals = ckpt.get("history", {}).get("eval", [])
    if evals and "demo_score" in evals[-1]:  # normalized: demonstrations score 0 on average
        head.bias.data -= evals[-1]["demo_score"]
    return (trunk.to(device).eval().requires_grad_(False), head.to(device).eval().requires_grad_(False),
            ckpt["train_config"].get("rm_lm", False))


# ----------------------------------------------------------------------------- step 3: PPO
def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked entries, as TRL's masked_whiten (shift_mean=True): the
    variance with Bessel's correction, n / (n - 1). Entries outside the mask are set to 0."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def gae(rewards, values, gamma, lam):
    """Generalized advantage estimation (Schulman et al. 2015, eq. 16), backwards in time:

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last step = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
    rewards, values: (B, T). Returns (advantages, returns = advantages + values), (B, T).
    """
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, advantages + values


def clipped_surrogate(logp, old_logp, advantages, eps):
    """PPO eq. 7, per token, as a loss to minimize: -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A)."""
    ratio = torch.exp(logp - old_logp)
    return -torch.min(ratio * advantages, torch.clamp(ratio, 1 - eps, 1 + eps) * advantages)


def ppo_loss(logp, old_logp, advantages, values, old_values, returns, mask, clip=0.2, clip_value=0.2,
             vf_coef=0.1):
    """The PPO loss of a minibatch, all inputs (B, T) over the response tokens in mask:

        policy: masked mean of clipped_surrogate (the clipped objective)
        value:  0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), as in TRL
    Returns (policy loss + vf_coef * value loss, {its parts and the clipped fraction, as TRL logs it}).
    """
    pg = masked_mean(clipped_surrogate(logp, old_logp, advantages, clip), mask)
    v_clipped = old_values + torch.clamp(values - old_values, -clip_value, clip_value)
    vf = 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    # TRL's clipfrac: the tokens whose clipped term is the one the loss takes (so the clip
    # removed their gradient), not every token whose ratio left [1 - eps, 1 + eps]
    ratio = torch.exp(logp - old_logp)
    clipfrac = masked_mean((-advantages * torch.clamp(ratio, 1 - clip, 1 + clip) > -advantages * ratio).float(), mask)
    return pg + vf_coef * vf, {"pg_loss": pg.item(), "vf_loss": vf.item(), "clipfrac": clipfrac.item()}


@torch.no_grad()
def make_experience(run, tasks, rm, it):
    """Sample, then score: old log-probs and values, the reference's log-probs, the RM's score.

    The per-token reward (TRL): r_t = -beta * (log pi(a_t) - log pi_SFT(a_t)), plus the RM's
    score on the last response token. The KL is the sampled estimate log pi - log pi_SFT (k1)."""
    cfg = run.cfg
    _, g = run.step_rngs(it, salt=1)
    t0 = time.perf_counter()
    prompts, responses, texts = run.rollouts(run.model, tasks, cfg.samples_per_prompt, g)
    gen_seconds = time.perf_counter() - t0
    seq, mask, last = pad_batch(prompts, responses, run.device)
    logp, h = run.logprobs_and_hidden(run.model, seq)
    values = run.heads["value"](h[:, :-1]).squeeze(-1) * mask  # V(s_t), s_t = the tokens up to t
    with run.reference() as ref:
        ref_logp = token_logprobs(ref(seq)[0], seq, run.n_vocab)
    score = reward_scores(*rm, seq, mask, last)  # (B,)
    kl = (logp - ref_logp) * mask  # (B, L - 1)
    rewards = -cfg.beta * kl
    rewards[torch.arange(len(last)), last - 1] += score  # the action that emitted the last token
    advantages, returns = gae(rewards * mask, values, cfg.gae_gamma, cfg.gae_lambda)
    task_of = [t for t in tasks for _ in range(cfg.samples_per_prompt)]
    gold = [gold_score(t, x) for t, x in zip(task_of, texts)]
    return {"seq": seq, "mask": mask, "logp": logp * mask, "values": values, "returns": returns,
            "advantages": whiten(advantages, mask), "score": score, "kl": kl.sum(1), "gold": gold,
            "gen_seconds": gen_seconds}


def run_ppo(cfg):
    """InstructGPT step 3: maximize r(x, y) - beta * KL(pi || pi_SFT) [+ gamma * pretraining log-likelihood].

    The value head reads the policy's own hidden states, so one trunk runs per token; InstructGPT
    initializes a separate value model from the RM. Unlike TRL's shared model, the value loss
    does not reach the trunk by default (vf_shared=False), so that only the policy loss moves
    the policy; experiments/align.py measures both, and at this size they do not differ beyond
    the noise of one training seed."""
    run = Run(cfg, "ppo")
    rm = load_reward_model(cfg.reward_model, cfg.init_from, run.device)
    run.frozen_reference()
    run.heads["value"] = nn.Linear(run.model.config.n_embd, 1).to(run.device)
    nn.init.zeros_(run.heads["value"].weight)
    ptx = load_pretrain_split(run.dataset, "train") if cfg.gamma > 0 else None

    def step(it, opt):
        r, g = run.step_rngs(it)
        tasks = run.tasks(r, cfg.prompts_per_step)
        exp = make_experience(run, tasks, rm, it)
        B = exp["seq"].shape[0]
        stats = []
        for epoch in range(cfg.ppo_epochs):  # several epochs over the same rollouts
            order = torch.randperm(B, generator=g)
            for mb in order.chunk(cfg.minibatches):
                logp, h = run.logprobs_and_hidden(run.model, exp["seq"][mb])
                values = run.heads["value"]((h if cfg.vf_shared else h.detach())[:, :-1]).squeeze(-1)
                loss, s = ppo_loss(logp, exp["logp"][mb], exp["advantages"][mb], values, exp["values"][mb],
                                   exp["returns"][mb], exp["mask"][mb], cfg.clip, cfg.clip_value, cfg.vf_coef)
                if ptx is not None:  # PPO-ptx: gamma * the pretraining loss on a batch of pydoc text
                    x, y = pretrain_batch(ptx, len(mb), run.model.config.block_size, g, run.device)
                    lm = run.model(x, y)[1]
                    loss = loss + cfg.gamma * lm
                    s["ptx_loss"] = lm.item()
                run.update(opt, loss)
                stats.append(s)
        n_tokens = exp["mask"].sum().item()
        return {"score": exp["score"].mean().item(), "gold": mean(exp["gold"]), "kl": exp["kl"].mean().item(),
                **{k: mean(s[k] for s in stats) for k in stats[0]}, "rollout_tok_s": n_tokens / exp["gen_seconds"]}

    def evaluate(it):
        return evaluate_policy(run, rm)

    return run.fit(step, evaluate)


@torch.no_grad()
def evaluate_policy(run, rm=None, n_samples=2):
    """On fixed evaluation prompts: mean gold score and accuracy of samples (and the RM's score)."""
    r, g = run.step_rngs(-3)
    tasks = run.tasks(r, run.cfg.eval_prompts)
    prompts, responses, texts = run.rollouts(run.model, tasks, n_samples, g)
    task_of = [t for t in tasks for _ in range(n_samples)]
    out = {"gold": mean(gold_score(t, x) for t, x in zip(task_of, texts)),
           "acc": mean(correct(t, x) for t, x in zip(task_of, texts))}
    if rm is not None:
        seq, mask, last = pad_batch(prompts, responses, run.device)
        out["score"] = reward_scores(*rm, seq, mask, last).mean().item()
    return out


# ----------------------------------------------------------------------------- DPO
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """DPO eq. 7: -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]),
    the mean over pairs; each log-probability is the sum over the response's tokens, (B,)."""
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * margin).mean()


def sequence_logps(model, seq, mask, n_vocab):
    """log pi(y | x): the sum of the response tokens' log-probabilities, (B,)."""
    return (token_logprobs(model(seq)[0], seq, n_vocab) * mask).sum(1)


def run_dpo(cfg):
    """DPO on the reward model's comparisons: the policy is its own reward model (eq. 7)."""
    run = Run(cfg, "dpo")
    run.frozen_reference()
    path = cfg.prefs or os.path.join(cfg.init_from, "prefs.jsonl")
    pairs = [(p, c, rj) for p, prs in load_prefs(path, run.tokenizer, run.model.config.block_size) for c, rj in prs]

    def logps(batch):
        p = [run.tokenizer.encode(render(x)) for x, _, _ in batch]
        seq, mask, _ = pad_batch(p + p, [run.tokenizer.encode(c) for _, c, _ in batch] +
                                 [run.tokenizer.encode(rj) for _, _, rj in batch], run.device)
        pol = sequence_logps(run.model, seq, mask, run.n_vocab)
        with torch.no_grad(), run.reference() as ref:
            refl = sequence_logps(ref, seq, mask, run.n_vocab)
        n = len(batch)
        return pol[:n], pol[n:], refl[:n], refl[n:]

    def step(it, opt):
        r, _ = run.step_rngs(it)
        pc, pr, rc, rr = logps(r.sample(pairs, min(cfg.batch_size, len(pairs))))
        loss = dpo_loss(pc, pr, rc, rr, cfg.dpo_beta)
        run.update(opt, loss)
        return {"loss": loss.item(), "margin": cfg.dpo_beta * ((pc - rc) - (pr - rr)).mean().item(),
                "pair_acc": ((pc - rc) > (pr - rr)).float().mean().item()}

    return run.fit(step, lambda it: evaluate_policy(run))


# ----------------------------------------------------------------------------- GRPO
def group_advantages(rewards, group):
    """GRPO section 4.1.2 (outcome supervision): (r - mean(group)) / std(group), each sample's
    advantage given to all its tokens. rewards (P * G,) in groups of G consecutive samples.
    A group whose samples all score alike has std 0: its advantages are 0 (eps keeps them finite)."""
    r = rewards.view(-1, group)  # (P, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()


def kl_k3(logp, ref_logp):
    """GRPO eq. 4's unbiased, always positive KL estimate: ref/pi - log(ref/pi) - 1 (Schulman 2020's k3)."""
    return torch.exp(ref_logp - logp) - (ref_logp - logp) - 1


def run_grpo(cfg):
    """GRPO: G samples per prompt rewarded by the task's checker (1 right, 0 wrong); no value head.

    Loss (eq. 3): the clipped surrogate with group-normalized advantages, averaged over each
    response's tokens then over responses, plus beta * KL(pi || pi_SFT) by the k3 estimate
    (in the loss, not in the reward as PPO does)."""
    run = Run(cfg, "grpo")
    run.frozen_reference()
    G = cfg.samples_per_prompt

    def step(it, opt):
        r, g = run.step_rngs(it)
        tasks = run.tasks(r, cfg.prompts_per_step)
        prompts, responses, texts = run.rollouts(run.model, tasks, G, g)
        seq, mask, _ = pad_batch(prompts, responses, run.device)
        rewards = torch.tensor([float(correct(t, x)) for t, x in zip([t for t in tasks for _ in range(G)], texts)],
                               device=run.device)
        adv = group_advantages(rewards, G)[:, None]  # (B, 1): every token of a response shares it
        with torch.no_grad():
            old_logp = token_logprobs(run.model(seq)[0], seq, run.n_vocab)
            with run.reference() as ref:
                ref_logp = token_logprobs(ref(seq)[0], seq, run.n_vocab)
        stats = []
        for epoch in range(cfg.ppo_epochs):
            logp = token_logprobs(run.model(seq)[0], seq, run.n_vocab)
            per_token = clipped_surrogate(logp, old_logp, adv, cfg.clip) + cfg.beta * kl_k3(logp, ref_logp)
            loss = ((per_token * mask).sum(1) / mask.sum(1)).mean()
            run.update(opt, loss)
            stats.append(loss.item())
        kl = ((kl_k3(logp.detach(), ref_logp) * mask).sum(1)).mean().item()
        return {"reward": rewards.mean().item(), "loss": mean(stats), "kl": kl}

    return run.fit(step, lambda it: evaluate_policy(run))


# ----------------------------------------------------------------------------- pipeline and CLI
# The pipeline's settings per stage, measured by experiments/align.py (README: alignment).
# SFT mixes pretraining text in (gamma 1), which keeps the alignment tax near 0; the RL
# stages update on 32 prompts a step: with 8, their gradients followed the few families
# drawn and the gold score did not rise.
PIPELINE = {
    "base": dict(iters=400, batch_size=16, eval_every=400),
    "sft": dict(iters=300, gamma=1.0, eval_every=100),
    "rm": dict(rm_prompts=4000, k=4, iters=120, batch_size=32, learning_rate=3e-4, eval_every=40),
    "ppo": dict(iters=30, learning_rate=1e-4, beta=0.05, prompts_per_step=32, samples_per_prompt=4, ppo_epochs=2,
                eval_every=10),
    "dpo": dict(iters=20, batch_size=32, learning_rate=3e-5, eval_every=10),
    "grpo": dict(iters=30, learning_rate=1e-4, samples_per_prompt=8, prompts_per_step=32, ppo_epochs=2,
                 eval_every=10),
}
# experiments/align.py --quick: the same stages on QUICK's smaller model and budget
PIPELINE_QUICK = {
    "base": dict(iters=150, batch_size=16, eval_every=150),
    "sft": dict(iters=200, gamma=1.0, eval_every=200),
    "rm": dict(rm_prompts=600, k=4, iters=30, batch_size=32, learning_rate=3e-4, eval_every=15),
    "ppo": dict(iters=8, learning_rate=1e-4, beta=0.05, prompts_per_step=16, samples_per_prompt=4, ppo_epochs=2,
                eval_every=8),
    "dpo": dict(iters=15, batch_size=32, learning_rate=3e-5, eval_every=15),
    "grpo": dict(iters=8, learning_rate=1e-4, samples_per_prompt=8, prompts_per_step=16, ppo_epochs=2, eval_every=8),
}


def run_pipeline(cfg, budgets=None):
    """base -> sft -> rm -> ppo, then dpo and grpo from the same SFT run, under out_dir/<stage>.
    budgets: each stage's settings over cfg's (PIPELINE when None; {}: cfg's own, as --quick)."""
    d = {s: os.path.join(cfg.out_dir, s) for s in PIPELINE}
    starts = {"sft": dict(init_from=d["base"]), "rm": dict(init_from=d["sft"]),
              "ppo": dict(init_from=d["sft"], reward_model=d["rm"]),
              "dpo": dict(init_from=d["sft"], prefs=os.path.join(d["rm"], "prefs.jsonl")),
              "grpo": dict(init_from=d["sft"])}
    for stage in PIPELINE:
        stage_cfg = AlignConfig(**{**asdict(cfg), **(PIPELINE if budgets is None else budgets).get(stage, {}),
                                   **starts.get(stage, {}), "out_dir": d[stage]})
        if done(d[stage], stage_cfg.iters):
            continue
        if stage == "base":
            run_base(stage_cfg, quick=budgets is not None)
        else:
            STAGES[stage](stage_cfg)
    return d


def done(out_dir, iters):
    path = os.path.join(out_dir, "ckpt.pt")
    return os.path.exists(path) and load_checkpoint(path)["iter_num"] >= iters


STAGES = {"sft": run_sft, "rm": run_rm, "ppo": run_ppo, "dpo": run_dpo, "grpo": run_grpo}


def argument_parser():
    """The command line: a stage, --quick, and one option per AlignConfig field, described by the
    field's comment, its range checked as it is parsed (cli.Parser)."""
    p = Parser(__doc__)
    p.add_argument("stage", choices=["base", *STAGES, "pipeline"], help="the stage to run")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds (CI)")
    comments, numbers = field_comments(AlignConfig), ranges()
    for f in fields(AlignConfig):
        kind = numbers.get(f.name) or {bool: parse_bool}.get(type(f.default), type(f.default))
        flag = dict(nargs="?", const=True) if kind is parse_bool else {}  # --resume means --resume true
        p.add_argument(f"--{f.name}", type=kind, default=None, metavar=type(f.default).__name__.upper(),
                       help=f"{comments.get(f.name, '')}; default {f.default!r}".lstrip("; "), **flag)
    return p


def parse_args(argv):
    """argv -> (stage, AlignConfig, quick, the fields given on the command line). Values are
    parsed by the type of the field's default, never evaluated."""
    args = vars(argument_parser().parse_args(argv))
    stage, quick = args.pop("stage"), args.pop("quick") or bool(os.environ.get("NANO_QUICK"))  # (the docs test)
    explicit = {k: v for k, v in args.items() if v is not None}
    cfg = AlignConfig(**{**(SMOKE if quick else {}), **explicit})
    return stage, cfg, quick, explicit


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def refuse_other_run(cfg, stage):
    """A new run never replaces a finished one: an out_dir holding a checkpoint is resumed or left alone."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if stage in STAGES and not cfg.resume and os.path.exists(path):
        saved = load_checkpoint(path).get("train_config", {}).get("stage", "train.py")
        raise ValueError(f"{cfg.out_dir} already holds a run ({saved}); continue it with --resume, or choose "
                         f"another --out_dir")


def main(argv=None):
    try:
        stage, cfg, quick, explicit = parse_args(sys.argv[1:] if argv is None else argv)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        shape = [k for k in ("n_layer", "n_embd", "n_head", "block_size") if k in explicit]
        if shape and stage in STAGES:
            raise ValueError(f"--{shape[0]} sets the base model's shape (align.py base or pipeline); align.py "
                             f"{stage} takes its model from --init_from (or the run it resumes): drop --{shape[0]}")
        if cfg.resume and stage in STAGES:  # the run's own settings; only what this command line sets changes
            cfg = resumed_config(stage, cfg, explicit)
        check_config(cfg, stage)
        if stage == "base":  # train.py holds the out_dir's lock itself
            run_base(cfg, quick)
            return
        refuse_other_run(cfg, stage)
        created = not os.path.exists(cfg.out_dir)
        lock_out_dir(cfg.out_dir)  # one process per out_dir, as train.py
        try:
            run_pipeline(cfg, {} if quick else None) if stage == "pipeline" else STAGES[stage](cfg)
        finally:
            unlock_out_dir(cfg.out_dir)
            if created and os.path.isdir(cfg.out_dir) and not os.listdir(cfg.out_dir):
                os.rmdir(cfg.out_dir)  # a run that failed before writing anything leaves no trace
    except (ValueError, OSError) as e:
        exit_with_error(e)


if __name__ == "__main__":
    main()
