"""Training on several processes under torchrun: DDP replicates the model and averages
gradients (PyTorch DDP, arXiv:2006.15704); FSDP shards parameters, gradients and optimizer
state across processes (ZeRO stage 3, arXiv:1910.02054; PyTorch FSDP, arXiv:2304.11277).

    torchrun --nproc_per_node 2 train.py --config demo --dist ddp   # or --dist fsdp

Every process draws the same global batch and takes its own micro-batches of it, so one
process with grad_accum micro-batches and grad_accum processes with one each take the
same optimizer step (tests/test_train.py). Checkpoints hold full, unsharded state dicts:
a checkpoint moves between one process, DDP and FSDP.
"""

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from runs import resolve_device


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


def split_grad_accum(cfg, world, master):
    """Micro-batches per process. Fewer micro-batches than processes are raised to one per
    process (the batch grows to world * batch_size sequences, said once); a count that does
    not split evenly is refused with the count that does."""
    if cfg.grad_accum < world:
        if master:
            print(f"note: grad_accum raised from {cfg.grad_accum} to {world}, one micro-batch per process: "
                  f"{world} x {cfg.batch_size} sequences per step")
        cfg.grad_accum = world
    if cfg.grad_accum % world:
        up = -(-cfg.grad_accum // world) * world
        raise ValueError(f"grad_accum={cfg.grad_accum} does not split over {world} processes; "
                         f"use --grad_accum {up} (or {up - world})")
    return cfg.grad_accum // world


def compiles(cfg, device, world=1):
    """--compile auto: on for one GPU without --grad_checkpoint, the setting where
    torch.compile made the training step 1.2-1.6x faster (bench.py --device cuda on an
    H200: demo, 370M, tinyllama_1b); off on a CPU, where it gains 1-8% and compiling takes
    about as long as that saves over a demo run; off with several processes or activation
    checkpointing, which were not measured (--compile true turns it on there)."""
    measured = device.type == "cuda" and world == 1 and not cfg.grad_checkpoint
    return cfg.compile == "true" or (cfg.compile == "auto" and measured)


def wrap_model(model, cfg, world, device):
    """DDP replicates the model and averages gradients; FSDP shards parameters, gradients
    and optimizer state across processes (one shard group per Block)."""
    if world > 1 and cfg.dist == "fsdp":
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    wrapped = torch.compile(model) if compiles(cfg, device, world) else model
    if world > 1 and cfg.dist == "ddp":
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
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_state_dicts(model, optimizer, model_sd, optim_sd):
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))


def gather(tensor, world):
    out = [None] * world
    dist.all_gather_object(out, tensor)
    return out
