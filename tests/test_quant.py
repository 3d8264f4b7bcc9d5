"""quant.py: NF4 levels and round trips, double quantization, int8, BitLinear, whole models."""

import math
import os
import subprocess
import sys

import pytest
import torch

import hf
from torch import nn

import plan
import quant
from conftest import ROOT, tiny_config
from model import ModelConfig, Transformer

# bitsandbytes' NF4 table (QLoRA arXiv:2305.14314 appendix E / bitsandbytes.functional), the published values
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


# ----------------------------------------------------------------------------- NF4
def test_nf4_levels_match_published_table():
    assert len(quant.NF4_LEVELS) == 16
    torch.testing.assert_close(torch.tensor(quant.NF4_LEVELS), torch.tensor(PUBLISHED_NF4), atol=1e-4, rtol=0)
    assert quant.NF4_LEVELS[7] == 0.0  # an exact zero
    assert quant.nf4_levels().tolist() == quant.NF4_LEVELS


def test_pack_4bit_high_nibble_first_and_round_trip():
    codes = torch.tensor([1, 2, 15, 0, 7, 8])
    packed = quant.pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0x12, 0xF0, 0x78]
    assert quant.unpack_4bit(packed).tolist() == codes.tolist()


def test_nf4_round_trip_error_and_bits():
    w = torch.randn(1024, 1024)
    for dq in (False, True):
        q = quant.quantize_nf4(w, 64, dq)
        w_hat = quant.dequantize_nf4(q)
        assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
        mae = (w_hat - w).abs().mean().item()
        assert abs(mae - 0.0728) < 0.001, mae  # about 0.0728 on randn(1024, 1024), block 64 (measured with bitsandbytes)
        assert math.isclose(quant.bits_per_param(q), quant.nf4_nbytes(w.numel(), 64, dq) * 8 / w.numel())
    assert quant.bits_per_param(quant.quantize_nf4(w, 64, False)) == 4.5
    # 4 + 8/64 + 32/(64*256) + the fp32 offset: 4.127, QLoRA's 0.373-bit saving
    assert abs(quant.bits_per_param(quant.quantize_nf4(w, 64, True)) - 4.12698) < 1e-5
    # a small tensor (64 blocks, a partial group of 256) stores one int8 constant per block, not 256
    w_small = torch.randn(64, 64)
    small = quant.quantize_nf4(w_small, 64, True)
    assert small.qabsmax.numel() == 64 and quant.bits_per_param(small) < 4.5
    exact = quant.quantize_nf4(w_small, 64, False).absmax
    assert (quant.nf4_absmax(small) - exact).abs().max() < 0.01 * exact.max()  # int8 constants, 1% of range


def test_nf4_error_bound_per_block():
    """Every value lands on its nearest level: the error is at most half the widest gap times absmax."""
    w = torch.randn(300, 70) * 3  # 21000 values: not a multiple of the block
    q = quant.quantize_nf4(w, 64, double_quant=False)
    half_gap = max(b - a for a, b in zip(quant.NF4_LEVELS, quant.NF4_LEVELS[1:])) / 2
    absmax = torch.nn.functional.pad(w.flatten(), (0, -w.numel() % 64)).view(-1, 64).abs().amax(1)
    bound = (absmax * half_gap).repeat_interleave(64)[:w.numel()].view(w.shape)
    assert ((quant.dequantize_nf4(q) - w).abs() <= bound * (1 + 1e-6)).all()
    assert (quant.dequantize_nf4(q).abs().amax() - w.abs().amax()).abs() < 1e-5  # absmax is exact


@pytest.mark.parametrize("shape", [(7,), (3, 5), (33, 17), (2, 3, 11)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_odd_shapes_and_dtypes(shape, dtype):
    w = torch.randn(shape).to(dtype)
    q = quant.quantize_nf4(w, 64, double_quant=True)
    assert q.codes.numel() == math.ceil(w.numel() / 64) * 32
    w_hat = quant.dequantize_nf4(q)
    assert w_hat.shape == w.shape and w_hat.dtype == dtype
    assert (w_hat.float() - w.float()).abs().max() <= 0.25 * w.float().abs().max() + 1e-3


def test_double_quant_constants_error_is_small():
    w = torch.randn(512, 512)
    q1, q2 = quant.quantize_nf4(w, 64, False), quant.quantize_nf4(w, 64, True)
    rel = ((quant.nf4_absmax(q2) - q1.absmax).abs() / q1.absmax).max()
    assert rel < 0.01
    e1 = (quant.dequantize_nf4(q1) - w).abs().mean()
    e2 = (quant.dequantize_nf4(q2) - w).abs().mean()
    assert e2 <= e1 * 1.01


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="floating-point"):
        quant.quantize_nf4(torch.arange(10))
    with pytest.raises(ValueError, match="blocksize"):
        quant.quantize_nf4(torch.randn(10), blocksize=63)
    with pytest.raises(ValueError, match="divide in_features"):
        quant.BitLinear(10, 4, groups=3)
    with pytest.raises(ValueError, match="bitlinear_groups"):
        ModelConfig.from_name("debug", bitlinear=True, bitlinear_groups=3)


# ----------------------------------------------------------------------------- bitsandbytes oracle
def _bnb():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the optional NF4 oracle")


@pytest.mark.slow  # bitsandbytes' CPU kernels: about half a minute
def test_nf4_equals_bitsandbytes():
    F = _bnb()
    w = torch.randn(256, 300)  # 76800 values: 1200 blocks
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    theirs = F.dequantize_4bit(packed, state)
    q = quant.quantize_nf4(w, 64, double_quant=False)
    torch.testing.assert_close(q.absmax, state.absmax)
    assert (q.codes == packed.flatten()).float().mean() > 0.9999  # identical packing (ties: ~1 ulp apart)
    torch.testing.assert_close(quant.dequantize_nf4(q), theirs, atol=1e-6, rtol=1e-6)
    odd = torch.randn(33, 17)  # 561 values: bnb quantizes the last partial block on its own, we pad it
    packed, state = F.quantize_4bit(odd, blocksize=64, quant_type="nf4")
    torch.testing.assert_close(quant.dequantize_nf4(quant.quantize_nf4(odd, 64, False)),
                               F.dequantize_4bit(packed, state), atol=1e-6, rtol=1e-6)


def test_double_quant_error_close_to_bitsandbytes():
    """bnb's compress_statistics: absmax - mean, then 8-bit blockwise (256) with its dynamic map.
    Ours uses absmax int8 per 256 constants; the weight error must be within a few percent."""
    F = _bnb()
    w = torch.randn(1024, 512)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert state.nested and state.state2.blocksize == 256 and state.absmax.dtype == torch.uint8
    theirs = (F.dequantize_4bit(packed, state) - w).abs().mean()
    ours = (quant.dequantize_nf4(quant.quantize_nf4(w, 64, True)) - w).abs().mean()
    assert ours <= theirs * 1.03, (ours, theirs)


# ----------------------------------------------------------------------------- NF4Linear, Int8Linear
def test_nf4_linear_matches_dequantized_weight_and_survives_state_dict():
    lin = nn.Linear(96, 40, bias=False)
    for dq in (False, True):
        layer = quant.NF4Linear.from_linear(lin, 64, dq)
        assert list(layer.parameters()) == []
        assert layer.dequantize().shape == (40, 96) and layer.dequantize().dtype == torch.float32
        x = torch.randn(3, 5, 96)
        torch.testing.assert_close(layer(x), x @ layer.dequantize().T)
        assert (layer(x) - lin(x)).abs().mean() < 0.1 * lin(x).abs().mean()
        fresh = quant.NF4Linear(96, 40, 64, dq)
        fresh.load_state_dict(layer.state_dict())
        assert torch.equal(fresh.dequantize(), layer.dequantize())
    bf = quant.NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16)
    assert bf.dequantize().dtype == torch.bfloat16


def test_quantized_layers_recompute_the_weight_in_backward_instead_of_keeping_it():
    """dx = dy W with W dequantized again; autograd keeps no (out, in) tensor for it."""
    lin = nn.Linear(96, 40, bias=False)
    for layer in (quant.NF4Linear.from_linear(lin), quant.Int8Linear.from_linear(lin)):
        x = torch.randn(3, 96, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            y = layer(x)
        assert (40, 96) not in saved and (96, 40) not in saved
        dy = torch.randn(3, 40)
        y.backward(dy)
        torch.testing.assert_close(x.grad, dy @ layer.dequantize())


def test_absmax_quantize_and_int8_linear():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.1, -0.2]])
    x_q, gamma = quant.absmax_quantize(x, bits=8, dim=-1)
    assert x_q.tolist() == [[64.0, -127.0, 32.0], [0.0, 64.0, -127.0]]
    assert gamma.flatten().tolist() == pytest.approx([2.0, 0.2])
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(4, 64)
    for act in (False, True):
        layer = quant.Int8Linear.from_linear(lin, quantize_activations=act)
        assert layer.weight_int8.dtype == torch.int8 and list(layer.parameters()) == []
        # per-row absmax: error at most half a step of each row's scale
        assert ((layer.dequantize() - lin.weight).abs() <= layer.weight_absmax / 127 / 2 + 1e-7).all()
        rel = (layer(x) - lin(x)).norm() / lin(x).norm()
        assert rel < (0.01 if not act else 0.02), rel


# ----------------------------------------------------------------------------- whole models
def test_quantize_model_replaces_block_linears_only_and_refuses_twice():
    model = Transformer(tiny_config())
    idx = torch.randint(0, 97, (2, 16))
    ref = model(idx, idx)[1]
    quant.quantize_model(model, "nf4-dq")
    assert isinstance(model.layers[0].attention.wq, quant.NF4Linear)
    assert isinstance(model.layers[1].feed_forward.w2, quant.NF4Linear)
    assert isinstance(model.output, nn.Linear) and isinstance(model.tok_embeddings, nn.Embedding)
    assert abs(model(idx, idx)[1] - ref) < 0.05
    with pytest.raises(ValueError, match="already quantized with nf4-dq"):
        quant.quantize_model(model, "int8")
    with pytest.raises(ValueError, match="unknown quantization method"):
        quant.quantize_model(Transformer(tiny_config()), "int3")
    # state_dict round trip through a freshly quantized model
    other = quant.quantize_model(Transformer(tiny_config()), "nf4-dq")
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(idx)[0], model(idx)[0])


def test_report_bytes_are_exact():
    config = tiny_config()
    with torch.device("meta"):
        rows, totals = plan.quant_report(Transformer(config), "nf4-dq")
    model = quant.quantize_model(Transformer(config), "nf4-dq")
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    kept_fp32 = sum(r["numel"] for r in rows if r["method"] == "keep") * 2  # kept in bf16 in the report
    assert totals["after"] == stored - kept_fp32
    assert totals["numel"] == sum(p.numel() for p in Transformer(config).parameters())


def test_report_tinyllama_on_meta_device():
    with torch.device("meta"):
        rows, totals = plan.quant_report(Transformer(ModelConfig.from_name("tinyllama_1b")), "nf4-dq")
    assert totals["numel"] == 1_100_048_384
    assert totals["fp32"] == 4 * 1_100_048_384
    linear = sum(r["numel"] for r in rows if r["method"] == "nf4-dq")
    assert abs(8 * sum(r["after"] for r in rows if r["method"] == "nf4-dq") / linear - 4.127) < 0.001


# ----------------------------------------------------------------------------- BitLinear
def test_bitlinear_forward_is_the_papers_formula():
    torch.manual_seed(0)
    layer = quant.BitLinear(16, 8)
    x = torch.randn(4, 16)
    w = layer.weight.detach()
    w_t = torch.where(w - w.mean() > 0, 1.0, -1.0)
    beta = w.abs().mean()
    xn = torch.nn.functional.layer_norm(x, (16,))
    gamma = xn.abs().amax(-1, keepdim=True)
    x_q = (xn * 127 / gamma).round().clamp(-127, 127)
    expected = (x_q @ w_t.T) * beta * gamma / 127  # BitNet eq. 11
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    ternary = quant.BitLinear(16, 8, ternary=True)
    w_t, beta = ternary.quantized_weight()
    assert set(w_t.unique().tolist()) <= {-1.0, 0.0, 1.0} and (w_t == 0).any()
    for kind in (layer, ternary):  # a model cast to bf16 keeps computing in bf16
        assert kind.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def test_bitlinear_straight_through_gradients():
    layer = quant.BitLinear(32, 8, groups=2)
    x = torch.randn(5, 32, requires_grad=True)
    grad_out = torch.randn(5, 8)
    (layer(x) * grad_out).sum().backward()
    # STE: dL/dW is the gradient of the matmul with respect to the quantized weight
    xg = torch.nn.functional.layer_norm(x.detach().view(5, 2, 16), (16,))
    x_dq = quant.absmax_dequantize(*quant.absmax_quantize(xg)).view(5, 32)
    torch.testing.assert_close(layer.weight.grad, grad_out.T @ x_dq, rtol=1e-5, atol=1e-5)
    # and dL/dx flows through the quantizers as the identity (STE) into layer_norm's backward
    w = layer.quantized_weight()[0] * layer.quantized_weight()[1].repeat_interleave(16)
    xr = x.detach().clone().requires_grad_()
    (torch.nn.functional.linear(torch.nn.functional.layer_norm(xr.view(5, 2, 16), (16,)).view(5, 32), w.detach())
     * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_bitlinear_group_quantization_is_per_group():
    layer = quant.BitLinear(8, 3, groups=2)
    with torch.no_grad():
        layer.weight[:, :4] = torch.randn(3, 4) * 10  # group 0 large, group 1 small
        layer.weight[:, 4:] = torch.randn(3, 4) * 0.01
    w_t, beta = layer.quantized_weight()
    assert beta.shape == (2,) and beta[0] > 100 * beta[1]
    torch.testing.assert_close(beta, torch.stack([layer.weight[:, :4].abs().mean(), layer.weight[:, 4:].abs().mean()]))
    # a group's activations are normalized and quantized on their own: scaling one group changes nothing
    x = torch.randn(2, 8)
    y = layer(x)
    torch.testing.assert_close(layer(torch.cat([x[:, :4] * 50, x[:, 4:]], dim=1)), y, rtol=1e-4, atol=1e-4)


def test_ternary_packing_round_trip():
    w_t = torch.randint(-1, 2, (7, 9)).float()
    packed = quant.pack_ternary(w_t)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(63 / 4)
    assert torch.equal(quant.unpack_ternary(packed, w_t.shape), w_t)


def test_bitlinear_model_trains_and_refuses_hf_export(tmp_path):
    model = Transformer(tiny_config(bitlinear=True, bitlinear_ternary=True))
    assert isinstance(model.layers[0].feed_forward.w1, quant.BitLinear)
    assert isinstance(model.output, nn.Linear)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 97, (4, 32))
    losses = []
    for _ in range(30):
        loss = model(idx, idx)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    with pytest.raises(ValueError, match="bitlinear"):
        hf.save_llama(model, str(tmp_path))
    with pytest.raises(ValueError, match="this model.s layers are BitNet BitLinear"):
        quant.quantize_model(model, "nf4")


# ----------------------------------------------------------------------------- experiments (CI smoke)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["quant_quality", "bitnet_lr"])
def test_experiment_runs_quick(name, char_dataset, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", f"{name}.py"), "--quick",
                        "--dataset", char_dataset, "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / f"{name}_quick.png").stat().st_size > 10_000  # never the full run's files
    assert not (tmp_path / f"{name}.png").exists() and not (tmp_path / f"{name}.json").exists()
    import json
    result = json.loads((tmp_path / f"{name}_quick.json").read_text())
    if name == "quant_quality":
        assert set(result["table"]) == {"fp32", "int8", "int8 W8A8", "nf4", "nf4-dq", "int4", "fp4"}
        assert result["int4_over_nf4"]["normal"]["mae"] > 1.1  # NF4 beats int4 on normal weights
    else:
        assert result["packing"]["totals"]["bits_per_param"] < 2.1


def test_sample_quantize(char_dataset, tmp_path):
    from train import parse_args, train
    out = str(tmp_path / "run")
    cfg, model_args, explicit = parse_args(["--dataset", char_dataset, "--out_dir", out, "--max_iters", "5",
                                            "--eval_interval", "5", "--eval_iters", "1", "--batch_size", "2"])
    train(cfg, model_args, explicit)
    for method in ("nf4-dq", "int8"):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--out_dir", out, "--prompt", "The ",
                            "--max_new_tokens", "10", "--quantize", method], capture_output=True, text=True,
                           timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("The ") and len(r.stdout) == len("The ") + 10 + 1
