"""Every exchange with Hugging Face: Llama checkpoints (transformers' LlamaForCausalLM)
and LoRA adapters (the PEFT library's adapter_model.safetensors + adapter_config.json).

Our module names follow Meta's llama (wq wk wv wo, w1 w2 w3); `HF_NAMES` maps them to
Hugging Face's once, and every name below is derived from it. Nothing here is needed to
train or sample our own checkpoints: this file is the door to the rest of the ecosystem.
"""

import json
import os
import re

import torch

from checkpoint import read_json, save_tensors, write_json
from model import ModelConfig, Transformer
from peft import TARGETS, LoRALinear, apply_lora, lora_layers

# ----------------------------------------------------------------------------- Llama checkpoints
# Our module names -> Hugging Face LlamaForCausalLM's (the glossary above, in code).
HF_NAMES = {
    "tok_embeddings": "model.embed_tokens",
    "norm": "model.norm",
    "output": "lm_head",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}


def hf_module_name(name):
    """'layers.3.attention.wq' -> 'model.layers.3.self_attn.q_proj' (also for '...wq.weight')."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+?)(\.weight)?", name)
    if m:
        return f"model.layers.{m[1]}.{HF_NAMES[m[2]]}{m[3] or ''}"
    m = re.fullmatch(r"(.+?)(\.weight)?", name)
    return HF_NAMES[m[1]] + (m[2] or "")


def config_from_hf(hf, path="config.json"):
    """A Hugging Face config.json dict -> ModelConfig. Every field that changes the math is
    read or refused, in each spelling transformers writes (RoPE as `rope_parameters`,
    `rope_scaling` or a top-level `rope_theta`); a missing or ill-typed field is one line
    naming the file and the field."""
    if not isinstance(hf, dict):
        raise ValueError(f"{path} is not a JSON object")
    arch = hf.get("architectures") or [hf.get("model_type", "?")]
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
        raise ValueError(f"{path}: unsupported architecture {arch[0]!r} (model_type {hf.get('model_type')!r}): "
                         f"this loader reads Llama-format checkpoints (LlamaForCausalLM)")

    def field(name, kind, default=None):
        value = hf.get(name, default)
        if value is None:
            raise ValueError(f"{path}: field {name!r} is missing")
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise ValueError(f"{path}: field {name!r} must be {kind.__name__}, got {value!r}")
        return value

    # both spellings, with transformers' precedence: a rope_scaling, when there is one, replaces rope_parameters
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    problems = []
    if field("hidden_act", str, "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (only 'silu', SwiGLU)")
    if field("attention_bias", bool, False) or field("mlp_bias", bool, False):
        problems.append("biases in attention or MLP (this model has none)")
    if field("attention_dropout", float, 0.0):
        problems.append(f"attention_dropout={hf['attention_dropout']} (dropout on attention weights)")
    if rope.get("rope_type", rope.get("type")) not in (None, "default"):
        problems.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} (only plain RoPE)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={rope['partial_rotary_factor']} (RoPE on every feature only)")
    n_embd, n_head = field("hidden_size", int), field("num_attention_heads", int)
    head_dim = hf.get("head_dim") or n_embd // n_head
    if head_dim * n_head != n_embd:
        problems.append(f"head_dim={head_dim} with hidden_size != num_attention_heads * head_dim")
    if problems:
        raise ValueError(f"{path}: unsupported Llama variant: " + "; ".join(problems))
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ValueError(f"{path}: field 'rope_theta' must be float, got {theta!r}")
    try:
        return ModelConfig(
            vocab_size=field("vocab_size", int), block_size=field("max_position_embeddings", int, 2048),
            n_layer=field("num_hidden_layers", int), n_embd=n_embd, n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") and field("num_key_value_heads", int) or n_head,
            intermediate_size=field("intermediate_size", int), rope_theta=float(theta),
            norm_eps=float(field("rms_norm_eps", float, 1e-6)),
            tie_embeddings=field("tie_word_embeddings", bool, False))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def config_to_hf(config, dtype=torch.float32):
    if config.parallel_block:
        raise ValueError("a parallel_block model has no Hugging Face Llama equivalent; train it serial to export")
    if config.sparse_local or config.sparse_stride:
        raise ValueError("a sparse-attention model has no Hugging Face Llama equivalent (it attends to other "
                         "positions); export a dense one (sparse_local=0, sparse_stride=0)")
    if config.bitlinear:
        raise ValueError("a bitlinear (BitNet) model has no Hugging Face Llama equivalent: its linear layers "
                         "binarize weights and quantize activations in the forward pass; export a model "
                         "trained with bitlinear=False")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "max_position_embeddings": config.block_size,
        "num_hidden_layers": config.n_layer, "hidden_size": config.n_embd,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim, "intermediate_size": config.intermediate_size,
        "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None, "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": None, "eos_token_id": None,
    }


def load_hf_state_dict(path):
    """All tensors of a Hugging Face checkpoint directory, by their HF names.

    Reads model.safetensors, sharded *.safetensors listed in model.safetensors.index.json,
    or pytorch_model.bin (with weights_only=True: no code from the file runs).
    """
    from safetensors.torch import load_file

    def shards(index_name):
        with open(os.path.join(path, index_name)) as f:
            return sorted(set(json.load(f)["weight_map"].values()))

    if os.path.exists(os.path.join(path, "model.safetensors")):
        return load_file(os.path.join(path, "model.safetensors"))
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        state = {}
        for shard in shards("model.safetensors.index.json"):
            state.update(load_file(os.path.join(path, shard)))
        return state
    bins = (["pytorch_model.bin"] if os.path.exists(os.path.join(path, "pytorch_model.bin")) else
            shards("pytorch_model.bin.index.json") if os.path.exists(os.path.join(path, "pytorch_model.bin.index.json"))
            else [])
    if not bins:
        raise FileNotFoundError(f"no model.safetensors, sharded safetensors or pytorch_model.bin in {path}")
    state = {}
    for name in bins:
        state.update(torch.load(os.path.join(path, name), map_location="cpu", weights_only=True))
    return state


def _resolve_hf_path(path):
    if os.path.isdir(path):
        return path
    try:  # a Hub id such as "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T" (needs the internet)
        from huggingface_hub import snapshot_download
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    except Exception as e:
        raise FileNotFoundError(f"{path!r} is not a local Hugging Face checkpoint directory, and downloading it "
                                f"from the Hub failed ({type(e).__name__}: {e})") from None


def load_llama(path, dtype=torch.float32, device="cpu"):
    """Load a Llama-format Hugging Face checkpoint directory (or Hub id) as a Transformer."""
    path = _resolve_hf_path(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: a Hugging Face checkpoint directory has a config.json")
    config = config_from_hf(read_json(config_path, "a Hugging Face checkpoint directory has one"), config_path)
    theirs = load_hf_state_dict(path)
    with torch.device("meta"):
        model = Transformer(config)
    ours = {}
    for name in model.state_dict():
        if config.tie_embeddings and name == "output.weight":
            continue  # the same tensor as tok_embeddings.weight
        hf = hf_module_name(name)
        if hf not in theirs:
            raise ValueError(f"{path}: tensor {hf!r} is missing from the checkpoint")
        if theirs[hf].shape != model.state_dict()[name].shape:
            raise ValueError(f"{path}: tensor {hf!r} has shape {tuple(theirs[hf].shape)} but config.json implies "
                             f"{tuple(model.state_dict()[name].shape)}")
        ours[name] = theirs.pop(hf).to(dtype)
    if config.tie_embeddings:
        theirs.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    leftover = [k for k in theirs if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"{path}: unexpected tensors not in a Llama model: {leftover[:5]}")
    model.load_state_dict(ours, assign=True, strict=not config.tie_embeddings)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.reset_rope()
    return model.to(device)


def save_llama(model, path, dtype=None):
    """Write `model` as a Hugging Face Llama checkpoint: config.json + model.safetensors.

    Each file is written atomically (checkpoint.atomic_write).
    """
    config = model.config
    dtype = dtype or model.tok_embeddings.weight.dtype
    hf_config = config_to_hf(config, dtype)
    tensors = {}
    for name, t in model.state_dict().items():
        if config.tie_embeddings and name == "output.weight":
            continue  # tied: Hugging Face stores the shared matrix once, as embed_tokens
        tensors[hf_module_name(name)] = t.detach().to("cpu", dtype).contiguous()
    save_tensors(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    write_json(hf_config, os.path.join(path, "config.json"))



# ----------------------------------------------------------------------------- LoRA adapters (HF PEFT layout)
def hf_lora_name(name):
    """'layers.0.attention.wq.lora_A' -> 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'."""
    module, _, which = name.rpartition(".")
    return f"base_model.model.{hf_module_name(module)}.{which}.weight"


def save_lora(model, path, base_path=""):
    """adapter_config.json + adapter_model.safetensors as HF PEFT writes them, names matching
    the model that hf.save_llama exports; each file written atomically."""
    cfg = getattr(model, "peft_config", None)
    if not cfg or cfg["peft"] != "lora":
        raise ValueError("the model has no LoRA adapters to save; call apply_lora first")
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            for which in ("lora_A", "lora_B"):
                tensors[hf_lora_name(f"{name}.{which}")] = getattr(m, which).detach().cpu().contiguous()
    hf_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["r"], "lora_alpha": cfg["alpha"],
                 "lora_dropout": cfg["dropout"], "bias": "none", "fan_in_fan_out": False,
                 "target_modules": sorted(HF_NAMES[TARGETS[t]].rpartition(".")[2] for t in cfg["targets"]),
                 "base_model_name_or_path": base_path, "inference_mode": True, "use_rslora": False,
                 "use_dora": False, "init_lora_weights": True, "modules_to_save": None}
    save_tensors(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json(hf_config, os.path.join(path, "adapter_config.json"))


def read_lora_config(path):
    """adapter_config.json of an HF PEFT LoRA adapter, refusing what plain LoRA here cannot load."""
    hf_config = read_json(os.path.join(path, "adapter_config.json"), "an adapter directory holds adapter_config.json")
    if not isinstance(hf_config, dict):
        raise ValueError(f"{path}/adapter_config.json is not a JSON object")
    if hf_config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {hf_config.get('peft_type')!r} is not a LoRA adapter")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if hf_config.get(key):
            raise ValueError(f"{path}: {key}=true is not supported here (plain LoRA only)")
    if hf_config.get("bias", "none") != "none" or hf_config.get("rank_pattern") or hf_config.get("alpha_pattern"):
        raise ValueError(f"{path}: LoRA biases and per-layer rank/alpha patterns are not supported")
    for key, kind in (("r", int), ("lora_alpha", (int, float)), ("target_modules", (list, str))):
        if key not in hf_config:
            raise ValueError(f"{path}/adapter_config.json has no {key!r}: not a LoRA adapter config")
        if not isinstance(hf_config[key], kind) or isinstance(hf_config[key], bool):
            raise ValueError(f"{path}/adapter_config.json: {key} is {hf_config[key]!r}, not a "
                             f"{getattr(kind, '__name__', 'number' if key == 'lora_alpha' else 'list of names')}")
    if hf_config["r"] < 1 or hf_config["lora_alpha"] <= 0:
        raise ValueError(f"{path}/adapter_config.json: r must be >= 1 and lora_alpha > 0, got r={hf_config['r']}, "
                         f"lora_alpha={hf_config['lora_alpha']}")
    dropout = hf_config.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{path}/adapter_config.json: lora_dropout must be a number in [0, 1), got {dropout!r}")
    return hf_config


def targets_from_hf(modules, path):
    """HF target_modules (["q_proj", "v_proj"] or "all-linear") -> our short target names."""
    if modules == "all-linear":
        return "all"
    by_hf = {HF_NAMES[v].rpartition(".")[2]: k for k, v in TARGETS.items()}  # "q_proj" -> "q"
    modules = [modules] if isinstance(modules, str) else modules
    targets = [by_hf[m] for m in modules if m in by_hf]
    if not targets:
        raise ValueError(f"{path}: target_modules {modules} name none of this model's linear layers "
                         f"({', '.join(sorted(by_hf))})")
    return targets


def load_lora(model, path):
    """Load an HF PEFT LoRA adapter (ours or trained elsewhere); applies LoRA first if needed.
    Every tensor is checked before anything in the model changes."""
    from safetensors.torch import load_file

    hf_config = read_lora_config(path)
    r, alpha = hf_config["r"], hf_config["lora_alpha"]
    if not lora_layers(model):
        apply_lora(model, r, alpha, targets_from_hf(hf_config["target_modules"], path),
                   hf_config.get("lora_dropout", 0.0))
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    tensors = {k.replace(".default.", "."): v for k, v in tensors.items()}  # some writers keep the adapter name
    updates = []  # (parameter, tensor), copied once all of them are known to fit
    for name, m in model.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        if m.merged or m.r != r:
            raise ValueError(f"{path}: cannot load into {name}: " + ("it is merged; unmerge_lora first" if m.merged
                             else f"the adapter has rank r={r} but the model's LoRA layers have r={m.r}"))
        for which in ("lora_A", "lora_B"):
            key = hf_lora_name(f"{name}.{which}")
            if key not in tensors:
                raise ValueError(f"{path}: adapter tensor {key} is missing")
            t = tensors.pop(key)
            if t.shape != getattr(m, which).shape:
                raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, the model expects "
                                 f"{tuple(getattr(m, which).shape)}: was it trained on another base?")
            updates.append((getattr(m, which), t))
    if tensors:
        raise ValueError(f"{path}: adapter tensors for modules this model has no LoRA on: {sorted(tensors)[:3]}")
    with torch.no_grad():
        for param, t in updates:
            param.copy_(t)
    for m in lora_layers(model):  # the file's scale alpha / r
        m.alpha, m.scaling = alpha, alpha / r
    model.peft_config = {**model.peft_config, "alpha": alpha}
    return model




# ----------------------------------------------------------------------------- Llava (llava.py)
# transformers' LlavaForConditionalGeneration as save_pretrained writes it: vision_tower.* (a CLIP
# vision transformer), multi_modal_projector.linear_1/linear_2, language_model.* (a Llama,
# named through HF_NAMES). Our vision tower's module names -> CLIP's in transformers:
CLIP_VISION_NAMES = {
    "patch_embedding": "embeddings.patch_embedding", "class_embedding": "embeddings.class_embedding",
    "position_embedding": "embeddings.position_embedding.weight", "ln_pre": "pre_layrnorm",
    "ln_post": "post_layernorm", "ln_1": "layer_norm1", "ln_2": "layer_norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "out_proj": "self_attn.out_proj",
}
# other spellings of the same tensors -> save_pretrained's (transformers 5 in memory; llava-hf checkpoints)
LLAVA_ALIASES = [(r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
                 (r"^model\.vision_tower\.", "vision_tower."), (r"^vision_tower\.vision_model\.", "vision_tower."),
                 (r"^model\.multi_modal_projector\.", "multi_modal_projector.")]


def llava_hf_name(name):
    """'vision.layers.0.q_proj.weight' -> 'vision_tower.encoder.layers.0.self_attn.q_proj.weight';
    'llm.layers.0.attention.wq.weight' -> 'language_model.model.layers.0.self_attn.q_proj.weight'."""
    part, _, rest = name.partition(".")
    if part == "llm":
        return "language_model." + hf_module_name(rest)
    if part == "projector":
        return "multi_modal_projector." + rest
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)(\.weight|\.bias)?", rest)
    if m:
        return f"vision_tower.encoder.layers.{m[1]}.{CLIP_VISION_NAMES[m[2]]}{m[3] or ''}"
    module, _, param = rest.partition(".")
    hf = CLIP_VISION_NAMES[module]
    return f"vision_tower.{hf}" + ("" if hf.endswith(".weight") or not param else f".{param}")


def llava_config_from_hf(hf):
    """A LlavaConfig (config.json of LlavaForConditionalGeneration) -> the fields of
    llava.LlavaConfig, as plain data (llava.py builds the model: this file never imports it)."""
    if hf.get("model_type") != "llava":
        raise ValueError(f"model_type {hf.get('model_type')!r} is not 'llava' (LlavaForConditionalGeneration)")
    v, layer = hf["vision_config"], hf.get("vision_feature_layer", -2)
    problems = []
    if v.get("model_type", "clip_vision_model") != "clip_vision_model":
        problems.append(f"vision tower {v.get('model_type')!r} (only CLIP's)")
    if v.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
        problems.append(f"vision hidden_act {v['hidden_act']!r}")
    if hf.get("projector_hidden_act", "gelu") != "gelu" or not hf.get("multimodal_projector_bias", True):
        problems.append("a projector other than linear_1 -> GELU -> linear_2 with biases")
    if not isinstance(layer, int):
        problems.append(f"vision_feature_layer={layer} (one layer only)")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        problems.append(f"vision_feature_select_strategy={strategy!r}")
    if problems:
        raise ValueError("unsupported Llava variant: " + "; ".join(problems))
    vision = dict(image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
                  n_layer=v["num_hidden_layers"], n_head=v["num_attention_heads"], mlp_width=v["intermediate_size"],
                  norm_eps=v.get("layer_norm_eps", 1e-5), act=v.get("hidden_act", "quick_gelu"))
    text = {"model_type": "llama", **hf["text_config"]}
    return dict(vision=vision, llm=config_from_hf(text).to_dict(), projector="mlp", feature_layer=layer,
                drop_class_token=strategy == "default",
                image_token_id=hf.get("image_token_index", hf.get("image_token_id")))


def load_llava(path, build):
    """A transformers LlavaForConditionalGeneration directory -> the model that
    build(config fields) makes (llava.LlavaModel.from_hf passes its constructor), in fp32."""
    fields = llava_config_from_hf(read_json(os.path.join(path, "config.json"), "Llava config"))
    theirs = {}
    for name, t in load_hf_state_dict(path).items():
        for pattern, repl in LLAVA_ALIASES:
            name = re.sub(pattern, repl, name)
        theirs[name] = t
    model = build(fields)
    ours = {}
    for name in model.state_dict():
        if name == "llm.output.weight" and model.llm.config.tie_embeddings:
            continue
        key = llava_hf_name(name)
        if key not in theirs:
            raise ValueError(f"{path}: tensor {key!r} is missing from the checkpoint")
        ours[name] = theirs.pop(key).float()
    theirs.pop("language_model.lm_head.weight", None)
    if theirs:
        raise ValueError(f"{path}: unexpected tensors not in a Llava model: {sorted(theirs)[:5]}")
    model.load_state_dict(ours, strict=not model.llm.config.tie_embeddings)
    return model.eval()


def save_llava(model, path):
    """config.json + model.safetensors that transformers' LlavaForConditionalGeneration loads."""
    c, v = model.config, model.vision.config
    if c.projector != "mlp":
        raise ValueError("transformers' Llava has LLaVA-1.5's two-layer MLP projector only; a linear-projector "
                         "model (LLaVA's W) cannot be exported: train it with --projector mlp")
    text = {k: val for k, val in config_to_hf(model.llm.config).items() if k != "architectures"}
    hf_config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": c.image_token_id, "image_seq_length": model.n_image_tokens,
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "vision_feature_layer": c.feature_layer,
        "vision_feature_select_strategy": "default" if c.drop_class_token else "full",
        "tie_word_embeddings": model.llm.config.tie_embeddings, "text_config": text,
        "vision_config": {"model_type": "clip_vision_model", "image_size": v.image_size, "patch_size": v.patch_size,
                          "hidden_size": v.width, "num_hidden_layers": v.n_layer, "num_attention_heads": v.n_head,
                          "intermediate_size": v.mlp_width, "layer_norm_eps": v.norm_eps, "hidden_act": v.act,
                          "num_channels": 3},
    }
    tensors = {llava_hf_name(n): t for n, t in model.state_dict().items()
               if not (n == "llm.output.weight" and model.llm.config.tie_embeddings)}
    save_tensors(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    write_json(hf_config, os.path.join(path, "config.json"))
