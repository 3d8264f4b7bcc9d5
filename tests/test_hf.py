"""Parity with transformers' LlamaForCausalLM: load, export, greedy decoding (the oracle)."""

import json
import os

import pytest
import torch

from conftest import tiny_config
import hf
from hf import config_from_hf
from model import Transformer

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle: pip install transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

VARIANTS = {  # n_kv_head, tie_embeddings, rope_theta
    "mha": (4, False, 10000.0),
    "gqa": (2, False, 10000.0),
    "mqa": (1, False, 10000.0),
    "gqa-tied": (2, True, 10000.0),
    "mha-tied-theta5e5": (4, True, 500000.0),
    "mqa-theta1e6": (1, False, 1e6),
}


def hf_model(n_kv_head, tie, theta, **kw):
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=n_kv_head, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_theta=theta, tie_word_embeddings=tie, **kw)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # HF initializes norms to 1: randomize them so the mapping is really tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_load_hf_checkpoint_gives_the_same_logits(variant, tmp_path):
    theirs = hf_model(*VARIANTS[variant])
    theirs.save_pretrained(tmp_path)
    ours = hf.load_llama(str(tmp_path)).eval()
    idx = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        diff = (ours(idx)[0] - theirs(idx).logits).abs().max().item()
    assert diff < 1e-4
    assert ours.config.rope_theta == VARIANTS[variant][2]
    assert ours.config.tie_embeddings == VARIANTS[variant][1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_checkpoint_loads_in_transformers(variant, tmp_path):
    n_kv_head, tie, theta = VARIANTS[variant]
    ours = Transformer(tiny_config(n_kv_head=n_kv_head, tie_embeddings=tie, rope_theta=theta)).eval()
    hf.save_llama(ours, str(tmp_path))
    theirs = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert theirs.config.num_key_value_heads == n_kv_head
    idx = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        assert (ours(idx)[0] - theirs(idx).logits).abs().max().item() < 1e-4
    again = hf.load_llama(str(tmp_path))  # and back, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("variant", ["gqa", "mqa-theta1e6", "gqa-tied"])
def test_greedy_decoding_matches_transformers_generate(variant, tmp_path):
    theirs = hf_model(*VARIANTS[variant])
    theirs.save_pretrained(tmp_path)
    ours = hf.load_llama(str(tmp_path)).eval()
    idx = torch.randint(0, 97, (1, 6))
    theirs = theirs.generate(idx, max_new_tokens=40, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(idx, 40, temperature=0), theirs)


def test_sharded_checkpoint_loads(tmp_path):
    theirs = hf_model(2, False, 10000.0)
    theirs.save_pretrained(tmp_path, max_shard_size="60KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = hf.load_llama(str(tmp_path)).eval()
    idx = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        assert (ours(idx)[0] - theirs(idx).logits).abs().max().item() < 1e-4


def test_bf16_checkpoint_loads_as_fp32(tmp_path):
    theirs = hf_model(2, False, 10000.0).to(torch.bfloat16)
    theirs.save_pretrained(tmp_path)
    ours = hf.load_llama(str(tmp_path))
    assert ours.tok_embeddings.weight.dtype == torch.float32
    assert torch.equal(ours.tok_embeddings.weight, theirs.model.embed_tokens.weight.float())


def test_unsupported_architectures_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        config_from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    base = json.loads(LlamaConfig(hidden_size=64, num_attention_heads=4).to_json_string())
    with pytest.raises(ValueError, match="rope scaling 'llama3'"):
        config_from_hf({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}})
    with pytest.raises(ValueError, match="biases"):
        config_from_hf({**base, "attention_bias": True})
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_llama(str(tmp_path))
