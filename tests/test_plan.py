"""plan.py: TinyLlama's own figures, the MFU <-> throughput arithmetic, memory with and
without activation checkpointing and FSDP, and advice when a step does not fit."""

import pytest

from conftest import one_error_line, tiny_config
from model import ModelConfig, count_params, flops_per_token
from plan import DEVICES, activation_elements_per_token, estimate_memory, fit_advice, format_plan, plan

TINYLLAMA = ModelConfig.from_name("tinyllama_1b")


def tinyllama_plan(**kw):
    args = dict(tokens_per_step=1024 * 2048, total_tokens=300e9, tokens_per_sec=24_000, device="A100-40G",
                n_devices=16, seq_len=2048, micro_batch=8)
    return plan(TINYLLAMA, **{**args, **kw})


def test_tinyllama_paper_figures():
    """arXiv:2401.02385: 24,000 tokens/s per A100-40G, 3,456 A100-hours for 300B tokens, 56% MFU."""
    p = tinyllama_plan()
    assert p["total_tokens"] == 143_052 * 2**21  # whole steps of 2M tokens: 300.001B
    assert p["gpu_hours"] == pytest.approx(p["total_tokens"] / 24_000 / 3600)
    assert p["gpu_hours"] == pytest.approx(3456, rel=0.005)  # 3,472: the paper's 16 GPUs x 9.04 days, rounded to 9
    assert round(100 * p["mfu"]) == 56
    assert p["mfu"] == pytest.approx(24_000 * 7_313_817_600 / 312e12)  # flops_per_token at T = 2048, by hand below
    n_matmul = count_params(TINYLLAMA) - 32000 * 2048 - 22 * 2 * 2048 - 2048  # no embedding lookup, no norms
    assert p["flops_per_token"] == 6 * n_matmul + 12 * 22 * 32 * 64 * 2048 == 7_313_817_600
    assert p["wall_hours"] == pytest.approx(p["gpu_hours"] / 16)
    text = format_plan(p)
    assert "3,472 A100-40G-hours" in text and "56.3% MFU" in text and "143,052 steps" in text


def test_mfu_gives_the_throughput_and_back():
    p = tinyllama_plan(tokens_per_sec=None, mfu=0.5)
    fpt = flops_per_token(TINYLLAMA, 2048)
    assert p["tokens_per_sec_per_device"] == pytest.approx(0.5 * 312e12 / fpt)
    q = tinyllama_plan(tokens_per_sec=p["tokens_per_sec_per_device"], device="A100-40G")
    assert q["mfu"] == pytest.approx(0.5)
    h100 = tinyllama_plan(tokens_per_sec=None, mfu=0.5, device="H100")
    assert h100["gpu_hours"] == pytest.approx(p["gpu_hours"] * 312 / 989)


def test_steps_or_tokens_and_no_throughput():
    p = plan(TINYLLAMA, tokens_per_step=2**21, steps=1000, seq_len=2048, micro_batch=8, n_devices=8)
    assert p["total_tokens"] == 1000 * 2**21 and p["grad_accum"] == 16 and "gpu_hours" not in p
    assert "time" not in format_plan(p)
    with pytest.raises(ValueError, match="exactly one of steps and total_tokens"):
        plan(TINYLLAMA, tokens_per_step=2**21)
    with pytest.raises(ValueError, match="unknown device 'TPU'"):
        plan(TINYLLAMA, tokens_per_step=2**21, steps=1, device="TPU")


def test_checkpointing_keeps_one_input_per_layer():
    c = tiny_config()  # C 64, I from the config, L 2, V 97, kv 2 x 16
    C, I, L, V, kv = c.n_embd, c.intermediate_size, c.n_layer, c.vocab_size, c.n_kv_head * c.head_dim
    layer = 7 * C + 2 * kv + 4 * I
    head = 3 * C + 5 * V + 4 * I + 4 * C
    assert activation_elements_per_token(c) == L * layer + head
    assert activation_elements_per_token(c, grad_checkpoint=True) == L * C + layer + head
    full = estimate_memory(TINYLLAMA, 8, 2048, activation_bytes=2)["full"]
    ckpt = estimate_memory(TINYLLAMA, 8, 2048, activation_bytes=2, grad_checkpoint=True)["full"]
    assert ckpt["weights"] == full["weights"] and ckpt["activations"] < full["activations"] / 3
    sharded = estimate_memory(TINYLLAMA, 8, 2048, activation_bytes=2, n_shards=8)["full"]
    assert sharded["optimizer"] == full["optimizer"] / 8 and sharded["activations"] == full["activations"]


def test_a_step_that_does_not_fit_names_the_knobs():
    gib = 2**30
    assert fit_advice(TINYLLAMA, 1, 2048, 80 * gib) is None
    advice = fit_advice(TINYLLAMA, 8, 2048, 24 * gib, activation_bytes=4)
    assert advice.startswith("the step needs about 78.6 GiB but the device has 24.0 GiB; what fits: ")
    assert "--batch_size 1 --grad_accum 8 --grad_checkpoint true" in advice and "--peft qlora" in advice
    # a smaller micro-batch keeps the recipe's tokens per step: grad_accum rises by as much
    recipe = fit_advice(TINYLLAMA, 8, 2048, 24 * gib, activation_bytes=4, grad_accum=128)
    assert "--batch_size 1 --grad_accum 1024 --grad_checkpoint true" in recipe
    assert "(each keeps 2,097,152 tokens per optimizer step)" in recipe
    assert not tinyllama_plan()["fits"] and tinyllama_plan(grad_checkpoint=True)["fits"]
    assert DEVICES["A100-40G"]["memory"] == 40 * gib


def test_tinyllama_refused_from_shapes_before_data(monkeypatch, capsys):
    """train.py checks the fit from the preset's shapes first: here on a device of 8 GiB and a
    dataset that does not exist, the refusal comes before the dataset is opened (or built),
    with what fits and the time of one optimizer step at the device's peak."""
    import plan as plan_module
    import train
    monkeypatch.setattr(plan_module, "device_memory", lambda device: 8 * 2**30)
    monkeypatch.setattr(plan_module, "peak_flops", lambda device, dtype: 100e9)
    monkeypatch.setattr(train, "choose_threads", lambda device: 1)
    err = one_error_line(capsys, train.main, ["--config", "tinyllama_1b", "--device", "cpu",
                                             "--dataset", "no_such_dataset", "--out_dir", "/nonexistent/out"])
    seconds = 1024 * 2048 * flops_per_token(TINYLLAMA, 2048) / 100e9  # 2M tokens x 7.3 GFLOP at 100 GFLOP/s
    assert f"takes at least {seconds / 3600:,.1f} h on 1 x cpu at its measured peak of 100 GFLOP/s" in err
    assert "the step needs about 78.6 GiB but the device has 8.0 GiB" in err and "dataset" not in err


def test_cpu_entry_is_measured_when_first_used(monkeypatch):
    import plan as plan_module
    monkeypatch.setitem(DEVICES, "CPU", {"peak_flops": None, "memory": None, "memory_bandwidth": None})
    monkeypatch.setattr(plan_module, "peak_flops", lambda device, dtype: 50e9)
    p = plan(TINYLLAMA, tokens_per_step=2**21, steps=10, mfu=0.5, device="CPU", seq_len=2048, micro_batch=1)
    assert DEVICES["CPU"]["peak_flops"] == 50e9 and p["device_memory"] == plan_module.device_memory(
        __import__("torch").device("cpu"))
    assert p["tokens_per_sec_per_device"] == pytest.approx(0.5 * 50e9 / flops_per_token(TINYLLAMA, 2048))
