r"""Parameter-efficient fine-tuning: LoRA, prefix-tuning and QLoRA's paged AdamW.

Papers:
  - LoRA (Hu et al., arXiv:2106.09685) section 4.1: h = W0 x + (alpha / r) B A x.
  - Prefix-tuning (Li & Liang, arXiv:2101.00190) section 4.2-4.3: trainable keys and
    values at every layer, reparametrized through an MLP during training only.
  - QLoRA (Dettmers et al., arXiv:2305.14314) section 3: NF4 base (quant.py) + LoRA on
    every linear layer + paged optimizers.

LoRA around any linear layer `base` (nn.Linear, quant.NF4Linear, quant.BitLinear):

         x ──────────────┬──────────────┐
                         │              │
                  base (frozen W0)   A (r x in) ─> B (out x r) ─> * alpha/r
                         │              │
         h = ────────────+──────────────┘          B = 0 at the start: h = W0 x

Note: this file shadows Hugging Face's `peft` package inside this repository; the tests
import theirs around it (tests/test_peft.py).
"""

import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import save_tensors, write_json

# short target names -> module names inside a Block (model.py's wq wk wv wo, w1 w2 w3)
TARGETS = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
           "gate": "feed_forward.w1", "up": "feed_forward.w3", "down": "feed_forward.w2"}


# ----------------------------------------------------------------------------- LoRA
class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * B(A(dropout(x))), the base frozen (LoRA eq. 3)."""

    def __init__(self, base, r=8, alpha=16, dropout=0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        self.base = base
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scaling = alpha / r
        w = next(iter([*base.parameters(), *base.buffers()]))  # for the device (NF4Linear has only buffers)
        # A and B stay fp32 whatever the base stores (NF4, int8, bf16): their updates are small and
        # would round away in 16 bits (HF PEFT does the same); forward adds B A x in the base's dtype
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device))
        # The paper draws A from a Gaussian; loralib and HF PEFT use nn.Linear's Kaiming-uniform,
        # as we do. Either way B = 0, so training starts from exactly the base model.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False
        self._w0 = None  # a 16-bit base's weight before merging, for an exact unmerge
        self._quantized_base = ()  # (the quantized base before merging,): a tuple keeps it out of state_dict

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def delta_weight(self):
        """(alpha / r) B A: the (out, in) update that merging adds to W0."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x):  # (..., in) -> (..., out)
        h = self.base(x)
        if self.merged:
            return h
        x = F.dropout(x.to(self.lora_A.dtype), self.dropout, self.training)
        return h + (x @ self.lora_A.T @ self.lora_B.T * self.scaling).to(h.dtype)  # (..., r) on the way

    @torch.no_grad()
    def merge(self):
        """W = W0 + (alpha / r) B A: one matrix again, so no extra latency (section 4.1).

        A plain fp32 nn.Linear merges in place (unmerge subtracts; equal to ~1e-7). In bf16
        or fp16 the sum is rounded, so W0 is kept to make unmerge exact. A quantized base
        cannot hold W0 + BA exactly: it is dequantized, updated and quantized again, which
        changes the outputs (a warning says so; experiments/finetune.py measures by how
        much), and the original base is kept so that unmerge restores it exactly.
        """
        if self.merged:
            return
        if type(self.base) is nn.Linear:
            if self.base.weight.dtype != torch.float32:
                self._w0 = self.base.weight.detach().clone()
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        else:  # a quantized layer: a new one holding the merged weight (quant.py's with_weight)
            self._quantized_base = (self.base,)
            self.base = self.base.with_weight(self.base.dequantize().float() + self.delta_weight().float())
            warnings.warn(f"merging LoRA into a {type(self._quantized_base[0]).__name__} base re-quantizes its weight, "
                          f"which changes the outputs; keep the adapter unmerged for exact outputs", stacklevel=3)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        if self._w0 is not None:
            self.base.weight.copy_(self._w0)
            self._w0 = None
        elif self._quantized_base:
            self.base, self._quantized_base = self._quantized_base[0], ()
        else:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False


def parse_targets(targets):
    """("q", "v") or "q,v" or "all" -> module names inside a Block, with a clear error."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if "all" in targets:
        return list(TARGETS.values())
    unknown = [t for t in targets if t not in TARGETS]
    twice = sorted({t for t in targets if targets.count(t) > 1})
    if twice:
        raise ValueError(f"LoRA targets {twice} are named more than once (LoRA would wrap LoRA); name each once")
    if unknown or not targets:
        raise ValueError(f"unknown LoRA targets {unknown or targets}; valid names: {', '.join(TARGETS)} "
                         f"or 'all' (q k v o = attention wq wk wv wo; gate up down = feed_forward w1 w3 w2)")
    return [TARGETS[t] for t in targets]


def freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)


def apply_lora(model, r=8, alpha=16, targets=("q", "v"), dropout=0.0):
    """Freeze the model and wrap the targeted linear layers of every Block with LoRA. Returns model."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; apply_lora once (or merge and reload)")
    names = parse_targets(targets)
    freeze(model)
    for layer in model.layers:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name)
            setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    model.peft_config = {"peft": "lora", "r": r, "alpha": alpha, "dropout": dropout,
                         "targets": [k for k, v in TARGETS.items() if v in names]}
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model):
    for m in lora_layers(model):
        m.merge()
    return model


def unmerge_lora(model):
    for m in lora_layers(model):
        m.unmerge()
    return model


def count_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- prefix-tuning
class PrefixMLP(nn.Module):
    """P_theta = MLP(P'_theta) (Li & Liang section 4.3): a (P, n_embd) prefix embedding P'
    -> Linear -> tanh -> Linear -> keys and values of every layer, n_kv_head heads each
    (so it composes with GQA and MQA). Used in training only; fold_prefix drops it."""

    def __init__(self, config, prefix_len, hidden):
        super().__init__()
        self.config, self.prefix_len = config, prefix_len
        self.embedding = nn.Parameter(torch.randn(prefix_len, config.n_embd) * 0.02)  # P'
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, hidden), nn.Tanh(),
                                 nn.Linear(hidden, config.n_layer * 2 * config.n_kv_head * config.head_dim))

    def forward(self):
        c = self.config
        kv = self.mlp(self.embedding)  # (P, n_layer * 2 * n_kv_head * hd)
        return kv.view(self.prefix_len, c.n_layer, 2, c.n_kv_head, c.head_dim).permute(1, 2, 3, 0, 4)


class PrefixKV(nn.Module):
    """The folded prefix: plain tensors (n_layer, 2, n_kv_head, P, hd), what gets saved."""

    def __init__(self, kv):
        super().__init__()
        self.prefix_len = kv.shape[3]
        self.kv = nn.Parameter(kv)

    def forward(self):
        return self.kv  # (n_layer, 2, n_kv_head, P, hd)


class LayerPrefix:
    """The attention hook of layer i: B -> (k, v), each (B, n_kv_head, P, hd).
    A plain object, not a Module, so the shared encoder is registered once (on the model)."""

    def __init__(self, encoder, layer):
        self.encoder, self.layer = encoder, layer
        self.prefix_len = encoder.prefix_len

    def __call__(self, B):
        k, v = self.encoder()[self.layer]  # (n_kv_head, P, hd) each
        # prefixes carry no RoPE: they are free vectors, not tokens at a position, so real tokens keep 0, 1, ...
        return k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)


def attach_prefix(model, encoder):
    model.prefix_encoder = encoder
    for i, layer in enumerate(model.layers):
        layer.attention.prefix = LayerPrefix(encoder, i)


def apply_prefix(model, prefix_len=10, reparam_hidden=512):
    """Freeze the model and give every layer prefix_len trainable keys/values (through the MLP)."""
    if prefix_len < 1 or reparam_hidden < 1:
        raise ValueError(f"prefix_len and reparam_hidden must be >= 1, got {prefix_len}, {reparam_hidden}")
    if getattr(model, "prefix_encoder", None) is not None:
        raise ValueError("the model already has a prefix; apply_prefix once")
    freeze(model)
    w = model.tok_embeddings.weight
    attach_prefix(model, PrefixMLP(model.config, prefix_len, reparam_hidden).to(w.device, w.dtype))
    model.peft_config = {"peft": "prefix", "prefix_len": prefix_len, "reparam_hidden": reparam_hidden}
    return model


@torch.no_grad()
def fold_prefix(model):
    """Replace the MLP by the prefix it computes (the paper keeps only P_theta). Returns model."""
    encoder = getattr(model, "prefix_encoder", None)
    if encoder is None:
        raise ValueError("the model has no prefix; call apply_prefix first")
    if isinstance(encoder, PrefixMLP):
        attach_prefix(model, PrefixKV(encoder().detach().clone()))
        model.peft_config = {**model.peft_config, "reparam_hidden": 0}
    return model


def save_prefix(model, path):
    """The folded prefix as prefix.safetensors + adapter_config.json (our layout; HF PEFT's
    prefix-tuning stores a different, model-specific shape). The model itself is not folded."""
    encoder = getattr(model, "prefix_encoder", None)
    if encoder is None:
        raise ValueError("the model has no prefix to save; call apply_prefix first")
    with torch.no_grad():
        kv = encoder()  # (n_layer, 2, n_kv_head, P, hd)
    save_tensors({"prefix_kv": kv}, os.path.join(path, "prefix.safetensors"))
    write_json({"peft_type": "PREFIX_KV", "prefix_len": encoder.prefix_len}, os.path.join(path, "adapter_config.json"))


# ----------------------------------------------------------------------------- paged AdamW
class PagedAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter, algorithm 2) whose moments live in host memory.

    QLoRA's paged optimizers (section 3) let the GPU evict optimizer state to the CPU.
    Here, in plain PyTorch: exp_avg and exp_avg_sq stay on the host (pinned when a GPU is
    used) and at step time are paged to the parameter's device `page_numel` elements at a
    time, updated there and copied back. On CPU the moves are no-ops: plain AdamW.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, page_numel=1 << 20):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.page_numel = page_numel

    def host_state(self, p):
        state = self.state[p]
        if not state:  # laid out like p (row- or column-major), so the pages line up element for element
            pin = p.device.type == "cuda"
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.empty_like(p, device="cpu", pin_memory=pin).zero_()
            state["exp_avg_sq"] = torch.empty_like(p, device="cpu", pin_memory=pin).zero_()
        for key in ("exp_avg", "exp_avg_sq"):  # load_state_dict puts state on the param's device
            if state[key].device.type != "cpu":
                state[key] = state[key].cpu()
        state["step"] = state["step"].cpu()
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        on_cuda = False
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.host_state(p)
                state["step"] += 1
                t = state["step"].item()
                bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
                p.mul_(1 - lr * wd)  # decoupled weight decay
                grad = p.grad.contiguous()
                on_cuda |= p.device.type == "cuda"
                pages = zip(*(t.view(-1).split(self.page_numel)
                              for t in (p, grad, state["exp_avg"], state["exp_avg_sq"])))
                for w, g, m_host, v_host in pages:
                    m, v = m_host.to(p.device, non_blocking=True), v_host.to(p.device, non_blocking=True)  # page in
                    m.lerp_(g, 1 - beta1)  # m = beta1 m + (1 - beta1) g
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v = beta2 v + (1 - beta2) g^2
                    denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
                    w.addcdiv_(m, denom, value=-lr / bias1)
                    if m.data_ptr() != m_host.data_ptr():  # page out
                        m_host.copy_(m, non_blocking=True)
                        v_host.copy_(v, non_blocking=True)
        if on_cuda:  # the non-blocking copies to the host must land before anyone reads them
            torch.cuda.synchronize()
        return loss

