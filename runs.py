"""A run on disk, rebuilt: `load_run(out_dir)` gives back the model and tokenizer of any
train.py run (and of align.py's, which write the same layout).

An out_dir holds ckpt.pt (weights, optimizer, RNG, the run's model_config and
train_config), the tokenizer it was trained with (meta.json, tokenizer.tiktoken), and for
a --peft run only the trainable tensors, a pointer to the base and the adapter alone in
out_dir/adapter. Rebuilding applies, in train.py's order: the base (ours or Hugging
Face's), any GQA conversion, quantization (QLoRA), then the adapters. train.py --resume,
sample.py and the experiments all go through here.
"""

import os
import shutil
import sys
import textwrap

import safetensors.torch
import torch

import hf
import peft
import quant
from checkpoint import (atomic_write, check_same_config, fingerprint, load_checkpoint, read_json, save_figure,
                        tokenizer_files, tokenizer_fingerprint)
from data.tokenizer import load_tokenizer
from model import ModelConfig, Transformer, convert_kv_heads
from plan import format_bytes


def resolve_device(name):
    """'auto' -> cuda when there is one, else cpu; an unknown or absent device is one line."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this machine has no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not supported here; use auto, cpu or cuda")
    return device


def choose_threads(device, quiet=False):
    """Threads for a CPU run, chosen at start and printed. PyTorch's default, one thread per
    core, is fastest on an idle machine; when other processes keep the cores busy, threads
    that meet at a barrier after every product wait for each other and spin, and a step
    takes several times longer (experiments/threads.py measures it). So: the cores the
    1-minute load average leaves free, shared among the processes of a torchrun on this
    machine, at least 1. OMP_NUM_THREADS, when set, decides instead. Prints the choice
    (unless quiet: sample.py keeps its output for the text) and returns it."""
    if device.type != "cpu":
        return torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        n = torch.get_num_threads()
        if not quiet:
            print(f"threads: {n} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})")
        return n
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    n = max(1, min(cores, round((cores - load) / local_world)))
    torch.set_num_threads(n)
    if not quiet:
        print(f"threads: {n} of {cores} cores (load average {load:.1f} at start; on cores other work keeps busy, "
              f"extra threads wait for each other; OMP_NUM_THREADS=N chooses)")
    return n


def exit_with_error(e):
    """Every command line's end on bad input or a missing file: one line on stderr, exit
    status 1. DEBUG=1 in the environment shows the traceback instead."""
    if os.environ.get("DEBUG"):
        raise e
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


# ----------------------------------------------------------------------------- rebuilding a model
def load_pretrained(path):
    """(ModelConfig, state_dict) from our checkpoint (an out_dir or .pt) or a Hugging Face directory."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "ckpt.pt")):
        model = hf.load_llama(path)
        return model.config, model.state_dict()
    ckpt = load_checkpoint(path)
    return ModelConfig.from_dict(ckpt["model_config"]), ckpt["model"]


def build_model(train_config, model_args, vocab_size, ckpt=None):
    """The model of a run: resumed from ckpt, initialized from init_from, or fresh.

    train_config is the run's TrainConfig as a dict (the checkpoint's "train_config");
    model_args the ModelConfig fields set on the command line; vocab_size the tokenizer's.
    """
    tc = train_config
    if ckpt is not None and tc["peft"]:  # a PEFT run: rebuild it from the base it points to
        check_same_config(ckpt["model_config"], model_args, tc["out_dir"])
        tc = {**tc, "init_from": ckpt["base"]}
        now = base_fingerprint(ckpt["base"])
        if ckpt.get("base_fingerprint", now) != now:
            raise ValueError(f"the base {ckpt['base']} of the --peft run {tc['out_dir']} changed since the adapter "
                             f"was trained (fingerprint {ckpt['base_fingerprint']}, now {now}); restore that base "
                             f"or train a new adapter")
    elif ckpt is not None:  # resume: the checkpoint's shapes; command-line model fields must agree
        check_same_config(ckpt["model_config"], model_args, tc["out_dir"])
        return Transformer(ModelConfig.from_dict(ckpt["model_config"]))
    if tc["init_from"]:
        base, state = load_pretrained(tc["init_from"])
        n_kv_head = model_args.get("n_kv_head", base.n_kv_head)
        if n_kv_head != base.n_kv_head and not tc["kv_init"]:
            raise ValueError(f"--init_from {tc['init_from']} has n_kv_head={base.n_kv_head}; to uptrain it with "
                             f"n_kv_head={n_kv_head} say how to build the new heads: --kv_init mean|first|random")
        try:
            model = Transformer(ModelConfig.from_dict({**base.to_dict(), **model_args, "n_kv_head": base.n_kv_head}))
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"--init_from {tc['init_from']}: the overrides {model_args} change the shape of "
                             f"the pretrained weights ({str(e).splitlines()[1].strip()})") from None
        if n_kv_head != base.n_kv_head:  # GQA uptraining: pool the checkpoint's kv heads
            model = convert_kv_heads(model, n_kv_head, tc["kv_init"])
    else:
        if model_args.get("vocab_size", vocab_size) < vocab_size:
            raise ValueError(f"vocab_size={model_args['vocab_size']} is smaller than the tokenizer's "
                             f"{vocab_size} tokens")
        preset = ModelConfig.from_name(tc["model"])
        args = {"vocab_size": max(preset.vocab_size, vocab_size), **model_args}
        model = Transformer(ModelConfig.from_name(tc["model"], **args))
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"the model's vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
                         f"{vocab_size} tokens ({tc['dataset']}); use a dataset made with the model's tokenizer")
    if not tc["peft"]:
        return model
    model = apply_peft(model, tc)
    model.base_fingerprint = base_fingerprint(tc["init_from"])
    return model


def base_fingerprint(path):
    """The identity of a base model's files: its ckpt.pt, or a Hugging Face directory's
    config and weights. A PEFT checkpoint stores it and refuses a base that changed."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "ckpt.pt")):
        return fingerprint([os.path.join(path, n) for n in os.listdir(path)
                            if n == "config.json" or n.endswith((".safetensors", ".bin"))])
    return fingerprint([os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path])


def check_finite(model, source):
    """NaN or inf in loaded weights is bad input (a damaged file), not a training divergence."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
            raise ValueError(f"{source}: tensor {name} holds NaN or inf values; the checkpoint is damaged "
                             f"(restore it or train again)")


def apply_peft(model, tc):
    """--peft: freeze the pretrained model and add trainable adapters (peft.py)."""
    if tc["peft"] == "prefix":
        return peft.apply_prefix(model, tc["prefix_len"], tc["prefix_hidden"])
    if tc["peft"] == "qlora":  # QLoRA section 3: NF4 + double-quantized base, LoRA on every linear layer
        quant.quantize_model(model, "nf4-dq", compute_dtype=quant.compute_dtype_for(resolve_device(tc["device"])))
    targets = "all" if tc["peft"] == "qlora" else tc["lora_targets"]
    return peft.apply_lora(model, tc["lora_r"], tc["lora_alpha"], targets, tc["lora_dropout"])


def load_run(out_dir, device="cpu"):
    """(model, tokenizer, ckpt) of a train.py run: the model as the run trained it, in eval mode.

    A --peft run saved only its trainable tensors and a pointer to the base: the base is
    loaded, converted and quantized as the run did, then the adapter's tensors go in.
    """
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    if "train_config" not in ckpt:
        kind = run_kind(out_dir)
        raise ValueError(f"{out_dir} holds {held(kind)}, not a train.py or align.py run"
                         + ("; sample.py reads it with --image PNG" if kind == "llava.py" else ""))
    tc = ckpt["train_config"]
    if tc.get("peft"):
        config = ckpt["model_config"]  # the converted model's (n_kv_head after GQA uptraining)
        model = build_model({**tc, "out_dir": out_dir}, config, config["vocab_size"], ckpt)
        model.load_state_dict({**model.state_dict(), **ckpt["model"]})
    else:
        model = Transformer(ModelConfig.from_dict(ckpt["model_config"]))
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
        if missing or unexpected:
            raise ValueError(f"{out_dir}/ckpt.pt does not match its own config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    check_finite(model, out_dir)
    tokenizer = load_tokenizer(out_dir)
    if ckpt.get("tokenizer") and ckpt["tokenizer"] != tokenizer_fingerprint(out_dir):
        raise ValueError(f"{out_dir}: the tokenizer files (meta.json, tokenizer.tiktoken) are not the ones the "
                         f"checkpoint was trained with; copy them from the run's dataset")
    return model.to(device).eval(), tokenizer, ckpt


# ----------------------------------------------------------------------------- an out_dir
def run_kind(out_dir):
    """Which command wrote out_dir/ckpt.pt: 'train.py', 'align.py', 'llava.py', 'unreadable'
    (corrupt or truncated), 'another program', or None where there is none. Memory-mapped: no
    weights are read."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return "unreadable"
    if not isinstance(ckpt, dict):
        return "another program"
    if "vocab" in ckpt or "vision" in ckpt.get("model_config", {}):
        return "llava.py"
    if isinstance(ckpt.get("train_config"), dict):
        return "align.py" if "stage" in ckpt["train_config"] else "train.py"
    return "another program"


def held(kind):
    """run_kind's answer in words."""
    return {"unreadable": "a ckpt.pt that cannot be read (corrupt or truncated)",
            "another program": "a ckpt.pt of another program"}.get(kind, f"a {kind} run (ckpt.pt)")


def check_run_kind(out_dir, writer, resume=False):
    """A writer refuses an out_dir that holds another kind of run, or a run of its own kind that
    it would overwrite rather than resume (resume=None: a writer that never resumes)."""
    kind = run_kind(out_dir)
    if kind is None or (kind in (writer, "unreadable") and resume):  # resuming, the loader says what is wrong
        return
    elsewhere = f"--out_dir {free_out_dir(out_dir.rstrip(os.sep) + '_new')}"
    if kind != writer:
        raise ValueError(f"out_dir {out_dir} holds {held(kind)} and {writer} would overwrite it; write elsewhere, "
                         f"e.g. {elsewhere}")
    again = "; continue it with --resume or" if resume is False else ";"
    raise ValueError(f"out_dir {out_dir} holds a {kind} run (ckpt.pt) that this command would overwrite{again} "
                     f"write elsewhere, e.g. {elsewhere}")


def free_out_dir(stem):
    """stem, or stem2, stem3, ...: the first that does not exist yet."""
    n, path = 1, stem
    while os.path.exists(path):
        n, path = n + 1, f"{stem}{n + 1}"
    return path


def check_out_dir(out_dir, needed_bytes):
    """Fail before training, not after an hour: out_dir must be writable with room for
    two checkpoints (the new one is written before the old one is replaced)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write(os.path.join(out_dir, ".write_test"), lambda f: f.write(b"ok"))
        os.remove(os.path.join(out_dir, ".write_test"))
    except OSError as e:
        raise PermissionError(f"out_dir {out_dir} is not writable ({e.strerror}); choose another --out_dir") from None
    free = shutil.disk_usage(out_dir).free
    if free < 2 * needed_bytes:
        raise OSError(f"out_dir {out_dir} has {format_bytes(free)} free but two checkpoints (the new one is "
                      f"written before the old one is replaced) need about {format_bytes(2 * needed_bytes)}; "
                      f"choose another --out_dir on a disk with more room")


def copy_tokenizer(data_dir, out_dir):
    """meta.json and the tokenizer file it names, next to the checkpoint: sample.py needs
    only out_dir."""
    for name in tokenizer_files(data_dir):
        src = os.path.join(data_dir, name)
        if os.path.exists(src):
            with open(src, "rb") as f:
                data = f.read()
            atomic_write(os.path.join(out_dir, name), lambda f: f.write(data))


def plot_losses(history, path, title):
    """loss.png: the loss of each optimizer step at the iteration the log line gives it
    (step N's loss, on its batch before its update, is printed as `iter N`), and each
    evaluation at the number of steps done when it ran (0: the initial weights)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([i + 1 for i in history["iter"]], history["train_loss"], lw=1, label="train (each step's batch)")
    if history["eval_iter"]:
        ax.plot(history["eval_iter"], history["val_loss"], "o-", label="val (evaluation)")
    ax.set(xlabel="iteration (optimizer steps)", ylabel="cross-entropy loss (nats/token)")
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=10)  # a long out_dir wraps, not cut off
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------- adapters
def save_adapter(model, path, base_path=""):
    """The adapter alone: LoRA in the HF PEFT layout (hf.py), a prefix in ours (peft.py)."""
    if model.peft_config["peft"] == "prefix":
        peft.save_prefix(model, path)
    else:
        hf.save_lora(model, path, base_path=base_path)


def load_adapter(model, path):
    """Load whatever adapter `path` holds (LoRA in HF PEFT layout, or a folded prefix)."""
    kind = read_json(os.path.join(path, "adapter_config.json")).get("peft_type")
    if kind == "LORA":
        return hf.load_lora(model, path)
    if kind == "PREFIX_KV":
        kv = safetensors.torch.load_file(os.path.join(path, "prefix.safetensors"))["prefix_kv"]
        c = model.config
        if kv.shape[:3] != (c.n_layer, 2, c.n_kv_head) or kv.shape[4] != c.head_dim:
            raise ValueError(f"{path}: prefix of shape {tuple(kv.shape)} does not fit this model "
                             f"(n_layer={c.n_layer}, n_kv_head={c.n_kv_head}, head_dim={c.head_dim})")
        peft.freeze(model)
        w = model.tok_embeddings.weight
        peft.attach_prefix(model, peft.PrefixKV(kv.to(w.device, w.dtype)))
        model.peft_config = {"peft": "prefix", "prefix_len": kv.shape[3], "reparam_hidden": 0}
        return model
    raise ValueError(f"{path}: unknown adapter type {kind!r} (expected LORA or PREFIX_KV)")
