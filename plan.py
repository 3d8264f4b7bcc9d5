"""Plan a run before it starts: will it fit, how many FLOPs, how long, on what.

    python train.py --config tinyllama_1b --plan --plan_tokens 300e9 \
        --plan_tokens_per_sec 24000 --plan_devices 16 --plan_device A100-40G
    python plan.py --config tinyllama_1b --quant nf4-dq     # bytes of every tensor, quantized

`estimate_memory` is the one memory estimator: train.py --estimate_memory and its fit
check, --plan, the fine-tuning experiment and bench.py (which checks it against the
measured peak) use it. Every byte width is an argument, so its assumptions are on the page:

    full  : weights + gradients (weight_bytes each) + AdamW's two fp32 moments (8 B);
            FSDP / ZeRO-3 (arXiv:1910.02054) shards the three over n_shards devices
    lora  : a frozen base in base_bytes, fp32 adapters with fp32 gradients and moments
    qlora : the blocks' linears in NF4 + double quantization (quantized_nbytes,
            QLoRA arXiv:2305.14314 section 3), the rest of the base in base_bytes
    + the activations autograd keeps for the backward pass (activation_bytes each); with
      activation checkpointing (Chen et al. 2016, arXiv:1604.06174; LLaMA section 2.4) a
      block keeps only its input and one block's activations are rebuilt at a time.

The time arithmetic:
  - FLOPs = total tokens x model.flops_per_token (PaLM, arXiv:2204.02311, appendix B:
    6N per token for the matmuls' forward and backward, plus 12 L H Q T for attention).
  - Throughput per device is either given (tokens/s) or follows from an MFU:
    tokens/s = MFU x peak FLOP/s / FLOPs per token; given, the MFU it implies is reported.
    Activation checkpointing recomputes the forward in the backward (8N instead of 6N
    per token): the hardware does a third more work for the same model FLOPs, which
    is why MFU counts model FLOPs only (PaLM appendix B).
  - GPU-hours = total tokens / (tokens/s per device) / 3600; wall time = GPU-hours /
    devices (perfect data-parallel scaling: an upper bound on speed).

TinyLlama (arXiv:2401.02385, section 2): 24,000 tokens/s per A100-40G, 3,456 A100 GPU
hours per 300B tokens, 56% MFU. This file gives 3,472 hours (300e9 / 24,000 / 3,600);
3,456 = 16 GPUs x 24 h x 9 days, what 9.04 days on their 16 GPUs rounds to. MFU: 56.3%.
"""

import math
import os
import re
import time

import torch

import quant
from cli import Parser
from model import PRESETS, ModelConfig, Transformer, block_linear_shapes, count_params, flops_per_token

# dense bf16 tensor-core FLOP/s, memory and memory bandwidth (bytes/s) from the vendors' datasheets
DEVICES = {
    "A100-40G": {"peak_flops": 312e12, "memory": 40 * 2**30, "memory_bandwidth": 1.555e12},
    "A100-80G": {"peak_flops": 312e12, "memory": 80 * 2**30, "memory_bandwidth": 2.039e12},  # SXM
    "H100": {"peak_flops": 989e12, "memory": 80 * 2**30, "memory_bandwidth": 3.35e12},  # SXM
    "H200": {"peak_flops": 989e12, "memory": 141 * 10**9, "memory_bandwidth": 4.8e12},
    "A10G": {"peak_flops": 125e12, "memory": 24 * 2**30, "memory_bandwidth": 600e9},
    "L4": {"peak_flops": 121e12, "memory": 24 * 2**30, "memory_bandwidth": 300e9},
    "RTX 4090": {"peak_flops": 165e12, "memory": 24 * 2**30, "memory_bandwidth": 1.008e12},
    # this machine's processor: fp32 matmul FLOP/s and memory, measured when first asked for (device_entry)
    "CPU": {"peak_flops": None, "memory": None, "memory_bandwidth": None},
}


def device_entry(name):
    """DEVICES[name]; the CPU's entry is measured the first time, as MFU's peak is at the
    start of a run (peak_flops: a fp32 matmul, so on a busy machine it comes out low)."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; one of: {', '.join(DEVICES)}")
    if name == "CPU" and DEVICES["CPU"]["peak_flops"] is None:
        cpu = torch.device("cpu")
        DEVICES["CPU"].update(peak_flops=peak_flops(cpu, torch.float32), memory=device_memory(cpu))
    return DEVICES[name]


# ----------------------------------------------------------------------------- memory
def activation_elements_per_token(config, grad_checkpoint=False):
    """Elements per token kept for the backward pass: every layer's RMSNorm inputs, the
    normed inputs of the projections, q/k/v and the attention output SDPA keeps, SwiGLU's
    four (B, T, intermediate) tensors; the final norm, the logits with their log-softmax
    and the loss's two gradients (5 x V); one layer's gradients in flight (4 x I + 4 x C).
    Checkpointed, a layer keeps its input (C) and one layer's activations exist at a time."""
    C, I, L, V = config.n_embd, config.intermediate_size, config.n_layer, config.vocab_size
    kv = config.n_kv_head * config.head_dim
    layer = 7 * C + 2 * kv + 4 * I
    kept = L * C + layer if grad_checkpoint else L * layer
    return kept + 3 * C + 5 * V + 4 * I + 4 * C


def estimate_memory(config, batch_size, seq_len=None, lora_r=8, weight_bytes=4, base_bytes=2,
                    activation_bytes=4, grad_checkpoint=False, n_shards=1):
    """Bytes of one training step per device for full training, LoRA and QLoRA, and the
    decoding cache. LoRA adapts all seven linear layers of every block (QLoRA section 4)."""
    T = seq_len or config.block_size
    L, kv = config.n_layer, config.n_kv_head * config.head_dim
    n = count_params(config)
    shapes = block_linear_shapes(config)
    n_block_linear = L * sum(o * i for o, i in shapes.values())
    activations = activation_bytes * batch_size * T * activation_elements_per_token(config, grad_checkpoint)
    lora_params = L * sum(lora_r * (o + i) for o, i in shapes.values())
    adapters = {"weights": 4 * lora_params, "gradients": 4 * lora_params, "optimizer": 8 * lora_params}
    nf4 = L * sum(quantized_nbytes(o * i, o, "nf4-dq") for o, i in shapes.values())
    modes = {
        "full": {"weights": weight_bytes * n / n_shards, "gradients": weight_bytes * n / n_shards,
                 "optimizer": 8 * n / n_shards},
        "lora": {"base": base_bytes * n, **adapters},
        "qlora": {"base": nf4 + base_bytes * (n - n_block_linear), **adapters},
    }
    out = {mode: {**parts, "activations": activations, "total": sum(parts.values()) + activations}
           for mode, parts in modes.items()}
    out["kv_cache"] = 2 * L * kv * config.block_size * batch_size * activation_bytes
    out["params"], out["lora_params"] = n, lora_params
    return out


def fit_advice(config, batch_size, seq_len, device_memory, activation_bytes=2, n_devices=1, mode="full",
               grad_checkpoint=False, fsdp=False, lora_r=8, grad_accum=1):
    """None if the step fits device_memory, else one line naming the knobs that make it
    fit, each with its estimate (micro-batch, checkpointing, FSDP, LoRA, QLoRA). A smaller
    micro-batch comes with a larger grad_accum: the same tokens per optimizer step, so the
    recipe (learning rate, schedule) still holds."""
    gib = 2**30
    tokens_per_step = grad_accum * batch_size * seq_len
    one = f"--batch_size 1 --grad_accum {grad_accum * batch_size}"

    def total(b, ckpt, shards=1, m=mode):
        return estimate_memory(config, b, seq_len, lora_r, activation_bytes=activation_bytes, grad_checkpoint=ckpt,
                               n_shards=shards)[m]["total"]
    now = total(batch_size, grad_checkpoint, n_devices if fsdp else 1)
    if now <= device_memory:
        return None
    options = [(one, total(1, grad_checkpoint)), ("--grad_checkpoint true", total(batch_size, True)),
               (f"{one} --grad_checkpoint true", total(1, True))]
    if n_devices > 1:
        options.append(("--dist fsdp --grad_checkpoint true", total(batch_size, True, n_devices)))
    options += [("--peft lora", total(batch_size, grad_checkpoint, m="lora")),
                ("--peft qlora --grad_checkpoint true", total(batch_size, True, m="qlora"))]
    fits = [f"{flag} ({est / gib:.1f} GiB)" for flag, est in options if est <= device_memory]
    keeps = f" (each keeps {tokens_per_step:,} tokens per optimizer step)" if batch_size > 1 else ""
    return (f"the step needs about {now / gib:.1f} GiB but the device has {device_memory / gib:.1f} GiB; "
            + (f"what fits: {', '.join(fits)}{keeps}" if fits else
               "nothing tried fits: use a smaller model or more memory"))


def device_memory(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(cfg, config, device, dtype, world):
    """train.py: stop before training when the estimate exceeds the device's memory, with
    what would fit and how long one optimizer step of the recipe takes on this device at
    best: its FLOPs over the device's peak (measured now on a CPU, as for MFU)."""
    advice = fit_advice(config, cfg.batch_size, config.block_size, device_memory(device),
                        activation_bytes=2 if dtype == torch.bfloat16 else 4, n_devices=world,
                        mode="qlora" if cfg.peft == "qlora" else "lora" if cfg.peft else "full",  # prefix: a frozen base too
                        grad_checkpoint=cfg.grad_checkpoint, fsdp=cfg.dist == "fsdp" and world > 1, lora_r=cfg.lora_r,
                        grad_accum=cfg.grad_accum)
    if not advice:
        return
    peak = peak_flops(device, dtype)
    if peak:
        tokens = cfg.grad_accum * cfg.batch_size * config.block_size
        seconds = tokens * flops_per_token(config, config.block_size) / (peak * world)
        advice += (f"; one optimizer step ({tokens:,} tokens) takes at least {format_seconds(seconds)} on "
                   f"{world} x {device} at its {'measured ' if device.type == 'cpu' else ''}peak of "
                   f"{peak / 1e9:,.0f} GFLOP/s (4/3 of that with --grad_checkpoint true, which recomputes the forward)")
    raise ValueError(f"{advice} (see --estimate_memory)")


def format_seconds(seconds):
    """3.2 h, 14 min, 45 s: the unit that reads best."""
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.1f} s"


def check_epochs(cfg, config, meta):
    """Say so when the schedule reads a dataset many times over: a preset built for a real
    corpus, run on the small default one."""
    tokens = cfg.max_iters * cfg.grad_accum * cfg.batch_size * config.block_size
    epochs = tokens / max(meta["train_tokens"], 1)
    if epochs > 100:
        print(f"note: the schedule reads {tokens:,} tokens, {epochs:,.0f} passes over dataset {cfg.dataset} "
              f"({meta['train_tokens']:,} tokens); for a real run prepare a real corpus: python data/prepare.py "
              f"--corpus PATH --out data/mine, then --dataset data/mine")


def format_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024


def print_memory_estimate(config, batch_size, lora_r=8, bf16=False, grad_checkpoint=False):
    est = estimate_memory(config, batch_size, config.block_size, lora_r, activation_bytes=2 if bf16 else 4,
                          grad_checkpoint=grad_checkpoint)
    print(f"memory estimate for {batch_size} x {config.block_size} tokens per micro-batch "
          f"({est['params']:,} parameters, {'bf16 autocast' if bf16 else 'fp32'} activations"
          f"{', activation checkpointing' if grad_checkpoint else ''}):")
    for mode in ("full", "lora", "qlora"):
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in est[mode].items() if k != "total")
        print(f"  {mode:5s}: {format_bytes(est[mode]['total']):>12s}  ({parts})")
    print(f"  KV cache for decoding {batch_size} sequences at full context: {format_bytes(est['kv_cache'])}")
    return est


# ----------------------------------------------------------------------------- FLOP/s
def device_spec(device):
    """(key, DEVICES entry) of a CUDA device, matched by name ("NVIDIA H200" -> H200; an A100
    by its memory size, 40 or 80 GB); (None, None) for a GPU not in the table."""
    name = torch.cuda.get_device_name(device)
    # the model as a whole word: "L4" must not match "NVIDIA L40S"
    keys = [k for k in DEVICES if k != "CPU"
            and re.search(rf"(?<![A-Za-z0-9]){re.escape(k.split('-')[0])}(?![A-Za-z0-9])", name)]
    if not keys:
        return None, None
    total = torch.cuda.get_device_properties(device).total_memory
    key = min(keys, key=lambda k: abs(DEVICES[k]["memory"] - total))
    return key, DEVICES[key]


def peak_flops(device, dtype):
    """The device's peak FLOP/s, MFU's denominator: a datasheet figure for GPUs (DEVICES,
    matched by name); measured on CPU (fp32 matmul)."""
    if device.type == "cuda":
        _, spec = device_spec(device)
        if spec is None:
            return None  # unknown GPU: MFU not reported
        return spec["peak_flops"] if dtype == torch.bfloat16 else spec["peak_flops"] / 2  # tf32: half
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


# ----------------------------------------------------------------------------- the plan
def plan(model_config, tokens_per_step, steps=None, total_tokens=None, tokens_per_sec=None, mfu=None,
         device="A100-40G", n_devices=1, seq_len=None, micro_batch=1, grad_checkpoint=False, fsdp=False,
         dtype_bytes=2):
    """A dict of the run's figures. Give steps or total_tokens, and tokens_per_sec (per
    device) or mfu (0-1; the throughput then follows from the device's peak)."""
    spec = device_entry(device)
    if (steps is None) == (total_tokens is None):
        raise ValueError("give exactly one of steps and total_tokens")
    if tokens_per_sec is not None and mfu is not None:
        raise ValueError("give tokens_per_sec or mfu, not both")
    T = seq_len or model_config.block_size
    steps = steps if steps is not None else -(-int(total_tokens) // int(tokens_per_step))  # ceil
    total_tokens = steps * tokens_per_step
    fpt = flops_per_token(model_config, T)
    peak = spec["peak_flops"]
    if mfu is not None:
        tokens_per_sec = mfu * peak / fpt
    elif tokens_per_sec is not None:
        mfu = tokens_per_sec * fpt / peak
    mem = estimate_memory(model_config, micro_batch, T, activation_bytes=dtype_bytes, grad_checkpoint=grad_checkpoint,
                          n_shards=n_devices if fsdp else 1)["full"]
    out = {
        "params": count_params(model_config), "seq_len": T, "micro_batch": micro_batch, "device": device,
        "n_devices": n_devices, "grad_checkpoint": grad_checkpoint, "fsdp": fsdp,
        "tokens_per_step": tokens_per_step, "steps": steps, "total_tokens": total_tokens,
        "grad_accum": tokens_per_step / (micro_batch * T * n_devices),
        "flops_per_token": fpt, "total_flops": total_tokens * fpt,
        "hardware_flops_per_token": fpt * 4 / 3 if grad_checkpoint else fpt,  # + one more forward (2N of 6N)
        "memory": mem, "device_memory": spec["memory"], "fits": mem["total"] <= spec["memory"],
        "tokens_per_sec_per_device": tokens_per_sec, "mfu": mfu,
    }
    if tokens_per_sec:
        out["gpu_hours"] = total_tokens / tokens_per_sec / 3600
        out["wall_hours"] = out["gpu_hours"] / n_devices
    return out


def format_plan(p):
    """The plan as a few aligned lines for the terminal."""
    gib = 2**30
    m = p["memory"]
    lines = [
        f"model        {p['params'] / 1e9:.3f}B parameters, {p['flops_per_token'] / 1e9:.2f} GFLOPs per token "
        f"(6N + attention at T = {p['seq_len']:,})",
        f"batch        {p['tokens_per_step']:,} tokens per step = {p['micro_batch']} x {p['seq_len']:,} x "
        f"{p['n_devices']} devices x {p['grad_accum']:g} accumulation steps",
        f"schedule     {p['steps']:,} steps = {p['total_tokens'] / 1e9:,.2f}B tokens, "
        f"{p['total_flops']:.3e} FLOPs",
        f"memory       {m['total'] / gib:.2f} GiB per device of {p['device_memory'] / gib:.0f} GiB ({p['device']}): "
        f"weights {m['weights'] / gib:.2f}, gradients {m['gradients'] / gib:.2f}, AdamW {m['optimizer'] / gib:.2f}, "
        f"activations {m['activations'] / gib:.2f}"
        + (" (checkpointed)" if p["grad_checkpoint"] else "") + (" (FSDP-sharded states)" if p["fsdp"] else "")
        + ("" if p["fits"] else "  -> DOES NOT FIT"),
    ]
    if p.get("gpu_hours") is not None:
        digits = 2 if p["device"] == "CPU" else 0  # a CPU's peak is a few hundredths of a TFLOP/s
        lines.append(f"throughput   {p['tokens_per_sec_per_device']:,.0f} tokens/s per {p['device']} = "
                     f"{100 * p['mfu']:.1f}% MFU (peak {DEVICES[p['device']]['peak_flops'] / 1e12:.{digits}f} "
                     f"TFLOP/s {'fp32, measured now' if p['device'] == 'CPU' else 'bf16'})")
        lines.append(f"time         {p['gpu_hours']:,.0f} {p['device']}-hours = {p['wall_hours']:,.1f} h "
                     f"({p['wall_hours'] / 24:,.2f} days) on {p['n_devices']} devices")
        if p["grad_checkpoint"]:
            lines.append("note         checkpointing recomputes each block's forward: at the same hardware "
                         "utilization expect about 3/4 of the tokens/s measured without it")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the storage report
# ----------------------------------------------------------------------------- the quantized storage report
def quantized_nbytes(numel, out_features, method, blocksize=64):
    """Bytes one block linear weight takes when stored with `method` (exact, from its shape)."""
    if method in ("nf4", "nf4-dq"):
        return quant.nf4_nbytes(numel, blocksize, method == "nf4-dq")
    if method == "int8":
        return numel + 4 * out_features  # int8 values + one fp32 absmax per output row
    if method == "b1.58":
        return math.ceil(numel / 4) + 4  # 2-bit ternary codes + one fp32 beta
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(quant.METHODS + ('b1.58',))}")


def quant_report(model, method="nf4-dq", keep_dtype=torch.bfloat16, blocksize=64):
    """Bytes of every tensor of a Transformer before (fp32, bf16) and after quantizing the
    blocks' linear layers with `method`; the rest kept in keep_dtype (QLoRA keeps bf16).

    Build the model on the meta device (`with torch.device("meta")`): shapes are all it
    reads, so tinyllama_1b costs no memory.
    Returns (rows, totals), each row a dict: name, shape, numel, fp32, bf16, after, method.
    """
    keep_size = torch.empty((), dtype=keep_dtype).element_size()
    rows = []
    for name, p in model.named_parameters():
        quantized = name.startswith("layers.") and p.dim() == 2
        after = quantized_nbytes(p.numel(), p.shape[0], method, blocksize) if quantized else p.numel() * keep_size
        rows.append(dict(name=name, shape=tuple(p.shape), numel=p.numel(), fp32=4 * p.numel(), bf16=2 * p.numel(),
                         after=after, method=method if quantized else "keep"))
    totals = {key: sum(r[key] for r in rows) for key in ("numel", "fp32", "bf16", "after")}
    return rows, totals


def print_report(model, method="nf4-dq", name=""):
    rows, totals = quant_report(model, method)
    print(f"{name or 'model'}: blocks' linear layers in {method}, everything else in bf16")
    print(f"{'tensor':<40} {'shape':>14} {'fp32 bytes':>14} {'bf16 bytes':>14} {'after':>14} {'bits/param':>10}")
    for r in rows + [dict(name="total", shape="", **totals)]:
        shape = "x".join(map(str, r["shape"])) if r["shape"] else ""
        print(f"{r['name']:<40} {shape:>14} {r['fp32']:>14,} {r['bf16']:>14,} {r['after']:>14,} "
              f"{8 * r['after'] / r['numel']:>10.3f}")
    quantized = [r for r in rows if r["method"] != "keep"]
    linear_numel = sum(r["numel"] for r in quantized)
    linear_bytes = sum(r["after"] for r in quantized)
    print(f"\nblock linears: {linear_numel:,} params: fp32 {4 * linear_numel:,} B, bf16 {2 * linear_numel:,} B, "
          f"{method} {linear_bytes:,} B = {8 * linear_bytes / linear_numel:.4f} bits/param")
    print(f"whole model: fp32 {totals['fp32'] / 2**30:.3f} GiB | bf16 {totals['bf16'] / 2**30:.3f} GiB | "
          f"{method} {totals['after'] / 2**30:.3f} GiB ({totals['after']:,} bytes)")
    return rows, totals


def argument_parser():
    p = Parser("Bytes of every tensor of a preset, before and after quantizing its blocks' linear layers "
               "(quant.py), from shapes alone.")
    p.add_argument("--config", default="tinyllama_1b", choices=list(PRESETS), help="a model.py preset")
    p.add_argument("--quant", default="nf4-dq", choices=list(quant.METHODS) + ["b1.58"], help="quant.py's method")
    return p


def main(argv=None):
    from runs import exit_with_error  # (runs imports this module)
    try:
        args = argument_parser().parse_args(argv)
    except ValueError as e:
        exit_with_error(e)
    with torch.device("meta"):  # shapes only: no memory for the weights
        model = Transformer(ModelConfig.from_name(args.config))
    print_report(model, args.quant, args.config)


if __name__ == "__main__":
    main()
