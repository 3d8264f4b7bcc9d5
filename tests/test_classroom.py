"""The classroom pieces: MHA -> GQA conversion (uptraining), sparse attention masks, and
every experiment script's --quick smoke run."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_config
from model import Transformer, convert_kv_heads
from checkpoint import load_checkpoint
from train import parse_args, train


def model_with_identical_heads_per_group(n_head, groups):
    """An MHA model whose kv heads are equal within each future group of n_head // groups."""
    model = Transformer(tiny_config(n_head=n_head, n_kv_head=n_head, n_embd=64))
    hd = model.config.head_dim
    for layer in model.layers:
        for w in (layer.attention.wk.weight, layer.attention.wv.weight):
            heads = w.data.view(groups, n_head // groups, hd, -1)
            heads[:] = heads[:, :1].clone()  # every head of a group = the group's first
    return model


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("method", ["mean", "first"])
def test_converting_identical_heads_changes_no_logit(n_kv_head, method):
    model = model_with_identical_heads_per_group(8, n_kv_head)
    idx = torch.randint(97, (2, 16))
    converted = convert_kv_heads(model, n_kv_head, method)
    assert converted.config.n_kv_head == n_kv_head
    assert converted.layers[0].attention.wk.weight.shape == (n_kv_head * 8, 64)
    assert torch.allclose(model(idx)[0], converted(idx)[0], atol=1e-5)


def test_mean_pools_the_heads_that_share_a_group():
    model = Transformer(tiny_config(n_head=4, n_kv_head=4))  # head_dim 16
    gqa = convert_kv_heads(model, 2, "mean")
    w, v = model.layers[1].attention.wv.weight, gqa.layers[1].attention.wv.weight
    # query heads 0, 1 read new kv head 0 (h // 2): the mean of old heads 0 and 1
    assert torch.allclose(v[:16], (w[:16] + w[16:32]) / 2) and torch.allclose(v[16:], (w[32:48] + w[48:]) / 2)
    first = convert_kv_heads(model, 1, "first").layers[1].attention.wv.weight
    assert torch.equal(first, w[:16])
    assert torch.equal(gqa.layers[1].attention.wq.weight, model.layers[1].attention.wq.weight)  # queries kept


def test_convert_refuses_a_grouping_that_does_not_divide():
    with pytest.raises(ValueError, match="must divide 4"):
        convert_kv_heads(Transformer(tiny_config(n_head=4, n_kv_head=4)), 3)
    with pytest.raises(ValueError, match="method must be"):
        convert_kv_heads(Transformer(tiny_config(n_head=4, n_kv_head=4)), 2, "median")


def test_train_uptrains_an_mha_checkpoint(char_dataset, tmp_path):
    tiny = ["--dataset", char_dataset, "--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--block_size", "32",
            "--batch_size", "2", "--eval_iters", "1"]
    train(*parse_args(tiny + ["--n_kv_head", "4", "--out_dir", str(tmp_path / "mha"), "--max_iters", "2"]))
    with pytest.raises(ValueError, match="--kv_init mean"):
        train(*parse_args(tiny + ["--init_from", str(tmp_path / "mha"), "--n_kv_head", "2",
                                  "--out_dir", str(tmp_path / "x")]))
    train(*parse_args(tiny + ["--init_from", str(tmp_path / "mha"), "--n_kv_head", "2", "--kv_init", "mean",
                              "--out_dir", str(tmp_path / "gqa"), "--max_iters", "0"]))
    mha = load_checkpoint(str(tmp_path / "mha"))
    gqa = load_checkpoint(str(tmp_path / "gqa"))
    assert gqa["model_config"]["n_kv_head"] == 2
    from model import ModelConfig
    expected = Transformer(ModelConfig.from_dict(mha["model_config"]))
    expected.load_state_dict(mha["model"])
    expected = convert_kv_heads(expected, 2, "mean").state_dict()
    assert all(torch.equal(expected[k], v) for k, v in gqa["model"].items())


# ----------------------------------------------------------------------------- sparse attention
def test_sparse_mask_is_causal_local_and_strided():
    from attention import causal_mask, sparse_causal_mask
    m = sparse_causal_mask(16, 16, local=3, stride=4)
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    assert not m[j > i].any()  # never the future
    assert m[(i - j >= 0) & (i - j < 3)].all()  # the local band
    assert m[(i - j >= 0) & ((i - j) % 4 == 0)].all()  # the strided columns
    assert m.sum() < causal_mask(16, 16).sum()  # sparser than dense
    assert torch.equal(sparse_causal_mask(4, 10, 3, 4), sparse_causal_mask(10, 10, 3, 4)[6:])  # bottom-right


def test_sparse_model_paths_agree_and_the_cache_works():
    sparse = dict(sparse_local=4, sparse_stride=5)
    a = Transformer(tiny_config(**sparse, attn_impl="math")).eval()
    b = Transformer(tiny_config(**sparse)).eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(97, (2, 40))
    assert torch.allclose(a(idx)[0], b(idx)[0], atol=1e-5)  # math vs SDPA, the same mask
    dense = Transformer(tiny_config()).eval()
    dense.load_state_dict(a.state_dict())
    assert not torch.allclose(a(idx)[0][:, -1], dense(idx)[0][:, -1], atol=1e-3)  # it does change attention
    prompt = idx[:1, :8]
    cached = b.generate(prompt, 20, temperature=0)
    uncached = prompt
    for _ in range(20):
        uncached = torch.cat([uncached, b(uncached)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, uncached)


# ----------------------------------------------------------------------------- experiments
@pytest.mark.slow  # 10-30 s each on an idle 2-core CPU
@pytest.mark.parametrize("name", ["gqa_uptrain", "parallel_block", "sparse_attention", "scaling_laws", "visualize",
                                  "distill_draft"])
def test_experiment_quick_run(name, tmp_path):
    """Each classroom experiment trains end to end at tiny sizes (in a fresh folder, so no
    cached run is reused) and writes its JSON and PNG."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EXPERIMENTS_OUT": str(tmp_path)}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", f"{name}.py"), "--quick"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / f"{name}_quick.png").stat().st_size > 10_000
    result = json.loads((tmp_path / f"{name}_quick.json").read_text())
    if name == "gqa_uptrain":
        assert {(row["n_kv_head"], row["method"]) for row in result["converted"]} == \
            {(g, m) for g in (2, 1) for m in ("mean", "first", "random")}
        kv_bytes = [row["kv_bytes_per_token"] for row in result["decode"]]  # 4, 2, 1 kv heads
        assert kv_bytes == [kv_bytes[0], kv_bytes[0] // 2, kv_bytes[0] // 4]
    elif name == "parallel_block":
        # at initialization both predict nearly uniformly: within 0.5 nats of log(vocab) after 4 steps
        assert all(abs(result[k]["val_loss"] - math.log(128)) < 0.5 for k in ("serial", "parallel"))
    elif name == "sparse_attention":
        assert 0 < result["density_vs_causal"] < 1
    elif name == "scaling_laws":
        assert len(result["models"]) >= 2 and -2 < result["fit"]["alpha"] < 2  # a power law's exponent
    elif name == "distill_draft":
        assert result["identical_to_greedy"] is True  # every speculative output was plain greedy's
        assert list(result["drafts"]) == ["prompt lookup", "pretrained", "more pretraining", "distilled",
                                          "on-policy KL"]
        for row in (r for d in result["drafts"].values() for r in d["speculative"]):
            # a target pass emits between one token and k + 1 (k accepted drafts and its own)
            assert all(1 / (int(k) + 1) <= v["passes_per_token"] <= 1 for k, v in row.items())
    elif name == "visualize":
        freqs = result["rope_inv_freq"]  # theta_i = 10000^(-2i/d): 1 radian per position, then falling
        assert freqs[0] == 1.0 and all(a > b for a, b in zip(freqs, freqs[1:]))
