r"""Quantization: NF4 with double quantization (QLoRA), int8 absmax, and BitNet's BitLinear.

Papers:
  - QLoRA (Dettmers et al., arXiv:2305.14314) section 3: 4-bit NormalFloat (NF4),
    blockwise absmax quantization, double quantization of the block constants.
  - LLM.int8() (Dettmers et al., arXiv:2208.07339) section 3.1: absmax int8 per row.
  - BitNet (Wang et al., arXiv:2310.11453) section 2: BitLinear, 1-bit weights, 8-bit
    activations, SubLN, group quantization, straight-through estimator.
  - BitNet b1.58 (Ma et al., arXiv:2402.17764) section 2: ternary absmean weights.

NF4 + double quantization memory layout for a weight of n parameters, blocksize 64:

    w (n floats)   |b0 ............ b63|b64 .......... b127| ...  n/64 blocks
    codes (uint8)  |c0 c1|c2 c3| ...     two 4-bit codes per byte, first in the high nibble
    absmax (fp32)  |m0|m1|m2| ...        one per block: 32/64 = 0.5 bits/param
       double quantization: m - mean(m), in blocks of 256, absmax int8
    qabsmax (int8) |q0|q1|q2| ...        8/64 = 0.125 bits/param
    absmax2 (fp32) |s0|  (per 256 blocks) 32/(64*256) = 0.002 bits/param, + one fp32 offset

    w ~= NF4[c] * m,   m ~= q * s / 127 + offset      (4.5 -> ~4.127 bits/param)

`python plan.py --config tinyllama_1b --quant nf4-dq` prints every tensor's bytes
before and after, computed from shapes on the meta device (no weights allocated).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- NF4 levels
def nf4_levels():
    """The 16 NF4 levels (QLoRA section 3, "4-bit NormalFloat"), derived from N(0, 1).

    q_i = Phi^-1 at evenly spaced probabilities, separately for the two halves so that 0
    is exactly representable: 8 levels for x > 0, 7 for x < 0, plus 0. The outermost
    probability is 1 - delta, delta = (1/(2*15) + 1/(2*16)) / 2, since Phi^-1(1) is
    infinite; then everything is divided by the largest level to land in [-1, 1].
    """
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    delta = 0.5 * (1 / 30 + 1 / 32)
    positive = normal.icdf(torch.linspace(1 - delta, 0.5, 9, dtype=torch.float64)[:-1])  # 8 levels > 0
    negative = -normal.icdf(torch.linspace(1 - delta, 0.5, 8, dtype=torch.float64)[:-1])  # 7 levels < 0
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.max()).float()  # (16,), from -1 to 1


NF4_LEVELS = nf4_levels().tolist()
INT4_LEVELS = [i / 7 for i in range(-7, 8)]  # plain symmetric absmax int4: 15 uniform levels
# 4-bit float E2M1 (1 sign, 2 exponent, 1 mantissa bits): 0, 0.5, 1, 1.5, 2, 3, 4, 6, normalized by 6
FP4_LEVELS = sorted({s * v / 6 for s in (-1, 1) for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)})


# ----------------------------------------------------------------------------- the one absmax quantizer
def absmax_quantize(x, bits=8, dim=-1):
    """Symmetric absmax quantization (LLM.int8() eq. 1; BitNet eq. 4) along `dim`.

    x_q = round(clip(x * Q / gamma, -Q, Q)), gamma = max |x| along dim, Q = 2^(bits-1) - 1.
    Returns (x_q, gamma): integer values in x's dtype, and gamma with dim kept (size 1).
    Dequantize with x_q * gamma / Q. (BitNet writes Q_b = 2^(b-1) with a clip at
    +-(Q_b - eps); 127 keeps the rounded values inside int8, as BitNet b1.58's code does.)
    """
    Q = 2 ** (bits - 1) - 1
    gamma = x.abs().amax(dim=dim, keepdim=True).clamp(min=1e-8)
    return (x * (Q / gamma)).round().clamp(-Q, Q), gamma


def absmax_dequantize(x_q, gamma, bits=8):
    return x_q * (gamma / (2 ** (bits - 1) - 1))


# ----------------------------------------------------------------------------- blockwise 4-bit
def pack_4bit(codes):
    """(n,) integer codes in 0..15, n even -> (n/2,) uint8, the first code in the high nibble."""
    codes = codes.to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed):
    """(n/2,) uint8 -> (n,) int64 codes, inverse of pack_4bit."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten().long()


def quantize_blockwise(w, levels, blocksize=64):
    """Blockwise absmax onto a 16-level codebook: (packed codes (uint8), absmax (fp32, n_blocks)).

    w is flattened and zero-padded to a multiple of blocksize (the zeros never change a
    block's absmax). Each value goes to the nearest level of w / absmax(block).
    """
    levels = torch.as_tensor(levels, dtype=torch.float32, device=w.device)
    if levels.numel() > 16:
        raise ValueError(f"a 4-bit codebook has at most 16 levels, got {levels.numel()}")
    if blocksize <= 0 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even number (two codes per byte), got {blocksize}")
    flat = w.detach().reshape(-1).float()
    flat = F.pad(flat, (0, -flat.numel() % blocksize))
    blocks = flat.view(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    normed = blocks / absmax.clamp(min=1e-12)[:, None]  # in [-1, 1]
    midpoints = (levels[1:] + levels[:-1]) / 2  # nearest level = count of midpoints below
    codes = torch.bucketize(normed.flatten(), midpoints)
    return pack_4bit(codes), absmax


def dequantize_blockwise(packed, absmax, levels, blocksize, shape):
    levels = torch.as_tensor(levels, dtype=torch.float32, device=packed.device)
    values = levels[unpack_4bit(packed)].view(-1, blocksize) * absmax[:, None]  # (n_blocks, blocksize)
    return values.flatten()[:math.prod(shape)].view(shape)


# ----------------------------------------------------------------------------- NF4 + double quantization
@dataclass
class NF4Tensor:
    """A weight in NF4: packed codes plus its block constants, single or double quantized."""
    codes: torch.Tensor  # (ceil(n / blocksize) * blocksize / 2,) uint8
    absmax: torch.Tensor | None  # (n_blocks,) fp32, without double quantization
    qabsmax: torch.Tensor | None  # (n_blocks,) int8, with double quantization
    absmax2: torch.Tensor | None  # (n_blocks / 256, 1) fp32: the absmax of each block of 256 constants
    offset: torch.Tensor | None  # () fp32: the mean subtracted from the constants
    shape: tuple
    dtype: torch.dtype
    blocksize: int = 64

    @property
    def double_quant(self):
        return self.qabsmax is not None

    def tensors(self):
        return [t for t in (self.codes, self.absmax, self.qabsmax, self.absmax2, self.offset) if t is not None]


DQ_BLOCKSIZE = 256  # QLoRA section 3: the constants are quantized in blocks of 256


def double_quantize(absmax):
    """QLoRA's double quantization: fp32 constants -> (int8 codes, fp32 scale per 256, mean).

    The last group of 256 may be partial: it is zero-padded while quantizing (zeros never
    change an absmax) and only the real n_blocks int8 codes are kept."""
    n_blocks = absmax.numel()
    offset = absmax.mean()  # the constants are all positive: centre them to use int8's sign
    centred = F.pad(absmax - offset, (0, -n_blocks % DQ_BLOCKSIZE)).view(-1, DQ_BLOCKSIZE)
    qabsmax, absmax2 = absmax_quantize(centred, bits=8, dim=1)  # (n/256, 256), (n/256, 1)
    return qabsmax.to(torch.int8).flatten()[:n_blocks], absmax2, offset


def double_dequantize(qabsmax, absmax2, offset):
    padded = F.pad(qabsmax.float(), (0, -qabsmax.numel() % DQ_BLOCKSIZE)).view(-1, DQ_BLOCKSIZE)
    return absmax_dequantize(padded, absmax2).flatten()[:qabsmax.numel()] + offset


def quantize_nf4(w, blocksize=64, double_quant=True):
    """w (any shape) -> NF4Tensor: blockwise absmax onto the NF4 levels, two codes per byte."""
    if not w.is_floating_point():
        raise ValueError(f"quantize_nf4 expects a floating-point tensor, got {w.dtype}")
    codes, absmax = quantize_blockwise(w, NF4_LEVELS, blocksize)
    q = NF4Tensor(codes, absmax, None, None, None, tuple(w.shape), w.dtype, blocksize)
    if double_quant:
        q.qabsmax, q.absmax2, q.offset = double_quantize(absmax)
        q.absmax = None
    return q


def nf4_absmax(q):
    """The per-block fp32 constants of q, undoing double quantization if used."""
    if not q.double_quant:
        return q.absmax
    return double_dequantize(q.qabsmax, q.absmax2, q.offset)


def dequantize_nf4(q, dtype=None):
    """NF4Tensor -> a tensor of the original shape, in the original dtype (or `dtype`)."""
    w = dequantize_blockwise(q.codes, nf4_absmax(q), NF4_LEVELS, q.blocksize, q.shape)
    return w.to(dtype or q.dtype)


def bits_per_param(q):
    """Storage of codes and constants, in bits per parameter of the original tensor."""
    return 8 * sum(t.numel() * t.element_size() for t in q.tensors()) / math.prod(q.shape)


def nf4_nbytes(numel, blocksize=64, double_quant=True):
    """Bytes quantize_nf4 stores for a tensor of `numel` values, from arithmetic alone."""
    n_blocks = math.ceil(numel / blocksize)
    codes = n_blocks * blocksize // 2
    if not double_quant:
        return codes + 4 * n_blocks
    n_blocks2 = math.ceil(n_blocks / DQ_BLOCKSIZE)
    return codes + n_blocks + 4 * n_blocks2 + 4  # int8 constants, fp32 scale per 256 of them, fp32 offset


# ----------------------------------------------------------------------------- frozen quantized matmul
class DequantizedMatmul(torch.autograd.Function):
    """y = x W^T for a frozen quantized layer, W dequantized in the forward pass and again in
    the backward pass (dx = dy W), so the full-precision W never stays alive in between.

    Plain F.linear(x, layer.dequantize()) would make autograd keep every layer's
    dequantized weight until the backward pass: for TinyLlama that is 3.9 GB of fp32
    weights, more than the NF4 model itself. bitsandbytes' 4-bit matmul does the same
    recomputation. W is frozen (a LoRA adapter next to it trains), so it gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):  # (..., out) -> (..., in)
        return grad_y @ ctx.layer.dequantize().to(grad_y.dtype), None


# ----------------------------------------------------------------------------- NF4Linear
class NF4Linear(nn.Module):
    """A frozen nn.Linear stored in NF4 (QLoRA section 3): storage NF4, compute in
    `compute_dtype` (bf16 on GPU, fp32 on CPU) by dequantizing the weight on the fly.

    The codes and constants are buffers (they follow .to(device) and state_dict) and the
    module has no parameters: a LoRA adapter around it is what trains.
    """

    cache_dequantized = False  # cache_dequantized(model) turns on the decoding path

    def __init__(self, in_features, out_features, blocksize=64, double_quant=True, compute_dtype=torch.float32,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.compute_dtype = blocksize, double_quant, compute_dtype
        n_blocks = math.ceil(in_features * out_features / blocksize)
        self.register_buffer("codes", torch.zeros(n_blocks * blocksize // 2, dtype=torch.uint8, device=device))
        if double_quant:
            n_blocks2 = math.ceil(n_blocks / DQ_BLOCKSIZE)
            self.register_buffer("qabsmax", torch.zeros(n_blocks, dtype=torch.int8, device=device))
            self.register_buffer("absmax2", torch.zeros(n_blocks2, 1, device=device))
            self.register_buffer("offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, device=device))

    @classmethod
    def from_linear(cls, linear, blocksize=64, double_quant=True, compute_dtype=None):
        if linear.bias is not None:
            raise ValueError("NF4Linear has no bias (this model's linear layers have none)")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, blocksize, double_quant,
                    compute_dtype or w.dtype, device=w.device)
        q = quantize_nf4(w, blocksize, double_quant)
        for name in ("codes", "absmax", "qabsmax", "absmax2", "offset"):
            if getattr(q, name) is not None:
                getattr(layer, name).copy_(getattr(q, name))
        return layer

    def nf4_tensor(self):
        get = lambda name: getattr(self, name, None)  # noqa: E731
        return NF4Tensor(self.codes, get("absmax"), get("qabsmax"), get("absmax2"), get("offset"),
                         (self.out_features, self.in_features), self.compute_dtype, self.blocksize)

    def dequantize(self):
        """The (out_features, in_features) weight in compute_dtype."""
        return dequantize_nf4(self.nf4_tensor(), self.compute_dtype)

    def forward(self, x):  # (..., in_features) -> (..., out_features)
        if self.cache_dequantized and not torch.is_grad_enabled():  # decoding (cache_dequantized)
            return F.linear(x.to(self.compute_dtype), dequantized_for_inference(self))
        return DequantizedMatmul.apply(x.to(self.compute_dtype), self)

    def with_weight(self, weight):
        """A layer like this one holding `weight` (out, in), quantized the same way (LoRA's merge)."""
        return NF4Linear.from_linear(as_linear(weight), self.blocksize, self.double_quant, self.compute_dtype)

    def extra_repr(self):
        dq = ", double_quant" if self.double_quant else ""
        return f"{self.in_features}, {self.out_features}, nf4, blocksize={self.blocksize}{dq}, " \
               f"compute_dtype={self.compute_dtype}"


def as_linear(weight):
    """An nn.Linear (no bias) around an (out, in) weight, for the from_linear constructors."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return linear


# ----------------------------------------------------------------------------- Int8Linear
class Int8Linear(nn.Module):
    """A frozen nn.Linear with per-output-row absmax int8 weights (LLM.int8() section 3.1,
    vector-wise). With quantize_activations, each token's activations are absmax-quantized
    to int8 too (W8A8) and the matmul runs on integer values; otherwise W8A16/32."""

    cache_dequantized = False  # cache_dequantized(model) turns on the decoding path

    def __init__(self, in_features, out_features, quantize_activations=False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quantize_activations = quantize_activations
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_absmax", torch.ones(out_features, 1, device=device))

    @classmethod
    def from_linear(cls, linear, quantize_activations=False):
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias (this model's linear layers have none)")
        layer = cls(linear.in_features, linear.out_features, quantize_activations, device=linear.weight.device)
        w_q, gamma = absmax_quantize(linear.weight.detach().float(), bits=8, dim=1)  # (out, in), (out, 1)
        layer.weight_int8.copy_(w_q.to(torch.int8))
        layer.weight_absmax.copy_(gamma)
        return layer

    def dequantize(self):
        return absmax_dequantize(self.weight_int8.float(), self.weight_absmax)

    def forward(self, x):  # (..., in_features) -> (..., out_features)
        if not self.quantize_activations and self.cache_dequantized and not torch.is_grad_enabled():
            return F.linear(x, dequantized_for_inference(self).to(x.dtype))  # decoding (cache_dequantized)
        if not self.quantize_activations:
            return DequantizedMatmul.apply(x, self)
        x_q, x_gamma = absmax_quantize(x.float(), bits=8, dim=-1)  # (..., in), (..., 1)
        y = F.linear(x_q, self.weight_int8.float())  # exact integer sums (< 2^24) in fp32
        return (y * (x_gamma / 127) * (self.weight_absmax.T / 127)).to(x.dtype)

    def with_weight(self, weight):
        """A layer like this one holding `weight` (out, in), quantized the same way (LoRA's merge)."""
        return Int8Linear.from_linear(as_linear(weight), self.quantize_activations)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, int8, quantize_activations={self.quantize_activations}"


# ----------------------------------------------------------------------------- decoding
def dequantized_for_inference(layer):
    """The layer's dequantized weight, computed once and kept (for inference only).

    Decoding one token is a matrix-vector product: the whole weight is read for a few
    FLOPs per parameter, so dequantizing it on every call costs more than the product
    itself (bench_decode.py measures int8 ~2-5x and NF4 ~30-50x slower than fp32 at
    batch 1 on a CPU). Kept dequantized, a quantized model decodes at the fp32 model's
    speed, with the fp32 weights' memory on top of the quantized storage: the trade is
    memory for speed, at inference. Stored column-major on a CPU, as
    decode.for_decoding does for nn.Linear. Rebuilt when a buffer is replaced or
    written in place (load_state_dict): the key is each buffer's address and version.
    """
    key = [(b.data_ptr(), -1 if b.is_inference() else b._version) for b in layer._buffers.values() if b is not None]
    if getattr(layer, "_inference_key", None) != key:
        with torch.no_grad():
            w = layer.dequantize()  # (out, in)
            layer._inference_weight = w.t().contiguous().t() if w.device.type == "cpu" else w
        layer._inference_key = key
    return layer._inference_weight


def cache_dequantized(model, enabled=True):
    """Turn the decoding path of every NF4Linear / Int8Linear in `model` on (or off): under
    torch.no_grad / inference_mode they multiply by a cached dequantized weight
    (dequantized_for_inference). With gradients on (QLoRA training) nothing changes: the
    weight is dequantized per call and again in backward (DequantizedMatmul). Returns model."""
    for m in model.modules():
        if isinstance(m, (NF4Linear, Int8Linear)):
            m.cache_dequantized = enabled
            if not enabled:
                m._inference_weight = m._inference_key = None
    return model


# ----------------------------------------------------------------------------- BitLinear
def straight_through(x, x_quantized):
    """Forward: x_quantized; backward: the identity (BitNet section 2.2, STE for Sign and Clip)."""
    return x + (x_quantized - x).detach()


class BitLinear(nn.Module):
    """BitNet's drop-in for nn.Linear (section 2, eq. 11), fake-quantized for training:

        y = W~ Quant(LN(x)) * beta * gamma / Q_b,   W~ = Sign(W - alpha)
        alpha = mean(W), beta = mean|W|, gamma = max|LN(x)| (per token), Q_b = 127

    With ternary=True, BitNet b1.58's absmean weights: W~ = RoundClip(W / beta, -1, 1).
    `weight` is the latent full-precision (out, in) matrix that the optimizer updates;
    the straight-through estimator carries gradients past Sign, Round and Clip.

    Group quantization (section 2.1): the input features are split into `groups` equal
    groups (the columns of W with them); alpha, beta, gamma and the LN statistics are
    computed per group, as each of G devices could do without communication.
    """

    def __init__(self, in_features, out_features, groups=1, ternary=False, device=None):
        super().__init__()
        if groups < 1 or in_features % groups:
            raise ValueError(f"groups={groups} must be >= 1 and divide in_features={in_features}")
        self.in_features, self.out_features, self.groups, self.ternary = in_features, out_features, groups, ternary
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialization

    def quantized_weight(self):
        """(W~ (out, in) with values in {-1, 1} or {-1, 0, 1}, beta (groups,))."""
        w = self.weight.view(self.out_features, self.groups, -1).transpose(0, 1)  # (G, out, in/G)
        beta = w.abs().mean(dim=(1, 2), keepdim=True)  # (G, 1, 1)
        if self.ternary:  # b1.58 eq. 1-3: absmean scaling, round to the nearest of -1, 0, 1
            w_t = (w / (beta + 1e-5)).round().clamp(-1, 1)
        else:  # BitNet eq. 1-2: centre, then binarize (Sign(0) = -1)
            alpha = w.mean(dim=(1, 2), keepdim=True)
            w_t = torch.where(w - alpha > 0, 1.0, -1.0).to(w.dtype)
        return w_t.transpose(0, 1).reshape(self.out_features, self.in_features), beta.flatten()

    def forward(self, x):  # (..., in_features) -> (..., out_features)
        G = self.groups
        w_t, beta = self.quantized_weight()
        beta_cols = beta.repeat_interleave(self.in_features // G)  # (in,): each column's group beta
        w = straight_through(self.weight, w_t * beta_cols)  # (out, in)
        xg = x.unflatten(-1, (G, self.in_features // G))  # (..., G, in/G)
        xg = F.layer_norm(xg, xg.shape[-1:])  # SubLN (section 2.1), statistics per group
        x_q, gamma = absmax_quantize(xg, bits=8, dim=-1)  # (..., G, in/G), (..., G, 1)
        xg = straight_through(xg, absmax_dequantize(x_q, gamma))
        return F.linear(xg.flatten(-2), w)  # = sum over groups of W~_g x~_g beta_g gamma_g / Q_b

    def dequantize(self):
        """The latent weight W (out, in): what LoRA's merge adds B A to (forward quantizes it)."""
        return self.weight

    def with_weight(self, weight):
        """A frozen BitLinear like this one whose latent weight is `weight` (LoRA's merge)."""
        layer = BitLinear(self.in_features, self.out_features, self.groups, self.ternary, device=weight.device)
        layer.weight = nn.Parameter(weight.to(self.weight.dtype), requires_grad=False)
        return layer

    def extra_repr(self):
        kind = "ternary (b1.58)" if self.ternary else "binary"
        return f"{self.in_features}, {self.out_features}, {kind}, groups={self.groups}"


def pack_ternary(w_t):
    """Ternary weights {-1, 0, 1} -> uint8, four 2-bit codes (t + 1) per byte, first in the
    highest bits. This, not fake-quantized training, is where b1.58 saves memory."""
    codes = F.pad((w_t.flatten() + 1).to(torch.uint8), (0, -w_t.numel() % 4)).view(-1, 4)
    return (codes[:, 0] << 6) | (codes[:, 1] << 4) | (codes[:, 2] << 2) | codes[:, 3]


def unpack_ternary(packed, shape):
    codes = torch.stack([(packed >> s) & 0b11 for s in (6, 4, 2, 0)], dim=-1).flatten()
    return (codes[:math.prod(shape)].float() - 1).view(shape)


# ----------------------------------------------------------------------------- whole models
def replace_linears(root, make):
    """Swap every nn.Linear below `root` for make(linear), in place."""
    for module in list(root.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child))


def quantization_method(model):
    """'nf4', 'nf4-dq', 'int8', 'bitlinear' or None: how the model's linear layers are stored."""
    for m in model.modules():
        if isinstance(m, NF4Linear):
            return "nf4-dq" if m.double_quant else "nf4"
        if isinstance(m, Int8Linear):
            return "int8"
        if isinstance(m, BitLinear):
            return "bitlinear"
    return None


METHODS = ("nf4", "nf4-dq", "int8")


def compute_dtype_for(device):
    """The dtype a quantized layer computes in (QLoRA section 3): bf16 on a GPU; fp32 on a
    CPU, where bf16 matmuls are hundreds of times slower without bf16 units."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def quantize_model(model, method, compute_dtype=None, blocksize=64):
    """Replace the linear layers inside model.layers (the blocks) in place; the embedding,
    norms and LM head stay in high precision (QLoRA and BitNet both keep them). Returns model."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    existing = quantization_method(model)
    if existing == "bitlinear":  # a model built so (--bitlinear true), not quantized by anyone
        raise ValueError(f"{method} quantization replaces nn.Linear layers, but this model's layers are BitNet "
                         f"BitLinear (bitlinear=True), which quantize their own weights in every forward pass; "
                         f"use LoRA (--peft lora) rather than QLoRA, or a model without --bitlinear")
    if existing:
        raise ValueError(f"model is already quantized with {existing}; quantize the full-precision model "
                         f"(reload it) instead of quantizing twice")
    if method == "int8":
        make = Int8Linear.from_linear
    else:
        make = lambda lin: NF4Linear.from_linear(lin, blocksize, method == "nf4-dq", compute_dtype)  # noqa: E731
    with torch.no_grad():
        replace_linears(model.layers, make)
    return model
