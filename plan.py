"""Plan a training run before renting the GPUs: tokens, steps, FLOPs, memory per device,
wall time and GPU-hours.

    from plan import plan, format_plan
    p = plan(ModelConfig.from_name("tinyllama_1b"), tokens_per_step=2**21, total_tokens=300e9,
             tokens_per_sec=24_000, device="A100-40G", n_devices=16, seq_len=2048, micro_batch=8)
    print(format_plan(p))

The arithmetic:
  - FLOPs = total tokens x model.flops_per_token (PaLM, arXiv:2204.02311, appendix B:
    6N per token for the matmuls' forward and backward, plus 12 L H Q T for attention).
  - Throughput per device is either given (tokens/s) or follows from an MFU:
    tokens/s = MFU x peak FLOP/s / FLOPs per token; given, the MFU it implies is reported.
    Activation checkpointing recomputes the forward in the backward (8N instead of 6N
    per token): the hardware does a third more work for the same model FLOPs, which
    is why MFU counts model FLOPs only (PaLM appendix B).
  - GPU-hours = total tokens / (tokens/s per device) / 3600; wall time = GPU-hours /
    devices (perfect data-parallel scaling: an upper bound on speed).
  - Memory per device, `estimate_memory`: fp32 weights, gradients and AdamW's two
    moments (16 bytes per parameter; FSDP / ZeRO-3 shards them over the devices), plus
    the activations autograd keeps for the backward pass. With activation checkpointing
    (Chen et al. 2016, arXiv:1604.06174; LLaMA, arXiv:2302.13971, section 2.4) a block
    keeps only its input (B, T, C) and one block's activations are rebuilt at a time.

TinyLlama (arXiv:2401.02385, section 2): 24,000 tokens/s per A100-40G, 3,456 A100 GPU
hours per 300B tokens, 56% MFU. This file gives 3,472 hours (300e9 / 24,000 / 3,600);
3,456 = 16 GPUs x 24 h x 9 days, what 9.04 days on their 16 GPUs rounds to. MFU: 56.3%.
"""

from model import count_params, flops_per_token

# dense bf16 tensor-core FLOP/s and memory from the vendors' datasheets
DEVICES = {
    "A100-40G": {"peak_flops": 312e12, "memory": 40 * 2**30},
    "A100-80G": {"peak_flops": 312e12, "memory": 80 * 2**30},
    "H100": {"peak_flops": 989e12, "memory": 80 * 2**30},  # SXM
    "H200": {"peak_flops": 989e12, "memory": 141 * 10**9},
    "A10G": {"peak_flops": 125e12, "memory": 24 * 2**30},
    "L4": {"peak_flops": 121e12, "memory": 24 * 2**30},
    "RTX 4090": {"peak_flops": 165e12, "memory": 24 * 2**30},
}


# ----------------------------------------------------------------------------- memory
def activation_elements_per_token(config, grad_checkpoint=False):
    """Elements per token kept for the backward pass (as train.py's estimate counts them):
    every layer's RMSNorm inputs, the normed inputs of the projections, q/k/v and the
    attention output SDPA keeps, SwiGLU's four (B, T, intermediate) tensors; the final
    norm, the logits with their log-softmax and the loss's two gradients (5 x V); one
    layer's gradients in flight (4 x I + 4 x C). Checkpointed, a layer keeps its input
    (C) and one layer's activations exist at a time, while it is recomputed."""
    C, I, L, V = config.n_embd, config.intermediate_size, config.n_layer, config.vocab_size
    kv = config.n_kv_head * config.head_dim
    layer = 7 * C + 2 * kv + 4 * I
    kept = L * C + layer if grad_checkpoint else L * layer
    return kept + 3 * C + 5 * V + 4 * I + 4 * C


def estimate_memory(config, batch_size, seq_len=None, lora_r=8, dtype_bytes=4, grad_checkpoint=False,
                    n_shards=1):
    """Bytes of one training step per device for full training, LoRA and QLoRA.

    train.estimate_memory's accounting (the same numbers with grad_checkpoint=False and
    n_shards=1), plus activation checkpointing and FSDP: n_shards devices share the
    weights, gradients and optimizer state (activations are per device)."""
    T = seq_len or config.block_size
    C, I, L = config.n_embd, config.intermediate_size, config.n_layer
    kv = config.n_kv_head * config.head_dim
    n = count_params(config)
    n_block_linear = L * (C * config.n_head * config.head_dim * 2 + 2 * C * kv + 3 * C * I)
    activations = dtype_bytes * batch_size * T * activation_elements_per_token(config, grad_checkpoint)
    lora_params = L * r_adapters(config, lora_r)
    adapters = {"weights": 4 * lora_params, "gradients": 4 * lora_params, "optimizer": 8 * lora_params}
    modes = {
        "full": {"weights": 4 * n / n_shards, "gradients": 4 * n / n_shards, "optimizer": 8 * n / n_shards},
        "lora": {"base": 2 * n, **adapters},
        "qlora": {"base": n_block_linear * 4.127 / 8 + 2 * (n - n_block_linear), **adapters},  # NF4 + DQ
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


# ----------------------------------------------------------------------------- the plan
def plan(model_config, tokens_per_step, steps=None, total_tokens=None, tokens_per_sec=None, mfu=None,
         device="A100-40G", n_devices=1, seq_len=None, micro_batch=1, grad_checkpoint=False, fsdp=False,
         dtype_bytes=2):
    """A dict of the run's figures. Give steps or total_tokens, and tokens_per_sec (per
    device) or mfu (0-1; the throughput then follows from the device's peak)."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; one of: {', '.join(DEVICES)}")
    if (steps is None) == (total_tokens is None):
        raise ValueError("give exactly one of steps and total_tokens")
    if tokens_per_sec is not None and mfu is not None:
        raise ValueError("give tokens_per_sec or mfu, not both")
    T = seq_len or model_config.block_size
    steps = steps if steps is not None else -(-int(total_tokens) // int(tokens_per_step))  # ceil
    total_tokens = steps * tokens_per_step
    fpt = flops_per_token(model_config, T)
    peak = DEVICES[device]["peak_flops"]
    if mfu is not None:
        tokens_per_sec = mfu * peak / fpt
    elif tokens_per_sec is not None:
        mfu = tokens_per_sec * fpt / peak
    mem = estimate_memory(model_config, micro_batch, T, dtype_bytes=dtype_bytes, grad_checkpoint=grad_checkpoint,
                          n_shards=n_devices if fsdp else 1)["full"]
    out = {
        "params": count_params(model_config), "seq_len": T, "micro_batch": micro_batch, "device": device,
        "n_devices": n_devices, "grad_checkpoint": grad_checkpoint, "fsdp": fsdp,
        "tokens_per_step": tokens_per_step, "steps": steps, "total_tokens": total_tokens,
        "grad_accum": tokens_per_step / (micro_batch * T * n_devices),
        "flops_per_token": fpt, "total_flops": total_tokens * fpt,
        "hardware_flops_per_token": fpt * 4 / 3 if grad_checkpoint else fpt,  # + one more forward (2N of 6N)
        "memory": mem, "device_memory": DEVICES[device]["memory"], "fits": mem["total"] <= DEVICES[device]["memory"],
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
        lines.append(f"throughput   {p['tokens_per_sec_per_device']:,.0f} tokens/s per {p['device']} = "
                     f"{100 * p['mfu']:.1f}% MFU (peak {DEVICES[p['device']]['peak_flops'] / 1e12:.0f} TFLOP/s bf16)")
        lines.append(f"time         {p['gpu_hours']:,.0f} {p['device']}-hours = {p['wall_hours']:,.1f} h "
                     f"({p['wall_hours'] / 24:,.2f} days) on {p['n_devices']} devices")
        if p["grad_checkpoint"]:
            lines.append("note         checkpointing recomputes each block's forward: at the same hardware "
                         "utilization expect about 3/4 of the tokens/s measured without it")
    return "\n".join(lines)


def fit_advice(config, batch_size, seq_len, device_memory, dtype_bytes=2, n_devices=1):
    """None if full training fits device_memory, else one line naming the knobs that make
    it fit, each with its estimate (micro-batch, checkpointing, FSDP, LoRA, QLoRA)."""
    gib = 2**30

    def total(b, ckpt, shards=1, mode="full"):
        return estimate_memory(config, b, seq_len, dtype_bytes=dtype_bytes, grad_checkpoint=ckpt,
                               n_shards=shards)[mode]["total"]
    now = total(batch_size, False)
    if now <= device_memory:
        return None
    options = [("--batch_size 1", total(1, False)), ("--grad_checkpoint true", total(batch_size, True)),
               ("--batch_size 1 --grad_checkpoint true", total(1, True))]
    if n_devices > 1:
        options.append(("--dist fsdp --grad_checkpoint true", total(batch_size, True, n_devices)))
    options += [("--peft lora", total(batch_size, False, mode="lora")),
                ("--peft qlora --grad_checkpoint true", total(batch_size, True, mode="qlora"))]
    fits = [f"{flag} ({est / gib:.1f} GiB)" for flag, est in options if est <= device_memory]
    return (f"the step needs about {now / gib:.1f} GiB but the device has {device_memory / gib:.1f} GiB; "
            + (f"what fits: {', '.join(fits)}" if fits else "nothing tried fits: use a smaller model or more memory"))
