"""Pretrain or fine-tune the decoder.

    python train.py --config first                       # a small character model, then a sample
    python train.py --config demo                        # a GQA model with a BPE tokenizer, on a CPU
    python train.py --config tinyllama_1b                # TinyLlama's recipe (GPUs)
    python train.py --config demo --n_layer 4 --learning_rate 3e-4 --compile --out_dir out/demo4
    python train.py --out_dir out/demo --resume          # continue exactly where it stopped
    python train.py --config tinyllama_1b --batch_size 1 --estimate_memory   # will it fit?
    torchrun --nproc_per_node 2 train.py --config demo --dist ddp   # or --dist fsdp
    python train.py --init_from out/mha --n_kv_head 2 --kv_init mean --max_iters 30   # GQA uptraining

A config is a named entry of CONFIGS (below: a TrainConfig) whose `model` names a
ModelConfig preset (model.py); `--field value` overrides any field of either. Values are
parsed by the field's type, never evaluated; an unknown field is an error.

What it follows:
  - AdamW (Loshchilov & Hutter, arXiv:1711.05101) with decoupled weight decay on the
    matrices only, linear warmup + cosine decay to min_lr (GPT-3 arXiv:2005.14165 appendix B).
  - Gradient accumulation: one optimizer step sums the gradients of grad_accum
    micro-batches (over all processes), so the batch is grad_accum * batch_size sequences.
  - MFU (PaLM arXiv:2204.02311 appendix B): model FLOPs per second / the device's peak.
  - Checkpoints: out_dir/ckpt.pt, written atomically, with the RNG and data position so
    --resume continues bit for bit (fp32 on CPU). Nothing in out_dir changes before the
    first complete checkpoint, and one run at a time holds an out_dir (checkpoint.py).
"""

import difflib
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace

import torch
import torch.distributed as dist

from cli import Number, Parser, field_comments
from checkpoint import load_checkpoint, lock_out_dir, save_checkpoint, tokenizer_fingerprint, unlock_out_dir
from data.dataset import Mixture, open_dataset, parse_mixture
from data.prepare import dataset_dir, prepare
from data.tokenizer import load_tokenizer, readable
from model import RANGES as MODEL_RANGES, ModelConfig, count_params, flops_per_token
from peft import PagedAdamW, parse_targets
from distributed import (compiles, gather, grad_sync, load_state_dicts, setup_distributed, split_grad_accum,
                         state_dicts, wrap_model)
from plan import check_epochs, check_fits, device_spec, format_plan, peak_flops, plan, print_memory_estimate
from runs import (build_model, check_finite, check_out_dir, check_run_kind, choose_threads, copy_tokenizer,
                  exit_with_error, free_out_dir, plot_losses, resolve_device, save_adapter)


# ----------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    model: str = "debug"  # ModelConfig preset in model.py (its fields are overridable too)
    dataset: str = "pydoc_char"  # a prepared dataset: a name under data/ or a path
    out_dir: str = "out/debug"  # where ckpt.pt, the tokenizer and loss.png go
    init_from: str = ""  # fine-tune from our out_dir / ckpt.pt or a Hugging Face directory
    resume: bool = False  # continue out_dir/ckpt.pt
    # batch: grad_accum * batch_size sequences of block_size tokens per optimizer step
    batch_size: int = 16  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per step, over all processes
    max_iters: int = 200  # optimizer steps
    # AdamW and the learning-rate schedule
    learning_rate: float = 1e-3  # the peak, reached after warmup
    min_lr: float = 1e-4  # the cosine decays to this
    warmup_iters: int = 20  # steps of linear warmup from 0
    lr_decay_iters: int = 0  # 0: decay over max_iters
    weight_decay: float = 0.1  # on matrices (dim >= 2) only
    beta1: float = 0.9  # AdamW's decay of the first moment
    beta2: float = 0.95  # and of the second
    grad_clip: float = 1.0  # clip the global gradient norm; 0: off
    # evaluation, logging, checkpoints
    eval_interval: int = 50  # also the checkpoint interval
    eval_iters: int = 20  # batches per split in an evaluation
    log_interval: int = 10  # print a line every this many steps
    sample_tokens: int = 0  # print a sample of this many tokens when training ends
    # system
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 autocast on cuda, float32 on cpu
    compile: str = "auto"  # torch.compile the model: auto = on one GPU (where it wins), off on a CPU
    grad_checkpoint: bool = False  # recompute each block in the backward pass: activations of one block, not all
    dist: str = "ddp"  # under torchrun: ddp or fsdp
    seed: int = 1337  # the initial weights, dropout and the batches drawn
    kv_init: str = ""  # with --init_from and a new --n_kv_head: mean, first or random (convert_kv_heads)
    # parameter-efficient fine-tuning of --init_from (peft.py)
    peft: str = ""  # "" (full fine-tuning), lora, prefix or qlora
    lora_r: int = 8  # LoRA's rank r
    lora_alpha: float = 16.0  # LoRA's scale is alpha / r
    lora_dropout: float = 0.0  # dropout on the adapter's input
    lora_targets: str = "q,v"  # q k v o gate up down, or all (qlora always adapts all)
    prefix_len: int = 10  # prefix tuning: virtual tokens per layer
    prefix_hidden: int = 512  # width of the prefix reparametrization MLP


CONFIGS = {
    "debug": TrainConfig(),
    # the first command of the README: a character model (model.PRESETS["first"]), then a sample
    "first": TrainConfig(model="first", out_dir="out/first", batch_size=16, max_iters=600, learning_rate=3e-3,
                         min_lr=3e-4, warmup_iters=30, eval_interval=200, eval_iters=10, sample_tokens=300),
    "demo": TrainConfig(model="demo", dataset="pydoc_bpe", out_dir="out/demo", batch_size=8, max_iters=600,
                        learning_rate=1e-3, min_lr=1e-4, warmup_iters=60, eval_interval=100, eval_iters=20),
    # TinyLlama (arXiv:2401.02385 section 2.3): 1024 x 2048 = 2M tokens per step.
    "tinyllama_1b": TrainConfig(model="tinyllama_1b", dataset="pydoc_bpe", out_dir="out/tinyllama_1b",
                                batch_size=8, grad_accum=128, max_iters=1_430_000, learning_rate=4e-4,
                                min_lr=4e-5, warmup_iters=2000, weight_decay=0.1, beta1=0.9, beta2=0.95,
                                grad_clip=1.0, eval_interval=1000, eval_iters=50),
}
CHOICES = {"compile": ("auto", "true", "false"), "dist": ("ddp", "fsdp"), "dtype": ("auto", "float32", "bfloat16"),
           "kv_init": ("", "mean", "first", "random"), "peft": ("", "lora", "prefix", "qlora")}


# the numbers each field admits: checked where a config is made (check_train_config), stated by --help
RANGES = {**{name: Number(int, 1) for name in ("batch_size", "grad_accum", "eval_interval", "eval_iters",
                                                "log_interval", "lora_r", "prefix_len")},
          **{name: Number(int, 0) for name in ("max_iters", "warmup_iters", "lr_decay_iters", "sample_tokens",
                                                "prefix_hidden", "seed")},
          "learning_rate": Number(float, 0, low_open=True), "lora_alpha": Number(float, 0, low_open=True),
          **{name: Number(float, 0) for name in ("min_lr", "weight_decay", "grad_clip")},
          **{name: Number(float, 0, 1, high_open=True) for name in ("beta1", "beta2", "lora_dropout")}}


def check_train_config(cfg):
    """Every field checked once, where the config is built: one line naming the field."""
    for name, admitted in RANGES.items():
        admitted.check(name, getattr(cfg, name))
    if cfg.min_lr > cfg.learning_rate:
        raise ValueError(f"min_lr ({cfg.min_lr}) is above learning_rate ({cfg.learning_rate}): the cosine decays "
                         f"from learning_rate down to min_lr")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(repr(a) for a in allowed)}, "
                             f"got {getattr(cfg, name)!r}")
    if cfg.peft and not cfg.init_from and not cfg.resume:
        raise ValueError(f"--peft {cfg.peft} fine-tunes a pretrained model: give it with --init_from PATH")
    if cfg.peft == "lora":
        parse_targets(cfg.lora_targets)  # an unknown name fails now, not after loading the model
    if cfg.init_from and os.path.abspath(cfg.init_from.removesuffix("ckpt.pt")) == os.path.abspath(cfg.out_dir):
        raise ValueError(f"--init_from {cfg.init_from} is the run's own --out_dir: it would overwrite the model it "
                         f"starts from; write elsewhere, e.g. --out_dir {free_out_dir(cfg.out_dir + '_ft')}")


def check_evaluation_cost(cfg):
    """Say so before the run when evaluating costs more than training: each evaluation is
    eval_iters forward passes per split, every eval_interval steps and at the end, against
    grad_accum forward + backward passes (about 3 forwards) per training step."""
    evals = cfg.max_iters // cfg.eval_interval + 1
    evaluating, training = 2 * cfg.eval_iters * evals, 3 * cfg.grad_accum * cfg.max_iters
    if evaluating > max(training, 1):
        print(f"note: evaluation costs more than training: {evals:,} evaluation(s) x 2 splits x {cfg.eval_iters:,} "
              f"batches = {evaluating:,} forward passes against {cfg.max_iters:,} steps x {cfg.grad_accum} "
              f"micro-batch(es) x 3 = {training:,}; lower --eval_iters or raise --eval_interval")


def quick_caps(cfg):
    """NANO_QUICK=1 (set by tests/test_docs.py only): every documented command runs in
    seconds, a few iterations of the same code path."""
    if not os.environ.get("NANO_QUICK"):
        return cfg
    print("NANO_QUICK: a few iterations only (the documentation test)")
    return TrainConfig(**{**asdict(cfg), "max_iters": min(cfg.max_iters, 4), "eval_interval": 2, "eval_iters": 1,
                          "batch_size": min(cfg.batch_size, 2), "sample_tokens": min(cfg.sample_tokens, 20),
                          "warmup_iters": min(cfg.warmup_iters, 1)})


def parse_value(name, text, default):
    """Parse a command-line value by the type of the field's default (never eval'd)."""
    if name == "compile" and isinstance(default, str):  # auto, or a yes / no
        if text.lower() == "auto":
            return "auto"
        try:
            return "true" if parse_value(name, text, True) else "false"
        except ValueError:
            raise ValueError(f"--compile expects auto or a bool (true / false), got {text!r}") from None
    kind = type(default)
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise ValueError(f"--{name} expects a {kind.__name__}, got {text!r}") from None


def argument_parser():
    """One --option per field of TrainConfig and ModelConfig, generated from the dataclasses:
    its description is the field's comment, its range the field's entry in RANGES."""
    p = Parser(__doc__, allow_abbrev=False)
    p.add_argument("--config", default="debug", help=f"one of: {', '.join(CONFIGS)}")
    p.add_argument("--estimate_memory", action="store_true", help="print the memory estimate and stop")
    g = p.add_argument_group("run planner (--plan prints the plan and stops; plan.py)")
    g.add_argument("--plan", action="store_true", help="tokens, steps, FLOPs, memory per device, time")
    g.add_argument("--plan_tokens", type=Number(float, 0, low_open=True),
                   help="total tokens (default: max_iters steps)")
    g.add_argument("--plan_tokens_per_sec", type=Number(float, 0, low_open=True),
                   help="measured throughput per device (default: from --plan_mfu)")
    g.add_argument("--plan_mfu", type=Number(float, 0, 1, low_open=True),
                   help="or a model FLOPs utilization, 1 = the device's peak (default: plan.py's guess)")
    g.add_argument("--plan_device", default="auto", help="one of plan.DEVICES, or auto: this machine's GPU, else CPU")
    g.add_argument("--plan_devices", type=Number(int, 1), default=1, help="number of devices")
    presets = {c: ModelConfig.from_name(CONFIGS[c].model) for c in CONFIGS}
    for group, cls, ranges, defaults in (("training", TrainConfig, RANGES, CONFIGS),
                                         ("model (model.py)", ModelConfig, MODEL_RANGES, presets)):
        g = p.add_argument_group(group)
        comments = field_comments(cls)
        for f in fields(cls):
            is_bool = f.type in (bool, "bool") or f.name == "compile"  # a bare --compile means true
            kind = f.type if isinstance(f.type, type) else {"int": int, "float": float}.get(f.type)
            g.add_argument(f"--{f.name}", default=None, metavar="BOOL" if is_bool else f.type.upper() if
                           isinstance(f.type, str) else f.type.__name__.upper(),
                           nargs="?" if is_bool else None, const="true" if is_bool else None,
                           type=ranges.get(f.name, Number(kind) if kind in (int, float) else None),
                           help="; ".join(filter(None, [comments.get(f.name), config_defaults(f.name, defaults)])))
    return p


def config_defaults(name, defaults):
    """'default 0.001 (first: 0.003, ...)': the value in the debug config, and where the others differ."""
    values = {c: getattr(d, name) for c, d in defaults.items()}
    others = [f"{c}: {v!r}" for c, v in values.items() if v != values["debug"]]
    return f"default {values['debug']!r}" + (f" ({', '.join(others)})" if others else "")


PLANNER_ARGS = ("config", "estimate_memory", "plan", "plan_tokens", "plan_tokens_per_sec", "plan_mfu", "plan_device",
                "plan_devices")


def parse_args(argv):
    """argv -> (TrainConfig, {model field: value}, set of train fields given explicitly)."""
    p = argument_parser()
    args, rest = p.parse_known_args(argv)
    if rest:
        name = rest[0].partition("=")[0]
        options = [a.removeprefix("--") for a in p._option_string_actions if a.startswith("--")]
        close = difflib.get_close_matches(name.removeprefix("--"), options)
        hint = f"; did you mean --{close[0]}?" if close else "; see python train.py --help"
        raise ValueError(f"unknown option {name}{hint}" if name.startswith("--") else
                         f"unexpected argument {name!r}; use --field value")
    if args.config not in CONFIGS:
        raise ValueError(f"unknown config {args.config!r}; known configs: {', '.join(CONFIGS)}")
    given = {k: v for k, v in vars(args).items() if v is not None and k not in PLANNER_ARGS}
    base = CONFIGS[args.config]
    train_names = {f.name for f in fields(TrainConfig)}
    train_args = {k: parse_value(k, v, getattr(base, k)) for k, v in given.items() if k in train_names}
    model_defaults = ModelConfig.from_name(train_args.get("model", base.model))
    model_args = {k: parse_value(k, v, getattr(model_defaults, k)) for k, v in given.items() if k not in train_names}
    if train_args.get("init_from") and "out_dir" not in train_args:  # a fine-tune gets its own out_dir
        train_args["out_dir"] = free_out_dir(base.out_dir + "_ft")
    cfg = quick_caps(TrainConfig(**{**asdict(base), **train_args}))
    check_train_config(cfg)
    ModelConfig.from_name(cfg.model, **model_args)  # the model fields are checked now too
    return cfg, model_args, set(train_args)


# ----------------------------------------------------------------------------- data
def load_dataset(spec):
    """The tokenizer description (meta.json) of a --dataset: one prepared dataset, or a
    mixture `name:weight,name:weight` of datasets made with one tokenizer (data/dataset.py).
    The default datasets (pydoc_char, pydoc_bpe) are prepared on first use."""
    names = [name for name, _ in parse_mixture(spec)]
    for name in names:
        path = dataset_dir(name)
        corpus, _, tokenizer = os.path.basename(path).rpartition("_")
        if not os.path.exists(os.path.join(path, "meta.json")) and corpus == "pydoc" and tokenizer in ("char", "bpe"):
            print(f"preparing the default dataset {name} (once)")
            prepare("pydoc", tokenizer, out=path, verbose=False)
    first = open_dataset(names[0])  # every source is checked again by the samplers below
    return {**first.meta, "path": first.path, "train_tokens": first.tokens("train")}


def samplers(cfg, block_size, vocab_size):
    """(B, T+1) windows: "train" draws the training batches (every process the same global
    batch, of which it takes its own micro-batches; resumable from a counter), "eval_train"
    and "eval_val" the evaluation batches, restarted at every evaluation so each one reads
    the same windows. Opening them checks every source's shards, ids and split lengths."""
    return {"train": Mixture.from_spec(cfg.dataset, "train", block_size, vocab_size, cfg.seed),
            **{f"eval_{split}": Mixture.from_spec(cfg.dataset, split, block_size, vocab_size, cfg.seed + 1)
               for split in ("train", "val")}}


def get_batch(windows, device):
    """(B, T+1) windows -> inputs x and next-token targets y, (B, T) each, on the device."""
    x, y = windows[:, :-1], windows[:, 1:]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- optimizer
def make_optimizer(model, cfg, device):
    """AdamW with weight decay on the matrices only (not on norms' gains); QLoRA pages its state."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if cfg.peft == "qlora":
        return PagedAdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type in ("cuda", "cpu"))


def get_lr(it, cfg):
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(decay_iters - cfg.warmup_iters, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


# ----------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(r):
    """Mean loss over eval_iters batches per split; the same batches at every evaluation."""
    r.model.eval()
    out = {}
    for split in ("train", "val"):
        sampler = r.data[f"eval_{split}"]
        sampler.load_state_dict({**sampler.state_dict(), "draws": 0})
        losses = []
        for _ in range(r.cfg.eval_iters):
            x, y = get_batch(sampler.draw(r.cfg.batch_size), r.device)
            with r.autocast:
                losses.append(r.model(x, y)[1].item())
        out[split] = sum(losses) / len(losses)
    r.model.train()
    return out


def setup(cfg, model_args, explicit):
    """Resume or start: the run's config, data, model, optimizer and RNG state, in one
    namespace `r` that the loop reads (every field is set here, before the loop runs)."""
    r = SimpleNamespace()
    r.rank, r.world, r.device = setup_distributed(cfg)
    r.master = r.rank == 0
    r.ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    r.ckpt = None
    check_run_kind(cfg.out_dir, "train.py", resume=True)  # a llava.py or align.py run: refused now
    if cfg.resume:
        r.ckpt = load_checkpoint(r.ckpt_path)
        # the run's own settings; only what this command line sets explicitly changes
        saved = r.ckpt["train_config"]
        if "peft" in explicit and cfg.peft != saved.get("peft", ""):
            raise ValueError(f"{cfg.out_dir} is a {'--peft ' + saved['peft'] if saved.get('peft') else 'full'} "
                             f"run; it cannot be resumed with --peft {cfg.peft or '(none)'}: use another out_dir")
        known = {f.name for f in fields(TrainConfig)}
        if isinstance(saved.get("compile"), bool):  # a run saved when --compile was a plain yes / no
            saved = {**saved, "compile": "true" if saved["compile"] else "false"}
        cfg = TrainConfig(**{**{k: v for k, v in saved.items() if k in known},
                             **{k: getattr(cfg, k) for k in explicit}, "resume": True})
        check_train_config(cfg)
    r.cfg = cfg
    r.dtype = {"auto": torch.bfloat16 if r.device.type == "cuda" else torch.float32,
               "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    if r.ckpt is None and not cfg.init_from:  # a new model: its shapes alone say whether a step fits, before
        check_fits(cfg, ModelConfig.from_name(cfg.model, **model_args), r.device, r.dtype, r.world)  # data or weights
    r.local_accum = split_grad_accum(cfg, r.world, r.master)
    if r.master:
        lock_out_dir(cfg.out_dir)  # before anything reads or writes the out_dir's files
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    r.meta = load_dataset(cfg.dataset)
    r.tokenizer_id = tokenizer_fingerprint(r.meta["path"])
    if r.ckpt is not None and r.ckpt.get("tokenizer", r.tokenizer_id) != r.tokenizer_id:
        raise ValueError(f"{cfg.out_dir} was trained with another tokenizer than dataset {cfg.dataset}'s "
                         f"(fingerprints {r.ckpt['tokenizer']} and {r.tokenizer_id}); resume on its own dataset")
    model = build_model(asdict(cfg), model_args, r.meta["vocab_size"], r.ckpt)
    check_finite(model, cfg.init_from or cfg.out_dir)
    r.raw = model.to(r.device)
    r.raw.grad_checkpoint = cfg.grad_checkpoint
    r.config = r.raw.config
    check_fits(cfg, r.config, r.device, r.dtype, r.world)  # as built: a checkpoint's shapes, the tokenizer's vocabulary
    if r.master:
        check_out_dir(cfg.out_dir, 3 * 4 * count_params(r.config))  # fp32 weights + two AdamW moments
        check_epochs(cfg, r.config, r.meta)
        check_evaluation_cost(cfg)
    r.autocast = torch.autocast(r.device.type, dtype=r.dtype) if r.dtype != torch.float32 else nullcontext()
    r.model = wrap_model(r.raw, cfg, r.world, r.device)
    r.optimizer = make_optimizer(r.raw, cfg, r.device)
    r.data = samplers(cfg, r.config.block_size, r.meta["vocab_size"])  # checks every shard's ids and length
    r.iter_num = 0
    r.history = {"iter": [], "train_loss": [], "eval_iter": [], "val_loss": [], "eval_train_loss": []}
    if r.ckpt is not None:  # a PEFT checkpoint holds only the trainable tensors: the rest is the base's
        model_sd = {**r.raw.state_dict(), **r.ckpt["model"]} if cfg.peft else r.ckpt["model"]
        load_state_dicts(r.raw, r.optimizer, model_sd, r.ckpt["optimizer"])
        r.iter_num, r.history = r.ckpt["iter_num"], r.ckpt["history"]
        if not isinstance(r.ckpt["rng"]["data"], dict):
            raise ValueError(f"{cfg.out_dir}/ckpt.pt records its data position in an older format; it cannot "
                             f"be resumed exactly: start a new run (or fine-tune from it with --init_from)")
        r.data["train"].load_state_dict(r.ckpt["rng"]["data"])
        torch.set_rng_state(r.ckpt["rng"]["torch"][r.rank])
        if r.device.type == "cuda" and r.ckpt["rng"].get("cuda"):
            torch.cuda.set_rng_state(r.ckpt["rng"]["cuda"][r.rank])
    else:
        torch.manual_seed(cfg.seed + r.rank)  # different dropout masks on each process
    if r.master:  # the last check, so a run refused for another reason says that first; nothing written yet
        check_run_kind(cfg.out_dir, "train.py", resume=cfg.resume)
    r.last_saved = r.iter_num if r.ckpt is not None else None
    return r


def save(r, step_seconds):
    """One complete checkpoint: weights, optimizer, RNG of every process, data position."""
    cfg = r.cfg
    r.history["step_seconds"] = step_seconds  # training time, evaluations excluded
    model_sd, optim_sd = state_dicts(r.raw, r.optimizer)
    rngs = [torch.get_rng_state()]
    cuda_rngs = [torch.cuda.get_rng_state(r.device)] if r.device.type == "cuda" else []
    if r.world > 1:  # every process's RNG, for dropout after a resume
        rngs, cuda_rngs = gather(rngs[0], r.world), gather(cuda_rngs[0], r.world) if cuda_rngs else []
    peft_info = {}
    if cfg.peft:  # only what trains, plus a pointer to the frozen base and its fingerprint
        trainable = {n for n, p in r.raw.named_parameters() if p.requires_grad}
        model_sd = {n: t for n, t in model_sd.items() if n in trainable}
        peft_info = {"base": os.path.abspath(cfg.init_from), "peft": r.raw.peft_config,
                     "base_fingerprint": r.raw.base_fingerprint}
    if r.master:
        copy_tokenizer(r.meta["path"], cfg.out_dir)  # the first save is the first change to out_dir
        save_checkpoint({"model": model_sd, "optimizer": optim_sd, "iter_num": r.iter_num,
                         "model_config": r.config.to_dict(), "train_config": asdict(cfg),
                         "tokenizer": r.tokenizer_id,
                         "rng": {"torch": rngs, "cuda": cuda_rngs, "data": r.data["train"].state_dict()},
                         "history": r.history, **peft_info}, r.ckpt_path)
        if cfg.peft:
            save_adapter(r.raw, os.path.join(cfg.out_dir, "adapter"), os.path.abspath(cfg.init_from))
    r.last_saved = r.iter_num


def print_header(r):
    cfg, config = r.cfg, r.config
    n = count_params(config)
    if cfg.peft:
        n_train = sum(p.numel() for p in r.raw.parameters() if p.requires_grad)
        print(f"--peft {cfg.peft}: {n_train:,} trainable parameters ({100 * n_train / n:.3f}% of the base's {n:,})")
    print(f"model {cfg.model}: {n:,} parameters | {r.tokens_per_iter:,} tokens/iter ({cfg.grad_accum} x "
          f"{cfg.batch_size} x {config.block_size}) | {r.world} process(es) on {r.device} in "
          f"{str(r.dtype).removeprefix('torch.')} | dataset {cfg.dataset} ({r.meta['train_tokens']:,} train tokens)"
          + (f" | peak {r.peak / 1e9:,.0f} GFLOP/s" if r.peak else ""))
    print_memory_estimate(config, cfg.batch_size, cfg.lora_r, bf16=r.dtype == torch.bfloat16,
                          grad_checkpoint=cfg.grad_checkpoint)
    if compiles(cfg, r.device, r.world):
        print("compiling the model (the first iterations are slow)")


def train(cfg, model_args=None, explicit=()):
    """Run training; returns the history dict (losses per iteration and evaluation)."""
    created = not os.path.exists(cfg.out_dir)
    try:
        return loop(setup(cfg, model_args or {}, explicit))
    finally:
        unlock_out_dir(cfg.out_dir)
        if created and os.path.isdir(cfg.out_dir) and not os.listdir(cfg.out_dir):
            os.rmdir(cfg.out_dir)  # a run that failed before its first checkpoint leaves no trace
        if dist.is_initialized():
            dist.destroy_process_group()


def loop(r):
    """The training loop: evaluate and save every eval_interval steps, stop on a signal."""
    cfg, block_size = r.cfg, r.config.block_size
    started = time.perf_counter()
    r.tokens_per_iter = cfg.grad_accum * cfg.batch_size * block_size
    flops_per_iter = flops_per_token(r.config, block_size) * r.tokens_per_iter
    r.peak, r.peak_remeasured = peak_flops(r.device, r.dtype), False
    if r.master:
        print_header(r)
    start_iter, resumed_seconds, step_times = r.iter_num, r.history.get("step_seconds", 0.0), []
    stop = []  # the signal that asked to stop: SIGINT (Ctrl-C) or SIGTERM (a scheduler)

    def on_signal(signum, frame):
        """Note the signal (the loop stops at the next step's boundary) and say at once what
        happens until then: the evaluation and the save can take a while on a busy CPU."""
        if not stop and r.master:
            os.write(sys.stderr.fileno(), f"\n{signal.Signals(signum).name}: finishing the step in progress, then "
                     f"evaluating ({cfg.eval_iters} batches per split) and saving {r.ckpt_path} before stopping\n"
                     .encode())
        stop.append(signum)
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            at_end = r.iter_num >= cfg.max_iters
            if (r.iter_num % cfg.eval_interval == 0 or at_end or stop) and r.iter_num != r.last_saved:
                losses = evaluate(r)
                r.history["eval_iter"].append(r.iter_num)
                r.history["val_loss"].append(losses["val"])
                r.history["eval_train_loss"].append(losses["train"])
                save(r, resumed_seconds + sum(step_times))
                if r.master:
                    print(f"eval {r.iter_num}: train loss {losses['train']:.4f} | val loss {losses['val']:.4f} | "
                          f"saved {r.ckpt_path}", flush=True)
                    plot_losses(r.history, os.path.join(cfg.out_dir, "loss.png"),
                                f"train.py --out_dir {cfg.out_dir}: model {cfg.model}, dataset {cfg.dataset}")
            if stop:
                raise Interrupted(stop[0], r)
            if at_end:
                break
            step_times.append(step(r))
            if r.master and (r.iter_num % cfg.log_interval == 0 or r.iter_num == cfg.max_iters):
                recent = step_times[-((r.iter_num - start_iter - 1) % cfg.log_interval + 1):]
                dt = sum(recent) / len(recent)
                eta = sum(step_times) / len(step_times) * (cfg.max_iters - r.iter_num)
                mfu = f" | mfu {100 * flops_per_iter / dt / checked_peak(r, flops_per_iter / dt):.1f}%" \
                    if r.peak else ""
                print(f"iter {r.iter_num}/{cfg.max_iters} | loss {r.history['train_loss'][-1]:.4f} | "
                      f"lr {get_lr(r.iter_num - 1, cfg):.2e} | {r.tokens_per_iter / dt:,.0f} tok/s{mfu} | "
                      f"{dt * 1000:.0f} ms/iter | eta {format_time(eta)}", flush=True)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if r.master:
        print(f"done: {r.iter_num - start_iter} iterations in {format_time(time.perf_counter() - started)} "
              f"({format_time(sum(step_times))} of optimizer steps, the rest evaluations and checkpoints)", flush=True)
    if r.master and cfg.sample_tokens:
        print_sample(r)
    return r.history


def checked_peak(r, achieved):
    """MFU's denominator. A CPU's peak is measured at start-up: on a machine busy then, it
    comes out low and MFU over 100%. When the run outdoes it, measure again, once (MFU
    can still pass 100% if the model's products run faster than the 1024^3 probe)."""
    if achieved > r.peak and r.device.type == "cpu" and not r.peak_remeasured:
        r.peak, r.peak_remeasured = max(r.peak, peak_flops(r.device, r.dtype)), True
        print(f"the run outdid the CPU peak measured at start-up: measured again, {r.peak / 1e9:,.0f} GFLOP/s")
    return r.peak


def step(r):
    """One optimizer step over grad_accum micro-batches; returns its seconds."""
    cfg, t0 = r.cfg, time.perf_counter()
    lr = get_lr(r.iter_num, cfg)
    for group in r.optimizer.param_groups:
        group["lr"] = lr
    # every process draws the same global batch and takes its own micro-batches of it
    windows = r.data["train"].draw(cfg.grad_accum * cfg.batch_size)  # (grad_accum * B, T + 1)
    loss_sum = torch.zeros((), device=r.device)
    for micro in range(r.local_accum):
        k = r.rank * r.local_accum + micro
        x, y = get_batch(windows[k * cfg.batch_size:(k + 1) * cfg.batch_size], r.device)
        with grad_sync(r.model, micro == r.local_accum - 1):
            with r.autocast:
                _, loss = r.model(x, y)
            (loss / r.local_accum).backward()
        loss_sum += loss.detach()
    loss_value = loss_sum / r.local_accum
    if r.world > 1:
        dist.all_reduce(loss_value, op=dist.ReduceOp.AVG)
    loss_value = loss_value.item()
    if not math.isfinite(loss_value):
        kept = f"the last good checkpoint {r.ckpt_path} (iteration {r.last_saved}) was kept" \
            if r.last_saved is not None else "no checkpoint had been written yet"
        raise FloatingPointError(f"loss is {loss_value} at iteration {r.iter_num}: training diverged; {kept}. "
                                 f"Lower --learning_rate, raise --warmup_iters or set --grad_clip")
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(r.raw.parameters(), cfg.grad_clip)
    r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)
    r.history["iter"].append(r.iter_num)
    r.history["train_loss"].append(loss_value)
    r.iter_num += 1
    return time.perf_counter() - t0


class Interrupted(Exception):
    """SIGINT or SIGTERM: the loop saved a final checkpoint and stops."""

    def __init__(self, signum, r):
        self.code = 128 + signum  # 130 for Ctrl-C, 143 for SIGTERM: the shell's convention
        super().__init__(f"stopped by {signal.Signals(signum).name} at iteration {r.iter_num}: saved "
                         f"{r.ckpt_path}; continue with --resume --out_dir {r.cfg.out_dir}")


def print_sample(r):
    """A sample from the trained model, to see what it learned (the `first` config)."""
    tokenizer = load_tokenizer(r.meta["path"])
    prompt = torch.tensor([tokenizer.encode("\n")], device=r.device)
    r.raw.eval()
    with r.autocast:
        out = r.raw.generate(prompt, r.cfg.sample_tokens, temperature=0.8, top_k=50, n_vocab=tokenizer.n_vocab,
                             generator=torch.Generator(r.device).manual_seed(r.cfg.seed))
    print(f"--- a sample of {r.cfg.sample_tokens} tokens (python sample.py --out_dir {r.cfg.out_dir} for more):")
    print(readable(tokenizer.decode(out[0, 1:].tolist())))  # <|endoftext|> as a separator line


def print_plan(cfg, model_args, args):
    config = ModelConfig.from_name(cfg.model, **model_args)
    if args.plan_device == "auto":  # the GPU this run would use when the table knows it, else this CPU
        device = resolve_device(cfg.device)
        args.plan_device = (device_spec(device)[0] if device.type == "cuda" else None) or "CPU"
    p = plan(config, tokens_per_step=cfg.grad_accum * cfg.batch_size * config.block_size,
             steps=None if args.plan_tokens else cfg.max_iters, total_tokens=args.plan_tokens,
             tokens_per_sec=args.plan_tokens_per_sec, mfu=args.plan_mfu, device=args.plan_device,
             n_devices=args.plan_devices, seq_len=config.block_size, micro_batch=cfg.batch_size,
             grad_checkpoint=cfg.grad_checkpoint, fsdp=cfg.dist == "fsdp")
    print(format_plan(p))


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg, model_args, explicit = parse_args(argv)
        if "--plan" in argv:
            print_plan(cfg, model_args, argument_parser().parse_known_args(argv)[0])
            return
        if "--estimate_memory" in argv:
            print_memory_estimate(ModelConfig.from_name(cfg.model, **model_args), cfg.batch_size, cfg.lora_r,
                                  bf16=cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and torch.cuda.is_available()),
                                  grad_checkpoint=cfg.grad_checkpoint)
            return
        choose_threads(resolve_device(cfg.device))
        train(cfg, model_args, explicit)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:  # before the loop started: nothing of this run was saved
        print("interrupted before the first checkpoint of this run: nothing was saved", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, FloatingPointError) as e:
        exit_with_error(e)


if __name__ == "__main__":
    main()
