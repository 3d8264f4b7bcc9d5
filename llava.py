"""LLaVA in miniature: a CLIP-style vision encoder, a projector, and two-stage visual
instruction tuning of our decoder, on scenes of coloured shapes drawn with numpy (data/scenes.py).

Papers:
  - LLaVA (Liu et al., arXiv:2304.08485) section 3: instruction data of three kinds
    (conversation, detailed description, complex reasoning); section 4.1: image features
    Z_v = g(X_v) from a frozen CLIP ViT, H_v = W Z_v, a linear layer into the word
    embedding space; the image goes before or after the first question at random; the
    loss covers the assistant's answers only (eq. 3). Section 4.2: stage 1 (feature
    alignment: only W trains, on captions), stage 2 (end-to-end: W and the LLM train).
  - LLaVA-1.5 (Liu et al., arXiv:2310.03744) section 3.2: a two-layer GELU MLP projector,
    patch features of the penultimate layer, the class token dropped.
  - CLIP (Radford et al., arXiv:2103.00020) section 2.3 and Figure 3: the symmetric
    contrastive loss; section 2.4: the ViT with an extra LayerNorm before the blocks;
    quick-GELU x * sigmoid(1.702 x) as in OpenAI's code; section 3.1.2: zero-shot
    classification by the caption whose embedding is nearest.

    image (3, 30, 30) --ViT--> (1 + 9, D) --penultimate layer, drop class token--> (9, D)
        --projector--> (9, n_embd) -- put where the 9 <image> tokens stand in input_ids
    "USER: <image> x9  what colour is the circle ? ASSISTANT: red . </s>"  -> decoder

Deviations, for size: CLIP's text tower is our decoder (RoPE, RMSNorm, SwiGLU) read at the caption's
</s> rather than CLIP's GPT-2-style one; the language model is pretrained here on the
conversations' text alone (a Vicuna stand-in); the words come from a word-level vocabulary
of the scene grammar.

    python llava.py --out_dir out/llava                 # the whole pipeline, minutes on a CPU
    python llava.py --out_dir out/llava --peft lora     # stage 2 with LoRA on the decoder
    python sample.py --out_dir out/llava --image scene.png --prompt "What colour is the circle?"
"""

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hf
import peft
from checkpoint import load_checkpoint, lock_out_dir, save_checkpoint, unlock_out_dir
from cli import Number, Parser
from data.scenes import (BRIEF, COLOURS, COLUMNS, IMAGE_SIZE, KINDS, NUMBERS, SHAPES, SIZES, caption, caption_turn,
                         clip_batch, conversation, draw, random_scene, write_png)
from model import ModelConfig, Transformer, sample_next
from runs import check_run_kind, exit_with_error, free_out_dir

# ----------------------------------------------------------------------------- words -> token ids
SPECIALS = ("<pad>", "<image>", "</s>", "USER:", "ASSISTANT:")
TOKEN_RE = re.compile(r"<image>|</s>|user:|assistant:|[a-z]+|[^\sa-z]")  # on lowercased text


class WordTokenizer:
    """One token per word or punctuation mark of the scene grammar; lowercases its input."""

    def __init__(self, vocab):
        self.vocab = list(vocab)
        self.stoi = {w: i for i, w in enumerate(self.vocab)}
        self.n_vocab = len(self.vocab)
        self.eot_token = self.stoi["</s>"]
        self.image_token = self.stoi["<image>"]
        self.pad_token = self.stoi["<pad>"]

    def encode(self, text):
        words = [{"user:": "USER:", "assistant:": "ASSISTANT:"}.get(w, w) for w in TOKEN_RE.findall(text.lower())]
        unknown = [w for w in words if w not in self.stoi]
        if unknown:
            raise ValueError(f"the words {unknown[:5]} are not in this model's vocabulary of {self.n_vocab} words "
                             f"(it knows the scene grammar: colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)})")
        return [self.stoi[w] for w in words]

    def decode(self, ids):
        text = " ".join(self.vocab[i] for i in ids)
        return re.sub(r" ([.,?])", r"\1", text)


def build_vocab():
    """Every word the grammar can produce (found by generating many scenes), specials first."""
    rng, words = np.random.default_rng(0), set(COLOURS) | set(SHAPES) | set(SIZES) | set(COLUMNS) | set(NUMBERS)
    texts = list(BRIEF)
    for _ in range(300):
        scene = random_scene(rng)
        texts += [caption(scene, rng)] + [t for q, a, _ in conversation(scene, rng, 3) for t in (q, a)]
    for t in texts:
        words |= set(TOKEN_RE.findall(t))
    return list(SPECIALS) + sorted(words - set(SPECIALS))


def encode_conversation(tok, turns, n_patches, image_first=True, with_image=True):
    """(ids, targets, kinds) of a conversation in Vicuna-v1's template (LLaVA-1.5):

        USER: <image> q1 ASSISTANT: a1 </s> USER: q2 ASSISTANT: a2 </s>
        (or q1 <image> in the first turn: LLaVA section 4 places the image at random)

    targets are -100 except on the answers and their </s> (LLaVA eq. 3); kinds[t] names
    the question kind that token t answers. <image> is repeated once per visual token.
    """
    ids, targets, kinds = [], [], []
    for i, (q, a, kind) in enumerate(turns):
        user = tok.encode(q)
        if i == 0 and with_image:
            image = [tok.image_token] * n_patches
            user = image + user if image_first else user + image
        prompt = [tok.stoi["USER:"]] + user + [tok.stoi["ASSISTANT:"]]
        answer = tok.encode(a) + [tok.eot_token]
        ids += prompt + answer
        targets += [-100] * len(prompt) + answer
        kinds += [None] * len(prompt) + [kind] * len(answer)
    return ids, targets, kinds


def encode_prompt(tok, prompt, n_images, n_patches):
    """A user's prompt for sampling: '<image>' placed first unless the prompt places it."""
    n_tags = prompt.count("<image>")
    if n_tags > n_images:
        raise ValueError(f"the prompt has {n_tags} <image> tags but {n_images} image(s) were given; "
                         f"give one --image per <image> tag")
    if n_tags == 0:
        prompt = "<image> " * n_images + prompt
    elif n_tags < n_images:
        raise ValueError(f"the prompt has {n_tags} <image> tag(s) but {n_images} images were given")
    ids = []
    for i in [tok.stoi["USER:"]] + tok.encode(prompt) + [tok.stoi["ASSISTANT:"]]:
        ids += [i] * (n_patches if i == tok.image_token else 1)  # one id per visual token, as transformers
    return ids


# ----------------------------------------------------------------------------- images -> pixel values
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's preprocessing (and its HF processor's)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pixel_values(images):
    """uint8 (..., H, W, 3) -> CLIP-normalized float (..., 3, H, W)."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32) / 255.0
    x = (x - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    return x.movedim(-1, -3).contiguous()


# ----------------------------------------------------------------------------- the vision encoder (CLIP's ViT)
@dataclass
class VisionConfig:
    image_size: int = IMAGE_SIZE
    patch_size: int = 10
    width: int = 64
    n_layer: int = 4
    n_head: int = 4
    mlp_width: int = 256
    norm_eps: float = 1e-5
    act: str = "quick_gelu"

    @property
    def n_patches(self):
        return (self.image_size // self.patch_size) ** 2


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # CLIP's approximation of GELU


class VisionBlock(nn.Module):
    """Pre-LN transformer block with biases (ViT / CLIP): x + Attn(LN(x)); x + MLP(LN(x))."""

    def __init__(self, c):
        super().__init__()
        self.n_head = c.n_head
        self.ln_1 = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.q_proj, self.k_proj = nn.Linear(c.width, c.width), nn.Linear(c.width, c.width)
        self.v_proj, self.out_proj = nn.Linear(c.width, c.width), nn.Linear(c.width, c.width)
        self.ln_2 = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.fc1, self.fc2 = nn.Linear(c.width, c.mlp_width), nn.Linear(c.mlp_width, c.width)
        self.act = quick_gelu if c.act == "quick_gelu" else F.gelu

    def forward(self, x):  # (B, 1 + N, D)
        B, T, D = x.shape
        h = self.ln_1(x)
        q, k, v = (p(h).view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, n_head, T, hd)
        a = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch: no causal mask
        x = x + self.out_proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(self.act(self.fc1(self.ln_2(x))))


class VisionTransformer(nn.Module):
    """ViT in CLIP's layout: patches -> [class token; patches] + positions -> LN -> blocks."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.patch_embedding = nn.Conv2d(3, c.width, c.patch_size, stride=c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(c.width) * c.width ** -0.5)
        self.position_embedding = nn.Parameter(torch.randn(c.n_patches + 1, c.width) * 0.02)
        self.ln_pre = nn.LayerNorm(c.width, eps=c.norm_eps)  # CLIP section 2.4: the extra LayerNorm
        self.layers = nn.ModuleList(VisionBlock(c) for _ in range(c.n_layer))
        self.ln_post = nn.LayerNorm(c.width, eps=c.norm_eps)  # on the class token, for CLIP's embedding

    def forward(self, pixel_values):
        """(B, 3, H, W) -> the hidden states [after ln_pre, after block 1, ..., after block L], each (B, 1 + N, D)."""
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, N, D), patches row by row
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.position_embedding)  # (B, 1 + N, D)
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1]))
        return states


# ----------------------------------------------------------------------------- CLIP pretraining
def clip_loss(image_emb, text_emb, logit_scale):
    """CLIP's symmetric InfoNCE (Figure 3): pair i is the positive of row i and of column i.

        logits = exp(t) * norm(I) @ norm(T)^T            (B, B)
        loss = (CE(logits, arange) + CE(logits^T, arange)) / 2
    """
    image_emb = F.normalize(image_emb, dim=-1)  # (B, E)
    text_emb = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp() * image_emb @ text_emb.T  # (B, B): image i vs caption j
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class CLIP(nn.Module):
    """Image tower (the ViT) + text tower (our decoder, read at the caption's </s>, as CLIP's
    text transformer reads its [EOS]) and their linear projections into one space."""

    def __init__(self, vision_config, vocab_size, embed_dim=64):
        super().__init__()
        self.vision = VisionTransformer(vision_config)
        self.text = Transformer(ModelConfig(vocab_size=vocab_size, block_size=48, n_layer=2, n_embd=64, n_head=4,
                                            n_kv_head=4))
        self.visual_projection = nn.Linear(vision_config.width, embed_dim, bias=False)
        self.text_projection = nn.Linear(64, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature 0.07

    def encode_image(self, pixel_values):  # (B, 3, H, W) -> (B, E)
        return self.visual_projection(self.vision.ln_post(self.vision(pixel_values)[-1][:, 0]))

    def encode_text(self, ids, lengths):  # (B, T) padded captions ending in </s> -> (B, E)
        h = self.text.hidden_states(ids)  # (B, T, 64)
        return self.text_projection(h[torch.arange(len(ids)), lengths - 1])


def caption_batch(tok, captions):
    rows = [tok.encode(c) + [tok.eot_token] for c in captions]
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), tok.pad_token)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids, lengths


@torch.no_grad()
def zero_shot_accuracy(clip, tok, n=300, seed=1):
    """CLIP section 3.1.2 on held-out one-object scenes: the class whose prompt 'a red circle.'
    embeds nearest to the image; 20 classes (colour x shape), chance 5%."""
    rng = np.random.default_rng(10_000 + seed)
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    scenes = [random_scene(rng, 1) for _ in range(n)]
    images = pixel_values(np.stack([draw(s, rng) for s in scenes]))
    text = clip.encode_text(*caption_batch(tok, [f"a {c} {s}." for c, s in classes]))
    scores = F.normalize(clip.encode_image(images), dim=-1) @ F.normalize(text, dim=-1).T  # (n, 20)
    guess = [classes[i] for i in scores.argmax(-1).tolist()]
    truth = [(s[0]["colour"], s[0]["shape"]) for s in scenes]
    parts = {"colour and shape": slice(0, 2), "colour": slice(0, 1), "shape": slice(1, 2)}
    return {k: np.mean([g[p] == t[p] for g, t in zip(guess, truth)]).item() for k, p in parts.items()}


# ----------------------------------------------------------------------------- the projector and LLaVA
class Projector(nn.Module):
    """LLaVA's W (one linear layer) or LLaVA-1.5's MLP: linear_1 -> GELU -> linear_2 (HF's names)."""

    def __init__(self, kind, vision_width, n_embd):
        super().__init__()
        self.kind = kind
        self.linear_1 = nn.Linear(vision_width, n_embd)
        self.linear_2 = nn.Linear(n_embd, n_embd) if kind == "mlp" else None

    def forward(self, z):  # (B, N, D) -> (B, N, n_embd)
        h = self.linear_1(z)
        return h if self.linear_2 is None else self.linear_2(F.gelu(h))


@dataclass
class LlavaConfig:
    vision: dict = field(default_factory=lambda: asdict(VisionConfig()))
    llm: dict = field(default_factory=dict)  # a ModelConfig as a dict
    projector: str = "mlp"  # "linear" (LLaVA) or "mlp" (LLaVA-1.5)
    feature_layer: int = -2  # LLaVA-1.5: the penultimate layer's patch features
    drop_class_token: bool = True  # HF's vision_feature_select_strategy "default" (False: "full")
    image_token_id: int = 1

    def __post_init__(self):
        if self.projector not in ("linear", "mlp"):
            raise ValueError(f"projector must be 'linear' or 'mlp', got {self.projector!r}")


class LlavaModel(nn.Module):
    """Vision tower (frozen after CLIP) -> projector -> our decoder, image features in place
    of the <image> tokens."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision = VisionTransformer(VisionConfig(**config.vision))
        self.llm = Transformer(ModelConfig.from_dict(config.llm))
        self.projector = Projector(config.projector, self.vision.config.width, self.llm.config.n_embd)

    @property
    def n_image_tokens(self):
        return self.vision.config.n_patches + (0 if self.config.drop_class_token else 1)

    def image_features(self, pixel_values):
        """(B, 3, H, W) -> (B, N, n_embd): the chosen layer, class token dropped, projected."""
        z = self.vision(pixel_values)[self.config.feature_layer]  # (B, 1 + N, D)
        if self.config.drop_class_token:
            z = z[:, 1:]
        return self.projector(z)

    def input_embeds(self, input_ids, pixel_values=None):
        """Token embeddings (B, T, C) with image i's features written, in order, over the i-th run of
        image tokens (transformers' Llava: masked_scatter over input_ids == image_token_id)."""
        embeds = self.llm.tok_embeddings(input_ids)  # (B, T, C)
        is_image = input_ids == self.config.image_token_id  # (B, T)
        n_images = 0 if pixel_values is None else len(pixel_values)
        if int(is_image.sum()) != n_images * self.n_image_tokens:
            raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens but {n_images} image(s) give "
                             f"{n_images * self.n_image_tokens} ({self.n_image_tokens} per image)")
        if n_images == 0:
            return embeds
        features = self.image_features(pixel_values).to(embeds.dtype)  # (n_images, N, C)
        return embeds.masked_scatter(is_image[..., None], features)

    def forward(self, input_ids, pixel_values=None, targets=None):
        """(logits (B, T, vocab), loss over targets != -100 or None)."""
        return self.llm(input_ids, targets, input_embeds=self.input_embeds(input_ids, pixel_values))

    @torch.inference_mode()
    def generate_tokens(self, input_ids, pixel_values, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                        eos_id=None, generator=None):
        """Yield the next token (B,) per step: the prompt with its image read once into the KV cache."""
        caches = self.llm.new_kv_caches(len(input_ids))
        embeds = self.input_embeds(input_ids, pixel_values)
        logits, _ = self.llm(input_ids, caches=caches, input_embeds=embeds)
        T = input_ids.shape[1]
        for step in range(min(max_new_tokens, self.llm.config.block_size - T)):
            next_id = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
            yield next_id
            if eos_id is not None and bool((next_id == eos_id).all()):
                return
            logits, _ = self.llm(next_id[:, None], caches=caches, start_pos=T + step)

    @classmethod
    def from_hf(cls, path):
        """A transformers LlavaForConditionalGeneration directory (hf.py reads it)."""
        return hf.load_llava(path, lambda fields: cls(LlavaConfig(**fields)))

    def save_hf(self, path):
        """config.json + model.safetensors that transformers' LlavaForConditionalGeneration loads."""
        hf.save_llava(self, path)


# ----------------------------------------------------------------------------- training
@dataclass
class Settings:
    """The pipeline's sizes; --quick shrinks every step count for the smoke test."""
    n_train: int = 4000  # training scenes (held-out scenes come from another seed)
    n_eval: int = 300
    batch_size: int = 32
    clip_batch: int = 64
    clip_iters: int = 300
    clip_twins: bool = True  # hard negatives: each scene with its shape twin (data/scenes.clip_batch)
    text_iters: int = 150  # the language-only pretraining of the decoder (our Vicuna stand-in)
    stage1_iters: int = 100
    stage2_iters: int = 250
    lr: float = 2e-3
    n_layer: int = 3
    n_embd: int = 96
    seed: int = 0


QUICK = dict(n_train=64, n_eval=16, batch_size=8, clip_batch=16, clip_iters=3, text_iters=3, stage1_iters=3,
             stage2_iters=3, n_layer=1, n_embd=32)


def train_loop(params, loss_fn, iters, lr, label, log_every=100):
    """AdamW with linear warmup and cosine decay on `params` only; returns the loss history."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup, history, t0 = max(iters // 20, 1), [], time.perf_counter()
    for it in range(iters):
        for g in opt.param_groups:
            g["lr"] = lr * min((it + 1) / warmup, 0.5 * (1 + math.cos(math.pi * it / iters)))
        loss = loss_fn(it)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append(loss.item())
        if it % log_every == 0 or it == iters - 1:
            print(f"{label} {it:4d}/{iters}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    return history


def make_scenes(n, seed):
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return scenes, pixel_values(np.stack([draw(s, rng) for s in scenes]))  # (n, 3, H, W)


def chat_batch(tok, scenes, images, rng, batch_size, n_patches, turns_fn, with_image=True, all_tokens=False):
    """A padded batch of conversations: (ids (B, T), targets (B, T), pixel_values (B, 3, H, W)).
    targets: the answers only (LLaVA eq. 3), or every token but the padding (all_tokens)."""
    idx = rng.integers(len(scenes), size=batch_size)
    rows = [encode_conversation(tok, turns_fn(scenes[i], rng), n_patches, rng.random() < 0.5, with_image)
            for i in idx]
    T = max(len(r[0]) for r in rows)
    ids = torch.full((batch_size, T), tok.pad_token)
    targets = torch.full((batch_size, T), -100)
    for b, (x, y, _) in enumerate(rows):
        ids[b, :len(x)], targets[b, :len(y)] = torch.tensor(x), torch.tensor(x if all_tokens else y)
    # next-token prediction: the target at position t is the token at t + 1
    return ids[:, :-1], targets[:, 1:], images[torch.as_tensor(idx)]


def train_clip(tok, scenes, s):
    """CLIP pretraining on (image, caption) pairs, each image drawn afresh (new noise) from its scene;
    returns the CLIP model and its loss history."""
    clip = CLIP(VisionConfig(), tok.n_vocab)
    rng = np.random.default_rng(s.seed + 1)

    def loss_fn(it):
        batch, captions = clip_batch(scenes, rng, s.clip_batch, s.clip_twins)  # data/scenes.py
        images = pixel_values(np.stack([draw(scene, rng) for scene in batch]))  # (B, 3, H, W)
        scale = clip.logit_scale.clamp(max=math.log(100))  # CLIP section 2.5: the temperature clipped at 100
        return clip_loss(clip.encode_image(images), clip.encode_text(*caption_batch(tok, captions)), scale)

    history = train_loop(clip.parameters(), loss_fn, s.clip_iters, s.lr / 2, "clip")
    return clip, history


def new_llava(tok, s, projector, vision=None, llm=None):
    llm_config = ModelConfig(vocab_size=tok.n_vocab, block_size=96, n_layer=s.n_layer, n_embd=s.n_embd,
                             n_head=4, n_kv_head=2)
    model = LlavaModel(LlavaConfig(llm=llm_config.to_dict(), projector=projector, image_token_id=tok.image_token))
    if vision is not None:
        model.vision.load_state_dict(vision.state_dict())
    if llm is not None:
        model.llm.load_state_dict(llm.state_dict())
    return model


def train_text(tok, scenes, images, s):
    """The decoder alone on the conversations' and captions' text, no image (the Vicuna stand-in).
    Evaluated on held-out questions it is the text-only baseline: what the words alone predict."""
    model = new_llava(tok, s, "mlp")
    rng = np.random.default_rng(s.seed + 2)
    turns_fn = lambda scene, r: caption_turn(scene, r) if r.random() < 0.3 else conversation(scene, r)  # noqa: E731

    def loss_fn(it):
        ids, targets, _ = chat_batch(tok, scenes, images, rng, s.batch_size, 0, turns_fn, False, all_tokens=True)
        return model.llm(ids, targets)[1]

    history = train_loop(model.llm.parameters(), loss_fn, s.text_iters, s.lr, "text")
    return model.llm, history


def set_trainable(model, stage):
    """Stage 1: only the projector trains. Stage 2: projector + decoder. The vision tower never does."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.projector.parameters():
        p.requires_grad_(True)
    if stage == 2:  # the whole decoder, or only its LoRA matrices A and B (--peft lora)
        lora = peft.lora_layers(model.llm)
        for p in [q for m in lora for q in (m.lora_A, m.lora_B)] if lora else model.llm.parameters():
            p.requires_grad_(True)


def train_stage(model, stage, tok, scenes, images, s, lora=False):
    """Stage 1 on captions, stage 2 on the instruction conversations; loss on the answers only."""
    if stage == 2 and lora:
        peft.apply_lora(model.llm, r=16, alpha=32, targets="all")
    set_trainable(model, stage)
    rng = np.random.default_rng(s.seed + 10 * stage)
    turns_fn = caption_turn if stage == 1 else conversation

    def loss_fn(it):
        ids, targets, pix = chat_batch(tok, scenes, images, rng, s.batch_size, model.n_image_tokens, turns_fn)
        return model(ids, pix, targets)[1]

    model.train()
    history = train_loop(model.parameters(), loss_fn, s.stage1_iters if stage == 1 else s.stage2_iters,
                         s.lr, f"stage {stage}")
    if lora:  # fold B A into the decoder's weights: the checkpoint is a plain LLaVA again
        peft.merge_lora(model.llm)
        for m in list(model.llm.modules()):
            for child_name, child in list(m.named_children()):
                if isinstance(child, peft.LoRALinear):
                    setattr(m, child_name, child.base)
    return model.eval(), history


# ----------------------------------------------------------------------------- evaluation
def held_out(s, seed=1):
    """The evaluation set, the same for every model: (scenes, images, [(three-turn conversation,
    image first?)]), from other seeds than training's."""
    rng = np.random.default_rng(10_000 + seed)
    scenes, images = make_scenes(s.n_eval, 20_000 + seed)
    return scenes, images, [(conversation(scene, rng, 3), rng.random() < 0.5) for scene in scenes]


@torch.no_grad()
def answer_accuracy(model, tok, s, with_image=True, seed=1):
    """Per question kind on held-out scenes: the share of answers that greedy decoding gets exactly
    right. Greedy decoding reproduces an answer iff the argmax at each of its positions (and at its
    </s>) is the answer's token given the true prefix, so one teacher-forced pass measures it."""
    _, images, talks = held_out(s, seed)
    right = {k: 0 for k in KINDS}
    n_patches = model.n_image_tokens if with_image else 0
    for i, (turns, image_first) in enumerate(talks):
        ids, targets, kinds = encode_conversation(tok, turns, n_patches, image_first, with_image)
        x = torch.tensor([ids[:-1]])
        logits = model(x, images[i:i + 1] if with_image else None)[0][0]  # (T - 1, vocab)
        correct = logits.argmax(-1) == torch.tensor(targets[1:])
        for kind in KINDS:
            positions = [t - 1 for t in range(1, len(ids)) if kinds[t] == kind]
            right[kind] += bool(correct[positions].all())
    return {k: right[k] / len(talks) for k in KINDS}


# ----------------------------------------------------------------------------- checkpoints
def save(model, tok, path, extra=None):
    save_checkpoint({"model": model.state_dict(), "model_config": asdict(model.config), "vocab": tok.vocab,
                     **(extra or {})}, path)


def load(out_dir, device="cpu"):
    """(LlavaModel, WordTokenizer) from out_dir/ckpt.pt (or a .pt path), weights_only."""
    ckpt = load_checkpoint(out_dir)
    if "vocab" not in ckpt or "vision" not in ckpt["model_config"]:
        raise ValueError(f"{out_dir} is not a llava.py checkpoint (no vision tower); --image needs one: train it "
                         f"into a new folder, python llava.py --out_dir {free_out_dir('out/llava')}")
    model = LlavaModel(LlavaConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), WordTokenizer(ckpt["vocab"])


def pipeline(out_dir, s, projector="mlp", lora=False):
    """CLIP -> language-only decoder -> stage 1 -> stage 2 -> evaluation; each step's checkpoint in
    out_dir, which holds no run (llava.py never resumes) and is locked while the pipeline runs."""
    check_run_kind(out_dir, "llava.py", resume=None)
    lock_out_dir(out_dir)
    try:
        return train_pipeline(out_dir, s, projector, lora)
    finally:
        unlock_out_dir(out_dir)


def train_pipeline(out_dir, s, projector, lora):
    t0, cpu0 = time.perf_counter(), time.process_time()
    torch.manual_seed(s.seed)
    tok = WordTokenizer(build_vocab())
    scenes, images = make_scenes(s.n_train, s.seed)
    clip, clip_hist = train_clip(tok, scenes, s)
    zero_shot = zero_shot_accuracy(clip, tok, n=max(s.n_eval, 100))
    print("CLIP zero-shot accuracy on held-out one-object scenes (20 classes, chance 5%): " +
          ", ".join(f"{k} {v:.1%}" for k, v in zero_shot.items()))
    save_checkpoint({"model": clip.state_dict(), "model_config": asdict(clip.vision.config), "vocab": tok.vocab},
                    os.path.join(out_dir, "clip.pt"))
    llm, _ = train_text(tok, scenes, images, s)
    model = new_llava(tok, s, projector, clip.vision, llm)
    _, h1 = train_stage(model, 1, tok, scenes, images, s)
    save(model, tok, os.path.join(out_dir, "stage1.pt"))
    _, h2 = train_stage(model, 2, tok, scenes, images, s, lora)
    accuracy = answer_accuracy(model, tok, s)
    print("held-out answer accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))
    save(model, tok, os.path.join(out_dir, "ckpt.pt"),
         {"history": {"clip": clip_hist, "stage1": h1, "stage2": h2}, "zero_shot": zero_shot,
          "accuracy": accuracy, "seconds": time.perf_counter() - t0,
          "cpu_seconds": time.process_time() - cpu0})
    scene = random_scene(np.random.default_rng(99))
    write_png(draw(scene), os.path.join(out_dir, "scene.png"))
    print(f"wrote {out_dir}/ckpt.pt ({time.perf_counter() - t0:.0f} s); try:\n  python sample.py --out_dir "
          f"{out_dir} --image {out_dir}/scene.png --prompt \"describe the image in detail.\"")
    return model, tok


def argument_parser():
    p = Parser(__doc__)
    p.add_argument("--out_dir", default="out/llava", help="where clip.pt, stage1.pt and ckpt.pt go")
    p.add_argument("--projector", default="mlp", choices=["linear", "mlp"], help="vision features -> word "
                   "embeddings: LLaVA's linear map or LLaVA-1.5's two-layer MLP")
    p.add_argument("--peft", default="", choices=["", "lora"], help="stage 2 with LoRA on the decoder")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    p.add_argument("--seed", type=Number(int, 0), default=0, help="seeds the scenes and the weights")
    return p


def parse_args(argv):
    return argument_parser().parse_args(argv)


def main(argv=None):
    try:
        args = parse_args(argv)
        quick = args.quick or bool(os.environ.get("NANO_QUICK"))  # (the documentation test)
        s = Settings(**(QUICK if quick else {}), seed=args.seed)
        pipeline(args.out_dir, s, args.projector, args.peft == "lora")
    except (ValueError, OSError) as e:
        exit_with_error(e)


if __name__ == "__main__":
    main()
