"""Will it fit, and how fast can it go? Memory and peak FLOP/s, from shapes and datasheets.

`estimate_memory` is the one memory estimator: train.py --estimate_memory, the
fine-tuning experiment and bench.py (which checks it against the measured peak) use it.
Every byte width is an argument, so its assumptions are on the page:

    full  : weights + gradients (weight_bytes each) + AdamW's two fp32 moments (8 B)
    lora  : a frozen base in base_bytes, fp32 adapters with fp32 gradients and moments
    qlora : the blocks' linears in NF4 + double quantization (quant.quantized_nbytes,
            QLoRA arXiv:2305.14314 section 3), the rest of the base in base_bytes
    + the activations autograd keeps for the backward pass (activation_bytes each).

`peak_flops` gives the denominator of MFU (PaLM arXiv:2204.02311 appendix B): a datasheet
figure for GPUs, a measured fp32 matmul rate on CPU.
"""

import argparse
import os
import time

import torch

import quant
from model import PRESETS, ModelConfig, Transformer, block_linear_shapes, count_params

# dense bf16 tensor-core FLOP/s, from the vendors' datasheets
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12}


def estimate_memory(config, batch_size, seq_len=None, lora_r=8, weight_bytes=4, base_bytes=2,
                    activation_bytes=4, grad_checkpoint=False):
    """Bytes of one training step for full fine-tuning, LoRA and QLoRA, and the decoding cache.

    Activations are counted per token and layer from the forward: the RMSNorm inputs, the
    normed inputs of the projections, q/k/v and the attention output that SDPA keeps,
    SwiGLU's four (B, T, intermediate) tensors; plus the logits with their log-softmax and
    the two gradients of the loss, and one layer's gradients in flight. With
    grad_checkpoint, each block keeps only its input (C per token) and one block's
    activations exist at a time, recomputed in the backward pass. LoRA adapts all seven
    linear layers of every block (QLoRA section 4's setting).
    """
    T = seq_len or config.block_size
    C, I, L, V = config.n_embd, config.intermediate_size, config.n_layer, config.vocab_size
    kv = config.n_kv_head * config.head_dim
    n = count_params(config)
    shapes = block_linear_shapes(config)
    n_block_linear = L * sum(o * i for o, i in shapes.values())
    block = 7 * C + 2 * kv + 4 * I  # what one block keeps per token for its backward
    per_token = (L * C + block if grad_checkpoint else L * block) + 3 * C + 5 * V + 4 * I + 4 * C
    activations = activation_bytes * batch_size * T * per_token
    lora_params = L * sum(lora_r * (o + i) for o, i in shapes.values())
    adapters = {"weights": 4 * lora_params, "gradients": 4 * lora_params, "optimizer": 8 * lora_params}
    nf4 = L * sum(quant.quantized_nbytes(o * i, o, "nf4-dq") for o, i in shapes.values())
    modes = {
        "full": {"weights": weight_bytes * n, "gradients": weight_bytes * n, "optimizer": 8 * n},
        "lora": {"base": base_bytes * n, **adapters},
        "qlora": {"base": nf4 + base_bytes * (n - n_block_linear), **adapters},
    }
    out = {mode: {**parts, "activations": activations, "total": sum(parts.values()) + activations}
           for mode, parts in modes.items()}
    out["kv_cache"] = 2 * L * kv * config.block_size * batch_size * activation_bytes
    out["params"], out["lora_params"] = n, lora_params
    return out


def device_memory(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(cfg, config, device, dtype, world):
    """Stop before training when the memory estimate (plan.py) exceeds the device's memory,
    naming the knobs that make it fit."""
    def need(**kw):
        args = dict(batch_size=cfg.batch_size, grad_checkpoint=cfg.grad_checkpoint) | kw
        est = estimate_memory(config, args["batch_size"], config.block_size, cfg.lora_r,
                              activation_bytes=2 if dtype == torch.bfloat16 else 4,
                              grad_checkpoint=args["grad_checkpoint"])[kw.get("mode", cfg.peft or "full")]
        sharded = est["total"] - est["activations"] if cfg.dist == "fsdp" and world > 1 else 0
        return est["total"] - sharded + sharded / world
    have = device_memory(device)
    if need() <= have:
        return
    options = [f"--batch_size 1 ({format_bytes(need(batch_size=1))})" if cfg.batch_size > 1 else None,
               f"--grad_checkpoint true ({format_bytes(need(grad_checkpoint=True))})" if not cfg.grad_checkpoint
               else None,
               f"both ({format_bytes(need(batch_size=1, grad_checkpoint=True))})"
               if cfg.batch_size > 1 and not cfg.grad_checkpoint else None,
               f"--peft qlora ({format_bytes(need(mode='qlora'))})" if cfg.peft != "qlora" else None]
    raise ValueError(f"one training step needs about {format_bytes(need())} ({cfg.batch_size} x {config.block_size} "
                     f"tokens, {cfg.peft or 'full'} training) but {device} has {format_bytes(have)}; make it fit "
                     f"with " + ", ".join(o for o in options if o) + " (see --estimate_memory)")


def check_epochs(cfg, config, meta):
    """Say so when the schedule reads a dataset many times over: a preset built for a real
    corpus, run on the small default one."""
    tokens = (cfg.max_iters - 0) * cfg.grad_accum * cfg.batch_size * config.block_size
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


def main(argv=None):
    p = argparse.ArgumentParser(description="Bytes of every tensor of a preset, before and after quantizing "
                                "its blocks' linear layers (quant.py), from shapes alone.")
    p.add_argument("--config", default="tinyllama_1b", choices=list(PRESETS))
    p.add_argument("--quant", default="nf4-dq", choices=list(quant.METHODS) + ["b1.58"])
    args = p.parse_args(argv)
    with torch.device("meta"):  # shapes only: no memory for the weights
        model = Transformer(ModelConfig.from_name(args.config))
    quant.print_report(model, args.quant, args.config)


if __name__ == "__main__":
    main()
