"""Pretrain or fine-tune the decoder.

    python train.py --config debug                       # seconds; prepares its data itself
    python train.py --config demo                        # a 12.6M-parameter GQA model on this CPU
    python train.py --config tinyllama_1b                # TinyLlama's recipe (GPUs)
    python train.py --config demo --n_layer 4 --learning_rate 3e-4 --compile
    python train.py --out_dir out/demo --resume          # continue exactly where it stopped
    python train.py --config tinyllama_1b --batch_size 1 --estimate_memory   # will it fit?
    torchrun --nproc_per_node 2 train.py --config demo --dist ddp   # or --dist fsdp
    python train.py --init_from out/mha --n_kv_head 2 --kv_init mean --max_iters 30   # GQA uptraining

A config is a named preset of TrainConfig (below) plus a ModelConfig preset (model.py);
`--field value` overrides any field of either. Values are parsed by the field's type,
never evaluated; an unknown field is an error.

What it follows:
  - AdamW (Loshchilov & Hutter, arXiv:1711.05101) with decoupled weight decay on the
    matrices only, linear warmup + cosine decay to min_lr (GPT-3 appendix B / TinyLlama).
  - Gradient accumulation: one optimizer step sums the gradients of grad_accum
    micro-batches (over all processes), so the batch is grad_accum * batch_size sequences.
  - MFU (PaLM appendix B): model FLOPs per second / the device's peak FLOP/s.
  - Checkpoints: out_dir/ckpt.pt, written to a temporary file and renamed (atomic), with
    the RNG and data position so --resume continues bit for bit (fp32 on CPU).
"""

import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist

from data.prepare import dataset_dir, prepare
from checkpoint import atomic_write, load_checkpoint, save_checkpoint, save_figure
from model import ModelConfig, count_params, flops_per_token
from runs import build_model, resolve_device, save_adapter


# ----------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    model: str = "debug"  # ModelConfig preset in model.py (its fields are overridable too)
    dataset: str = "pydoc_char"  # a prepared dataset: a name under data/ or a path
    out_dir: str = "out/debug"
    init_from: str = ""  # fine-tune from our out_dir / ckpt.pt or a Hugging Face directory
    resume: bool = False  # continue out_dir/ckpt.pt
    # batch: grad_accum * batch_size sequences of block_size tokens per optimizer step
    batch_size: int = 16  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per step, over all processes
    max_iters: int = 200
    # AdamW and the learning-rate schedule
    learning_rate: float = 1e-3
    min_lr: float = 1e-4  # the cosine decays to this
    warmup_iters: int = 20
    lr_decay_iters: int = 0  # 0: decay over max_iters
    weight_decay: float = 0.1  # on matrices (dim >= 2) only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the global gradient norm; 0: off
    # evaluation, logging, checkpoints
    eval_interval: int = 50  # also the checkpoint interval
    eval_iters: int = 20  # batches per split in an evaluation
    log_interval: int = 10
    # system
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 autocast on cuda, float32 on cpu
    compile: bool = False  # torch.compile the model
    dist: str = "ddp"  # under torchrun: ddp or fsdp
    seed: int = 1337
    kv_init: str = ""  # with --init_from and a new --n_kv_head: mean, first or random (convert_kv_heads)
    # parameter-efficient fine-tuning of --init_from (peft.py): "" (full), lora, prefix or qlora
    peft: str = ""
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q,v"  # q k v o gate up down, or all (qlora always adapts all)
    prefix_len: int = 10
    prefix_hidden: int = 512  # width of the prefix reparametrization MLP


PRESETS = {
    "debug": TrainConfig(),
    "demo": TrainConfig(model="demo", dataset="pydoc_bpe", out_dir="out/demo", batch_size=8, max_iters=600,
                        learning_rate=1e-3, min_lr=1e-4, warmup_iters=60, eval_interval=100, eval_iters=20),
    # TinyLlama (arXiv:2401.02385 section 2.3): 1024 x 2048 = 2M tokens per step.
    "tinyllama_1b": TrainConfig(model="tinyllama_1b", dataset="pydoc_bpe", out_dir="out/tinyllama_1b",
                                batch_size=8, grad_accum=128, max_iters=1_430_000, learning_rate=4e-4,
                                min_lr=4e-5, warmup_iters=2000, weight_decay=0.1, beta1=0.9, beta2=0.95,
                                grad_clip=1.0, eval_interval=1000, eval_iters=50),
}


def parse_value(name, text, default):
    """Parse a command-line value by the type of the field's default (never eval'd)."""
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


def parse_args(argv):
    """argv -> (TrainConfig, {model field: value}, set of train fields given explicitly)."""
    train_fields = {f.name: f for f in fields(TrainConfig)}
    model_fields = {f.name: f for f in fields(ModelConfig)}
    args, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; use --field value")
        name, _, value = arg[2:].partition("=")
        if name not in train_fields and name not in model_fields and name != "config":
            import difflib
            close = difflib.get_close_matches(name, list(train_fields) + list(model_fields))
            raise ValueError(f"unknown option --{name}" + (f"; did you mean --{close[0]}?" if close else
                                                             "; see TrainConfig in train.py and ModelConfig in model.py"))
        if not value:  # `--compile` alone means true; otherwise the value is the next word
            is_flag = name in train_fields and isinstance(train_fields[name].default, bool)
            if is_flag and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                value = "true"
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                raise ValueError(f"--{name} needs a value")
        args[name] = value
        i += 1

    name = args.pop("config", "debug")
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; known configs: {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    train_args = {k: parse_value(k, v, getattr(cfg, k)) for k, v in args.items() if k in train_fields}
    model_defaults = ModelConfig.from_name(cfg.model if "model" not in train_args else train_args["model"])
    model_args = {k: parse_value(k, v, getattr(model_defaults, k)) for k, v in args.items() if k not in train_fields}
    cfg = TrainConfig(**{**asdict(cfg), **train_args})
    check_train_config(cfg)
    return cfg, model_args, set(train_args)


def check_train_config(cfg):
    for name in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_iters < 0 or cfg.warmup_iters < 0 or cfg.learning_rate <= 0:
        raise ValueError("max_iters and warmup_iters must be >= 0 and learning_rate > 0")
    if cfg.dist not in ("ddp", "fsdp"):
        raise ValueError(f"--dist must be ddp or fsdp, got {cfg.dist!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.kv_init not in ("", "mean", "first", "random"):
        raise ValueError(f"--kv_init must be mean, first or random, got {cfg.kv_init!r}")
    if cfg.peft not in ("", "lora", "prefix", "qlora"):
        raise ValueError(f"--peft must be lora, prefix or qlora (or empty for full fine-tuning), got {cfg.peft!r}")
    if cfg.peft and not cfg.init_from and not cfg.resume:
        raise ValueError(f"--peft {cfg.peft} fine-tunes a pretrained model: give it with --init_from PATH")
    if cfg.peft == "lora":
        from peft import parse_targets
        parse_targets(cfg.lora_targets)  # an unknown name fails now, not after loading the model


# ----------------------------------------------------------------------------- data
def load_dataset(name):
    """meta.json and the train/val token arrays (memory-mapped) of a prepared dataset.

    The default datasets (pydoc_char, pydoc_bpe) are prepared on first use."""
    path = dataset_dir(name)
    if not os.path.exists(os.path.join(path, "meta.json")):
        corpus, _, tokenizer = os.path.basename(path).rpartition("_")
        if corpus != "pydoc" or tokenizer not in ("char", "bpe"):
            raise FileNotFoundError(f"dataset {path} is not prepared (no meta.json): run "
                                    f"`python data/prepare.py --corpus CORPUS --tokenizer TOKENIZER --out {path}`")
        print(f"preparing the default dataset {name} (once)")
        prepare("pydoc", tokenizer, out=path, verbose=False)
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    splits = {}
    for split in ("train", "val"):
        bin_path = os.path.join(path, f"{split}.bin")
        if not os.path.exists(bin_path):
            raise FileNotFoundError(f"{bin_path} is missing: re-run data/prepare.py for {path}")
        splits[split] = np.memmap(bin_path, dtype=meta["dtype"], mode="r")
    return meta, splits


def get_batch(data, offsets, block_size, device):
    """Sequences starting at `offsets` of the token array: inputs x and next-token targets y, (B, T)."""
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in offsets.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in offsets.tolist()])
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def draw_offsets(data, n, block_size, generator):
    if len(data) <= block_size + 1:
        raise ValueError(f"the split has {len(data)} tokens, fewer than block_size + 1 = {block_size + 1}")
    return torch.randint(len(data) - block_size - 1, (n,), generator=generator)


# ----------------------------------------------------------------------------- checkpoints
def check_out_dir(out_dir, needed_bytes):
    """Fail before training, not after an hour: out_dir must be writable with room for
    two checkpoints (the new one is written before the old one is replaced)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write_test")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"out_dir {out_dir} is not writable ({e.strerror}); choose another --out_dir") from None
    free = shutil.disk_usage(out_dir).free
    if free < 2 * needed_bytes:
        raise OSError(f"out_dir {out_dir} has {free / 1e9:.2f} GB free but checkpoints need about "
                      f"{2 * needed_bytes / 1e9:.2f} GB; free some space or choose another --out_dir")


# ----------------------------------------------------------------------------- optimizer
def format_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024


def estimate_memory(config, batch_size, seq_len=None, lora_r=8, dtype_bytes=4):
    """Will it fit? Bytes of one training step for full fine-tuning, LoRA and QLoRA.

    weights + gradients + AdamW's two moments + the activations autograd keeps for the
    backward pass, counted per token and layer from the forward (RMSNorm inputs, the
    normed inputs of the projections, q/k/v and the attention output that SDPA keeps,
    SwiGLU's four (B, T, intermediate) tensors) plus the logits, their log-softmax and
    gradients, and one layer's gradients in flight. LoRA
    keeps a 16-bit frozen base and trains rank-r adapters on every linear layer of the
    blocks (QLoRA section 4's setting); QLoRA stores that base in NF4 with double
    quantization (4.127 bits/param, section 3). The KV cache is the decoding cache of
    batch_size sequences at full context. Checked against the measured peak by bench.py.
    """
    T = seq_len or config.block_size
    C, I, L, V = config.n_embd, config.intermediate_size, config.n_layer, config.vocab_size
    kv = config.n_kv_head * config.head_dim
    n = count_params(config)  # no model is built: everything follows from the config
    n_block_linear = L * (C * config.n_head * config.head_dim * 2 + 2 * C * kv + 3 * C * I)
    # elements per token: kept for the backward pass by every layer; the final norm and the
    # logits with their log-softmax and the two gradients of the loss's backward (4 x V); and
    # the gradients of one layer being back-propagated (4 x I + 4 x C)
    per_token = L * (7 * C + 2 * kv + 4 * I) + 3 * C + 5 * V + 4 * I + 4 * C
    activations = dtype_bytes * batch_size * T * per_token
    lora_params = L * r_adapters(config, lora_r)
    adapters = {"weights": 4 * lora_params, "gradients": 4 * lora_params, "optimizer": 8 * lora_params}
    modes = {
        "full": {"weights": 4 * n, "gradients": 4 * n, "optimizer": 8 * n},
        "lora": {"base": 2 * n, **adapters},
        "qlora": {"base": n_block_linear * 4.127 / 8 + 2 * (n - n_block_linear), **adapters},
    }
    out = {}
    for mode, parts in modes.items():
        parts = {**parts, "activations": activations}
        out[mode] = {**parts, "total": sum(parts.values())}
    out["kv_cache"] = 2 * L * kv * config.block_size * batch_size * dtype_bytes
    out["params"], out["lora_params"] = n, lora_params
    return out


def r_adapters(config, r):
    """LoRA parameters of one block with adapters on all seven linear layers: r * (in + out) each."""
    C, I, kv = config.n_embd, config.intermediate_size, config.n_kv_head * config.head_dim
    q = config.n_head * config.head_dim
    return r * ((C + q) * 2 + (C + kv) * 2 + (C + I) * 3)


def print_memory_estimate(config, cfg):
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and resolve_device(cfg.device).type == "cuda")
    est = estimate_memory(config, cfg.batch_size, config.block_size, getattr(cfg, "lora_r", 8), 2 if bf16 else 4)
    print(f"memory estimate for {cfg.batch_size} x {config.block_size} tokens per micro-batch "
          f"({est['params']:,} parameters, {'bf16 autocast' if bf16 else 'fp32'} activations):")
    for mode in ("full", "lora", "qlora"):
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in est[mode].items() if k != "total")
        print(f"  {mode:5s}: {format_bytes(est[mode]['total']):>12s}  ({parts})")
    print(f"  KV cache for decoding {cfg.batch_size} sequences at full context: {format_bytes(est['kv_cache'])}")


def make_optimizer(model, cfg, device):
    """AdamW with weight decay on the matrices only (not on norms' gains); QLoRA pages its state."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if cfg.peft == "qlora":
        from peft import PagedAdamW
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


# ----------------------------------------------------------------------------- MFU
PEAK_FLOPS = {  # dense bf16 tensor-core FLOP/s, from the vendors' datasheets
    "A100": 312e12, "H100": 989e12, "H200": 989e12, "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12,
}


def peak_flops(device, dtype):
    """The device's peak FLOP/s: a datasheet figure for GPUs; measured on CPU (fp32 matmul)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_FLOPS.items():
            if key in name:
                return flops if dtype == torch.bfloat16 else flops / 2  # tf32 is half the bf16 rate
        return None  # unknown GPU: MFU not reported
    g = torch.Generator().manual_seed(0)  # not the global RNG: that one drives dropout
    a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * 1024 ** 3 / best


# ----------------------------------------------------------------------------- plot
def plot_losses(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["iter"], history["train_loss"], lw=1, label="train (per step)")
    if history["eval_iter"]:
        ax.plot(history["eval_iter"], history["val_loss"], "o-", label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------- distributed
def setup_distributed(cfg):
    """Under torchrun (RANK is set) join the process group: gloo on CPU, nccl on GPU."""
    device = resolve_device(cfg.device)
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def wrap_model(model, cfg, world, device):
    """DDP replicates the model and averages gradients; FSDP shards parameters, gradients
    and optimizer state across processes (one shard group per Block)."""
    if world > 1 and cfg.dist == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    wrapped = torch.compile(model) if cfg.compile else model
    if world > 1 and cfg.dist == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    return wrapped


def grad_sync(model, sync):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(model, "no_sync"):  # DDP
        return nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def state_dicts(model, optimizer):
    """Full (unsharded) model and optimizer state dicts keyed by parameter name: the same
    format for one process, DDP and FSDP, so a checkpoint moves between them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_state_dicts(model, optimizer, model_sd, optim_sd):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(model, data, cfg, block_size, device, autocast):
    """Mean loss over eval_iters batches per split; the same batches at every evaluation."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        g = torch.Generator().manual_seed(cfg.seed + 1)
        offsets = draw_offsets(data[split], cfg.eval_iters * cfg.batch_size, block_size, g)
        losses = []
        for k in range(cfg.eval_iters):
            x, y = get_batch(data[split], offsets[k * cfg.batch_size:(k + 1) * cfg.batch_size], block_size, device)
            with autocast:
                losses.append(model(x, y)[1].item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


def train(cfg, model_args=None, explicit=()):
    """Run training; returns the history dict (losses per iteration and evaluation)."""
    model_args = model_args or {}
    rank, world, device = setup_distributed(cfg)
    master = rank == 0
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        # the run's own settings; only what this command line sets explicitly changes
        cfg = TrainConfig(**{**ckpt["train_config"], **{k: getattr(cfg, k) for k in explicit}, "resume": True})
    if cfg.grad_accum % world:
        raise ValueError(f"grad_accum={cfg.grad_accum} must be divisible by the {world} processes")
    local_accum = cfg.grad_accum // world

    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    meta, data = load_dataset(cfg.dataset)
    model = build_model(asdict(cfg), model_args, meta["vocab_size"], ckpt).to(device)
    config = model.config
    block_size = config.block_size
    if master:
        check_out_dir(cfg.out_dir, 3 * 4 * model.num_params())  # fp32 weights + two AdamW moments
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    raw = model
    model = wrap_model(raw, cfg, world, device)
    optimizer = make_optimizer(raw, cfg, device)
    data_gen = torch.Generator().manual_seed(cfg.seed)  # draws the training batches
    iter_num = 0
    history = {"iter": [], "train_loss": [], "eval_iter": [], "val_loss": [], "eval_train_loss": []}
    if ckpt is not None:  # a PEFT checkpoint holds only the trainable tensors: the rest is the base's
        model_sd = {**raw.state_dict(), **ckpt["model"]} if cfg.peft else ckpt["model"]
        load_state_dicts(raw, optimizer, model_sd, ckpt["optimizer"])
        iter_num, history = ckpt["iter_num"], ckpt["history"]
        data_gen.set_state(ckpt["rng"]["data"])
        torch.set_rng_state(ckpt["rng"]["torch"][rank])
        if device.type == "cuda" and ckpt["rng"].get("cuda"):
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][rank])
    else:
        torch.manual_seed(cfg.seed + rank)  # different dropout masks on each process
    start_iter = iter_num

    tokens_per_iter = cfg.grad_accum * cfg.batch_size * block_size
    flops_per_iter = flops_per_token(config, block_size) * tokens_per_iter
    peak = peak_flops(device, dtype)
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        copy_tokenizer(dataset_dir(cfg.dataset), cfg.out_dir)
        if cfg.peft:
            n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
            print(f"--peft {cfg.peft}: {n_train:,} trainable parameters "
                  f"({100 * n_train / count_params(config):.3f}% of the base's {count_params(config):,})")
        print(f"model {cfg.model}: {raw.num_params():,} parameters | {tokens_per_iter:,} tokens/iter "
              f"({cfg.grad_accum} x {cfg.batch_size} x {block_size}) | {world} process(es) on {device} in "
              f"{str(dtype).removeprefix('torch.')} | dataset {cfg.dataset} ({meta['train_tokens']:,} train tokens)"
              + (f" | peak {peak / 1e9:,.0f} GFLOP/s" if peak else ""))
        print_memory_estimate(config, cfg)
        if cfg.compile:
            print("compiling the model (the first iterations are slow)")

    def save(iter_num):
        history["step_seconds"] = resumed_seconds + sum(step_times)  # training time, evaluations excluded
        model_sd, optim_sd = state_dicts(raw, optimizer)
        rngs = [torch.get_rng_state()]
        cuda_rngs = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
        if world > 1:  # every process's RNG, for dropout after a resume
            rngs, cuda_rngs = gather(rngs[0], world), gather(cuda_rngs[0], world) if cuda_rngs else []
        peft_info = {}
        if cfg.peft:  # only what trains, plus a pointer to the frozen base
            trainable = {n for n, p in raw.named_parameters() if p.requires_grad}
            model_sd = {n: t for n, t in model_sd.items() if n in trainable}
            peft_info = {"base": os.path.abspath(cfg.init_from), "peft": raw.peft_config}
        if master:
            save_checkpoint({"model": model_sd, "optimizer": optim_sd, "iter_num": iter_num,
                             "model_config": config.to_dict(), "train_config": asdict(cfg),
                             "rng": {"torch": rngs, "cuda": cuda_rngs, "data": data_gen.get_state()},
                             "history": history, **peft_info}, ckpt_path)
            if cfg.peft:
                save_adapter(raw, os.path.join(cfg.out_dir, "adapter"), os.path.abspath(cfg.init_from))

    step_times = []  # seconds of each optimizer step (evaluations excluded)
    resumed_seconds = history.get("step_seconds", 0.0)
    last_saved = start_iter if ckpt is not None else None
    while True:
        at_end = iter_num >= cfg.max_iters
        if (iter_num % cfg.eval_interval == 0 or at_end) and not (ckpt is not None and iter_num == start_iter):
            losses = evaluate(model, data, cfg, block_size, device, autocast)
            history["eval_iter"].append(iter_num)
            history["val_loss"].append(losses["val"])
            history["eval_train_loss"].append(losses["train"])
            save(iter_num)
            last_saved = iter_num
            if master:
                print(f"eval {iter_num}: train loss {losses['train']:.4f} | val loss {losses['val']:.4f} | "
                      f"saved {ckpt_path}")
                plot_losses(history, os.path.join(cfg.out_dir, "loss.png"))
        if at_end:
            break

        t_step = time.perf_counter()
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # every process draws the same global batch and takes its own micro-batches of it
        offsets = draw_offsets(data["train"], cfg.grad_accum * cfg.batch_size, block_size, data_gen)
        loss_sum = torch.zeros((), device=device)
        for micro in range(local_accum):
            k = rank * local_accum + micro
            x, y = get_batch(data["train"], offsets[k * cfg.batch_size:(k + 1) * cfg.batch_size], block_size, device)
            with grad_sync(model, micro == local_accum - 1):
                with autocast:
                    _, loss = model(x, y)
                (loss / local_accum).backward()
            loss_sum += loss.detach()
        loss_value = loss_sum / local_accum
        if world > 1:
            dist.all_reduce(loss_value, op=dist.ReduceOp.AVG)
        loss_value = loss_value.item()
        if not math.isfinite(loss_value):
            kept = f"the last good checkpoint {ckpt_path} (iteration {last_saved}) was kept" if last_saved is not None \
                else "no checkpoint had been written yet"
            raise FloatingPointError(f"loss is {loss_value} at iteration {iter_num}: training diverged; {kept}. "
                                     f"Lower --learning_rate, raise --warmup_iters or set --grad_clip")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t_step)
        history["iter"].append(iter_num)
        history["train_loss"].append(loss_value)
        iter_num += 1

        if master and (iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters):
            recent = step_times[-((iter_num - start_iter - 1) % cfg.log_interval + 1):]
            dt = sum(recent) / len(recent)
            eta = sum(step_times) / len(step_times) * (cfg.max_iters - iter_num)
            mfu = f" | mfu {100 * flops_per_iter / dt / peak:.1f}%" if peak else ""
            print(f"iter {iter_num}/{cfg.max_iters} | loss {loss_value:.4f} | lr {lr:.2e} | "
                  f"{tokens_per_iter / dt:,.0f} tok/s{mfu} | {dt * 1000:.0f} ms/iter | eta {format_time(eta)}",
                  flush=True)
    if world > 1:
        dist.destroy_process_group()
    return history


def gather(tensor, world):
    out = [None] * world
    dist.all_gather_object(out, tensor)
    return out


def copy_tokenizer(data_dir, out_dir):
    """Copy meta.json (and the BPE file) next to the checkpoint: sample.py needs only out_dir."""
    for name in ("meta.json", "tokenizer.tiktoken"):
        src = os.path.join(data_dir, name)
        if os.path.exists(src):
            with open(src, "rb") as f:
                data = f.read()
            atomic_write(os.path.join(out_dir, name), lambda f: f.write(data))


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def main(argv=None):
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        only_estimate = "--estimate_memory" in argv  # print the memory estimate and stop
        cfg, model_args, explicit = parse_args([a for a in argv if a != "--estimate_memory"])
        if only_estimate:
            print_memory_estimate(ModelConfig.from_name(cfg.model, **model_args), cfg)
            return
        train(cfg, model_args, explicit)
    except (ValueError, OSError, FloatingPointError) as e:
        if os.environ.get("DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint in out_dir is complete; continue with --resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
