"""peft.py: LoRA (freezing, merge/unmerge, GQA shapes, HF PEFT layout and parity),
prefix-tuning (KV cache, folding), QLoRA pieces (NF4 / BitLinear bases, paged AdamW),
memory accounting, and --peft in train.py / --adapter in sample.py end to end."""

import copy
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ONE_THREAD, ROOT, run_train, tiny_config
import hf
import runs
from attention import apply_rope, repeat_kv
from model import ModelConfig, Transformer
import peft


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread



def lora_model(**kw):
    """(the base model, a copy of it with non-trivial LoRA adapters)."""
    base = Transformer(tiny_config())
    model = peft.apply_lora(copy.deepcopy(base), **kw)
    for m in peft.lora_layers(model):  # B = 0 at init; make the adapters do something
        torch.nn.init.normal_(m.lora_B, std=0.05)
    return base, model


def ids(B=2, T=16):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- LoRA
def test_apply_lora_freezes_the_base_and_starts_at_the_base_model():
    model = Transformer(tiny_config())
    x = ids()
    before = model(x)[0]
    peft.apply_lora(model, r=4, alpha=8, targets=("q", "v"))
    assert torch.equal(model(x)[0], before)  # B = 0: delta W = 0 at the start
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.attention.{w}.lora_{ab}" for i in range(2) for w in ("wq", "wv") for ab in "AB"}
    _, loss = model(x, x)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == trainable  # no gradient reaches the base
    # 2 layers x (wq: 4 x (64 + 64), wv: 4 x (64 + 32)) = 1792
    assert peft.count_trainable(model) == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert model.layers[0].attention.wq.scaling == 2.0


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # MHA, GQA, MQA: K/V narrower than Q
def test_lora_shapes_on_gqa_and_mqa(n_kv_head):
    model = Transformer(tiny_config(n_kv_head=n_kv_head))
    peft.apply_lora(model, r=3, targets="all")
    att, ff = model.layers[0].attention, model.layers[0].feed_forward
    assert att.wq.lora_B.shape == (64, 3) and att.wq.lora_A.shape == (3, 64)
    assert att.wk.lora_B.shape == (n_kv_head * 16, 3) and att.wv.lora_B.shape == (n_kv_head * 16, 3)
    assert ff.w1.lora_B.shape == (model.config.intermediate_size, 3) and ff.w2.lora_A.shape == (3, 256)
    assert model(ids())[0].shape == (2, 16, 97)


def test_unknown_targets_list_the_valid_names():
    with pytest.raises(ValueError, match="valid names: q, k, v, o, gate, up, down or 'all'"):
        peft.apply_lora(Transformer(tiny_config()), targets=("query", "value"))


def test_merge_equals_unmerged_and_unmerge_restores_the_base():
    _, model = lora_model(r=4, targets="all")
    base = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    x = ids()
    with torch.no_grad():
        y = model(x)[0]
        peft.merge_lora(model)
        assert (model(x)[0] - y).abs().max() < 1e-5
        peft.merge_lora(model)  # twice is a no-op
        assert (model(x)[0] - y).abs().max() < 1e-5
        peft.unmerge_lora(model)
    for n, p in model.named_parameters():
        if n in base:
            assert (p - base[n]).abs().max() < 1e-6, n
    assert (model(x)[0] - y).abs().max() < 1e-5


def test_bf16_merge_and_unmerge_restore_the_base_exactly():
    """In bf16 W0 + BA is rounded, so unmerging by subtraction would not give W0 back."""
    _, model = lora_model(r=4, targets="all")
    for m in peft.lora_layers(model):
        m.base.to(torch.bfloat16)
    base = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad and p.dim() == 2}
    with torch.no_grad():
        peft.merge_lora(model)
        assert any(not torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
        peft.unmerge_lora(model)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


def test_lora_on_an_int8_base_trains_in_fp32_and_merges_with_a_warning():
    import quant
    model = quant.quantize_model(Transformer(tiny_config()), "int8")
    peft.apply_lora(model, r=2, targets="q,v")
    layer = model.layers[0].attention.wq
    assert layer.lora_A.dtype == torch.float32 and isinstance(layer.base, quant.Int8Linear)
    torch.nn.init.normal_(layer.lora_B, std=0.05)
    with torch.no_grad():
        y = model(ids())[0]
        with pytest.warns(UserWarning, match="Int8Linear base re-quantizes"):
            peft.merge_lora(model)
        peft.unmerge_lora(model)
        assert torch.equal(model(ids())[0], y)


def test_load_lora_takes_the_files_alpha_and_checks_its_rank(tmp_path):
    _, model = lora_model(r=2, alpha=32, targets="q,v")
    hf.save_lora(model, tmp_path)
    target = peft.apply_lora(Transformer(tiny_config()), r=2, alpha=4, targets="q,v")  # adapters in place, alpha 4
    hf.load_lora(target, tmp_path)
    assert target.layers[0].attention.wq.scaling == 16.0  # 32 / 2, from adapter_config.json
    with pytest.raises(ValueError, match="rank r=2 but the model's LoRA layers have r=3"):
        hf.load_lora(peft.apply_lora(Transformer(tiny_config()), r=3, targets="q,v"), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    with pytest.raises(ValueError, match=r"target_modules \['c_attn'\] name none of this model's linear layers"):
        hf.load_lora(Transformer(tiny_config()), tmp_path)


def test_save_load_round_trip_in_hf_peft_layout(tmp_path):
    from safetensors.torch import load_file
    base, model = lora_model(r=2, alpha=4, targets=("q", "k", "down"))
    hf.save_lora(model, tmp_path)
    names = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in names
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight" in names and len(names) == 12
    fresh = hf.load_lora(base, tmp_path)  # applies LoRA from adapter_config.json, then loads A and B
    assert fresh.peft_config["targets"] == ["q", "k", "down"] and fresh.peft_config["r"] == 2
    assert torch.equal(fresh(ids())[0], model(ids())[0])


# Hugging Face PEFT as the oracle. Our peft.py shadows the `peft` package inside the repo,
# so the oracle runs in a subprocess whose working directory and sys.path exclude the repo.
ORACLE = r"""
import sys, torch
import peft
assert "site-packages" in peft.__file__, peft.__file__  # Hugging Face's, not ours
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM
base_dir, ours_dir, theirs_dir, ids_path, out_path = sys.argv[1:]
x = torch.load(ids_path)
with torch.no_grad():
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), ours_dir).eval()
    ours = model(x).logits
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,  # random B: a non-trivial adapter
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config).eval()
    model.save_pretrained(theirs_dir)
    theirs = model(x).logits
torch.save({"ours": ours, "theirs": theirs}, out_path)
"""


def test_hf_peft_parity_both_ways(tmp_path):
    try:
        importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face peft is not installed (the oracle for the adapter layout)")
    pytest.importorskip("transformers", reason="transformers loads the exported base for the PEFT oracle")
    base, model = lora_model(r=4, alpha=8, targets=("q", "v", "gate"))
    hf.save_llama(base, tmp_path / "base")
    hf.save_lora(model, tmp_path / "ours")
    x = ids()
    torch.save(x, tmp_path / "ids.pt")
    env = {k: v for k, v in ONE_THREAD.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", ORACLE, str(tmp_path / "base"), str(tmp_path / "ours"),
                          str(tmp_path / "theirs"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        assert (out["ours"] - model(x)[0]).abs().max() < 1e-4  # our adapter in their PeftModel
        theirs = hf.load_llama(str(tmp_path / "base"))
        hf.load_lora(theirs, tmp_path / "theirs")  # their adapter in our model
        assert peft.count_trainable(theirs) == 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 256))  # q o, k v, mlp
        assert (out["theirs"] - theirs(x)[0]).abs().max() < 1e-4
        assert (out["theirs"] - base(x)[0]).abs().max() > 1e-3  # their adapter does change the outputs


def test_transformers_does_not_pick_up_our_peft():
    pytest.importorskip("transformers", reason="checks transformers' import of the peft package")
    code = "import sys, transformers.utils as u; u.is_peft_available(); print('peft' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "False", run.stderr[-1000:]


# ----------------------------------------------------------------------------- quantized bases
def test_lora_on_nf4_and_bitlinear_bases():
    import quant
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    quant.quantize_model(model, "nf4-dq")
    peft.apply_lora(model, r=4, targets="all")  # QLoRA: LoRA on every linear layer
    x = ids()
    _, loss = model(x, x)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    for m in peft.lora_layers(model):
        torch.nn.init.normal_(m.lora_B, std=0.05)
    with torch.no_grad():
        y = model(x)[0]
        with pytest.warns(UserWarning, match="re-quantizes its weight, which changes the outputs"):
            peft.merge_lora(model)
        assert (model(x)[0] - y).abs().max() > 1e-4  # NF4 cannot hold W0 + BA exactly
        peft.unmerge_lora(model)
        assert torch.equal(model(x)[0], y)  # the original NF4 base is back
    bit = quant.BitLinear(32, 16)
    peft.freeze(bit)
    layer = peft.LoRALinear(bit, r=2, alpha=8)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 32)
    out = layer(x)
    out.sum().backward()
    assert layer.lora_A.grad is not None and bit.weight.grad is None
    assert torch.allclose(out, bit(x) + 4.0 * x @ layer.lora_A.T @ layer.lora_B.T, atol=1e-5)  # scaling 8/2


# ----------------------------------------------------------------------------- prefix-tuning
@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_prefix_with_kv_cache_equals_prefix_without(n_kv_head):
    model = Transformer(tiny_config(n_kv_head=n_kv_head))
    peft.apply_prefix(model, prefix_len=5, reparam_hidden=32)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "prefix_encoder.embedding", "prefix_encoder.mlp.0.weight", "prefix_encoder.mlp.0.bias",
        "prefix_encoder.mlp.2.weight", "prefix_encoder.mlp.2.bias"}
    model.eval()
    x = ids(2, 12)
    with torch.no_grad():
        full = model(x)[0]  # (B, 12, vocab), no cache
        caches = model.new_kv_caches(2)
        assert caches[0].k.shape[2] == 64 + 5
        steps = [model(x[:, :7], caches=caches)[0]]
        steps += [model(x[:, t:t + 1], caches=caches, start_pos=t)[0] for t in range(7, 12)]
        assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5
        assert caches[0].length == 5 + 12  # the prefix entered the cache once
    k, v = model.layers[0].attention.prefix(3)
    assert k.shape == v.shape == (3, n_kv_head, 5, 16)
    with torch.no_grad():
        folded = peft.fold_prefix(model)(x)[0]
    assert (folded - full).abs().max() < 1e-6
    assert peft.count_trainable(model) == 2 * 2 * n_kv_head * 5 * 16  # n_layer * (k, v) * heads * P * hd


def test_prefix_leaves_the_positions_of_real_tokens_alone():
    """Real tokens keep RoPE positions 0..T-1 and the prefix keys carry no rotation:
    layer 0's attention equals softmax over [prefix keys, rotated keys] computed by hand."""
    model = Transformer(tiny_config(attn_impl="math"))
    peft.apply_prefix(model, prefix_len=4, reparam_hidden=8)
    att, T = model.layers[0].attention, 6
    x = torch.randn(1, T, 64)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    with torch.no_grad():
        y = att(x, cos, sin)
        q = apply_rope(att.wq(x).view(1, T, 4, 16).transpose(1, 2), cos, sin)  # (1, 4, T, 16)
        k = apply_rope(att.wk(x).view(1, T, 2, 16).transpose(1, 2), cos, sin)  # (1, 2, T, 16)
        v = att.wv(x).view(1, T, 2, 16).transpose(1, 2)
        pk, pv = att.prefix(1)
        k, v = repeat_kv(torch.cat([pk, k], 2), 2), repeat_kv(torch.cat([pv, v], 2), 2)  # (1, 4, 4 + T, 16)
        scores = q @ k.transpose(-2, -1) / 4.0  # sqrt(16)
        allowed = torch.ones(T, 4 + T, dtype=torch.bool).tril(diagonal=4)  # every prefix slot + the causal past
        manual = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v  # (1, 4, T, 16)
        expected = att.wo(manual.transpose(1, 2).reshape(1, T, 64))
    assert (y - expected).abs().max() < 1e-5


def test_prefix_is_read_by_every_query_under_sparse_attention():
    """With a Sparse Transformer mask the prefix stays visible: the mask covers real tokens only."""
    model = Transformer(tiny_config(attn_impl="math", sparse_local=2, sparse_stride=0)).eval()
    peft.apply_prefix(model, prefix_len=3, reparam_hidden=8)
    att = model.layers[0].attention
    att.save_weights = True
    with torch.no_grad():
        model(ids(1, 10))
    weights = att.weights[0]  # (n_head, T, P + T)
    assert (weights[:, :, :3] > 0).all()  # every query reads all three prefix slots
    assert (weights[:, 5, 3:] > 0).sum(-1).eq(2).all()  # and its local band of two tokens (4 and 5)


def test_save_and_load_folded_prefix(tmp_path):
    model = Transformer(tiny_config())
    peft.apply_prefix(model, prefix_len=3, reparam_hidden=16)
    with torch.no_grad():
        y = model(ids())[0]
    peft.save_prefix(model, tmp_path)
    assert isinstance(model.prefix_encoder, peft.PrefixMLP)  # saving does not fold the model in training
    fresh = Transformer(tiny_config())
    fresh.load_state_dict({n: p for n, p in model.state_dict().items() if not n.startswith("prefix_encoder")})
    runs.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert (fresh(ids())[0] - y).abs().max() < 1e-6


# ----------------------------------------------------------------------------- paged AdamW
def test_paged_adamw_equals_adamw():
    torch.manual_seed(0)
    params = [torch.randn(37, 11), torch.randn(5), torch.randn(13, 11)]
    mine = [p.clone().requires_grad_() for p in params]
    ref = [p.clone().requires_grad_() for p in params]
    opt = peft.PagedAdamW([{"params": mine[:1], "weight_decay": 0.1}, {"params": mine[1:], "weight_decay": 0.0}],
                          lr=1e-2, betas=(0.9, 0.95), page_numel=64)  # 407 + 5 + 143 elements: 7 + 1 + 3 pages
    ref_opt = torch.optim.AdamW([{"params": ref[:1], "weight_decay": 0.1}, {"params": ref[1:], "weight_decay": 0.0}],
                                lr=1e-2, betas=(0.9, 0.95), foreach=False)
    for step in range(20):
        g = [torch.randn(p.shape) for p in params]
        for p, q, gi in zip(mine, ref, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(mine, ref):
        assert (p - q).abs().max() < 1e-6
    state = opt.state_dict()
    assert state["state"][0]["exp_avg"].device.type == "cpu" and state["state"][0]["step"] == 20


# ----------------------------------------------------------------------------- memory accounting
def test_tinyllama_memory_accounting():
    """plan.estimate_memory, the one estimator, from TinyLlama's shapes alone."""
    from plan import estimate_memory
    est = estimate_memory(ModelConfig.from_name("tinyllama_1b"), batch_size=1, seq_len=256, lora_r=64,
                          weight_bytes=2, base_bytes=2)
    full, lora, qlora = est["full"], est["lora"], est["qlora"]
    assert est["params"] == 1_100_048_384
    assert full["weights"] == 2 * 1_100_048_384 and full["optimizer"] == 8 * 1_100_048_384
    # LoRA r=64 on all 7 projections: 22 layers x 64 x (2*(2048+2048) + 2*(256+2048) + 3*(5632+2048))
    assert est["lora_params"] == 22 * 64 * (2 * 4096 + 2 * 2304 + 3 * 7680) == 50_462_720
    # NF4 + DQ: 4 bits + 8/64 + 32/(64*256) bits per block-linear weight (QLoRA section 3), +-0.01%
    block = 1_100_048_384 - 2 * 32000 * 2048 - 45 * 2048
    assert qlora["base"] == pytest.approx(block * (4 + 8 / 64 + 32 / 64 / 256) / 8 + (1_100_048_384 - block) * 2,
                                          rel=1e-4)
    assert qlora["optimizer"] == lora["optimizer"] == 8 * 50_462_720 and qlora["weights"] == 4 * 50_462_720
    assert qlora["total"] < lora["total"] < full["total"]


# ----------------------------------------------------------------------------- train.py / sample.py
@pytest.fixture(scope="module")
def base_run(char_dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("base"))
    run_train(["--out_dir", out, "--max_iters", "20", "--eval_interval", "20"], char_dataset)
    return out


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_train_peft_checkpoint_and_exact_resume(method, base_run, char_dataset, tmp_path):
    from checkpoint import load_checkpoint
    args = ["--init_from", base_run, "--peft", method, "--lora_r", "2", "--lora_targets", "all",
            "--prefix_len", "3", "--prefix_hidden", "16",
            "--eval_interval", "3", "--warmup_iters", "0", "--learning_rate", "1e-2", "--lr_decay_iters", "6"]
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    run_train(args + ["--out_dir", straight, "--max_iters", "6"], char_dataset)
    run_train(args + ["--out_dir", split, "--max_iters", "3"], char_dataset)
    run_train(["--out_dir", split, "--resume", "--max_iters", "6"], char_dataset)
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a["base"] == os.path.abspath(base_run) and a["peft"]["peft"] == method and a["iter_num"] == 6
    assert all(("lora_" in n) if method == "lora" else n.startswith("prefix_encoder") for n in a["model"])
    assert a["history"]["val_loss"][-1] < a["history"]["val_loss"][0]  # the adapter learns
    assert a["model"].keys() == b["model"].keys()
    for n in a["model"]:
        assert torch.equal(a["model"][n], b["model"][n]), n  # bit-identical resume
    assert os.path.exists(os.path.join(straight, "adapter", "adapter_config.json"))
    run = subprocess.run([sys.executable, "sample.py", "--out_dir", base_run, "--adapter", straight,
                          "--max_new_tokens", "5", "--prompt", "def"], cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("def"), run.stderr[-1000:]
    # the run's out_dir alone is enough: its checkpoint points to the base
    with_adapter = runs.load_run(straight)[0]
    assert isinstance(with_adapter.layers[0].attention.wq, peft.LoRALinear) if method == "lora" else \
        with_adapter.prefix_encoder is not None


def test_sample_puts_a_qlora_adapter_on_an_nf4_base(base_run, char_dataset, tmp_path):
    import quant
    out = str(tmp_path / "qlora")
    run_train(["--init_from", base_run, "--peft", "qlora", "--lora_r", "2", "--out_dir", out, "--max_iters", "2",
               "--eval_interval", "2"], char_dataset)
    model, _, ckpt = runs.load_run(out)
    assert ckpt["train_config"]["peft"] == "qlora" and quant.quantization_method(model) == "nf4-dq"
    assert isinstance(model.layers[0].feed_forward.w2.base, quant.NF4Linear)


def test_a_peft_run_on_an_uptrained_gqa_model_samples_as_it_trained(base_run, char_dataset, tmp_path):
    """LoRA on a base converted from 2 kv heads to 1 (--kv_init mean): the adapter fits the
    converted model, which sample.py rebuilds from the base as --resume does."""
    out = str(tmp_path / "mqa_lora")
    run_train(["--init_from", base_run, "--peft", "lora", "--lora_targets", "k,v", "--n_kv_head", "1",
               "--kv_init", "mean", "--out_dir", out, "--max_iters", "2", "--eval_interval", "2"], char_dataset)
    model = runs.load_run(out)[0]
    assert model.config.n_kv_head == 1 and model.layers[0].attention.wk.lora_B.shape == (8, 8)


def test_peft_needs_init_from():
    from train import parse_args
    with pytest.raises(ValueError, match="--peft lora fine-tunes a pretrained model: give it with --init_from"):
        parse_args(["--peft", "lora"])
    with pytest.raises(ValueError, match="--peft must be one of '', 'lora', 'prefix', 'qlora', got 'adapters'"):
        parse_args(["--peft", "adapters", "--init_from", "x"])


@pytest.mark.slow  # the experiment: the slow set (conftest.py)
def test_finetune_experiment_quick(tmp_path):
    verse = tmp_path / "verse.txt"  # a stand-in for Tiny Shakespeare, which CI may not have offline
    verse.write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n" * 300)
    run = subprocess.run([sys.executable, "experiments/finetune.py", "--quick", "--corpus", str(verse)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**ONE_THREAD, "EXPERIMENTS_OUT": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "finetune_quick.json").read_text())
    by_name = {r["name"]: r for r in result["runs"]}
    assert {"full", "prefix", "qlora_r8", "lora_qv_r2", "lora_all_r2"} <= set(by_name)
    assert by_name["full"]["val_loss"] < result["base_val_loss"]  # fine-tuning helps on the new corpus
    assert by_name["lora_qv_r2"]["trainable"] < by_name["lora_all_r2"]["trainable"] < by_name["full"]["trainable"]
    assert result["merge_error"]["float32"]["logits"] < 1e-4 < result["merge_error"]["nf4"]["logits"]


def test_prepare_reuses_a_tokenizer(tmp_path):
    from data.prepare import prepare
    from data.tokenizer import load_tokenizer
    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n" * 50)
    (tmp_path / "b.txt").write_text("To be, or not to be: that is the question.\n" * 20)
    first = prepare(str(tmp_path / "a.txt"), "bpe", vocab_size=270, out=str(tmp_path / "a"), verbose=False)
    second = prepare(str(tmp_path / "b.txt"), out=str(tmp_path / "b"), tokenizer_from=first, verbose=False)
    assert (tmp_path / "a" / "tokenizer.tiktoken").read_bytes() == (tmp_path / "b" / "tokenizer.tiktoken").read_bytes()
    tok = load_tokenizer(second)
    assert tok.n_vocab == 270 and tok.decode(tok.encode("that is the question")) == "that is the question"
    with pytest.raises(FileNotFoundError, match="no meta.json there"):
        prepare(str(tmp_path / "b.txt"), tokenizer_from=str(tmp_path / "nowhere"))
