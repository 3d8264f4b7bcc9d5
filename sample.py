"""Sample text from a trained model or a Hugging Face Llama checkpoint, streaming tokens.

    python sample.py --out_dir out/demo --prompt "The for statement"
    python sample.py --out_dir out/demo --prompt FILE:prompt.txt --temperature 0.8 --top_k 200 \\
        --top_p 0.95 --num_samples 3 --max_new_tokens 300 --seed 1
    python sample.py --hf_dir path/to/TinyLlama-1.1B --prompt "Once upon a time"
    python sample.py --out_dir out/base --adapter out/lora   # a LoRA / prefix adapter (peft.py)
    python sample.py --out_dir out/demo --quantize nf4-dq     # blocks' linears in NF4 (quant.py)
    python sample.py --out_dir out/al/ppo --chat              # a conversation with an align.py run

Decoding reads the prompt once into a KV cache and then feeds one token per step
(model.generate_tokens). temperature 0 is greedy; top_k keeps the k most likely tokens,
top_p the smallest set whose probability reaches p (Holtzman et al. 2019, nucleus).
"""

import os
import sys
import warnings
from contextlib import nullcontext

import torch

import decode
import hf
import llava
import quant
from data.tasks import BOT, EOT, USER
from checkpoint import load_checkpoint
from cli import Number, Parser
from data.scenes import read_image
from data.tokenizer import readable
from decode import for_decoding
from model import check_sampling_args, sample_next
from runs import choose_threads, exit_with_error, load_adapter, load_run, resolve_device


class HFTokenizer:
    """A Hugging Face tokenizer.json (the `tokenizers` package ships with transformers)."""

    def __init__(self, path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("reading a Hugging Face tokenizer.json needs `pip install tokenizers`") from None
        self.tok = Tokenizer.from_file(path)
        self.n_vocab = self.tok.get_vocab_size()
        self.eot_token = self.tok.token_to_id("</s>")
        self.bos_token = self.tok.token_to_id("<s>")  # (None when the vocabulary has no "<s>")

    def encode(self, text):
        return self.tok.encode(text).ids

    def decode(self, ids):
        return self.tok.decode(ids)


def load_model(out_dir="", hf_dir="", device="cpu", adapter="", quantize=""):
    """(model, tokenizer) in eval mode: any train.py run (its adapters included) or a Hugging
    Face Llama directory, optionally quantized, then given an adapter (sample.py, evaluate.py)."""
    if hf_dir:
        tok_path = os.path.join(hf_dir, "tokenizer.json")
        if not os.path.exists(tok_path):
            raise FileNotFoundError(f"tokenizer {tok_path} not found next to the Hugging Face checkpoint")
        model, tokenizer = hf.load_llama(hf_dir, device=device), HFTokenizer(tok_path)
    else:
        model, tokenizer, ckpt = load_run(out_dir, device)
        method = ckpt["train_config"].get("peft", "")
        if method and adapter:
            raise ValueError(f"{out_dir} is a --peft {method} run (an adapter on its base); pass it alone as "
                             f"--out_dir, or give its base as --out_dir and it as --adapter")
    if quantize:  # before the adapter: QLoRA's adapters sit on an NF4 base
        quant.quantize_model(model, quantize, compute_dtype=quant.compute_dtype_for(torch.device(device)))
    if adapter:
        inner = os.path.join(adapter, "adapter")  # a --peft training run writes out_dir/adapter
        run = os.path.join(adapter, "ckpt.pt")
        method = load_checkpoint(run)["train_config"].get("peft", "") if os.path.exists(run) else ""
        add_adapter(model, inner if os.path.isdir(inner) else adapter, method)
    return model.eval(), tokenizer


def add_adapter(model, path, method=""):
    """A LoRA / prefix adapter on the model; a QLoRA adapter gets its NF4 + DQ base."""
    if method == "qlora" and quant.quantization_method(model) is None:
        print("the adapter was trained with --peft qlora: storing the base in nf4-dq as it was", file=sys.stderr)
        quant.quantize_model(model, "nf4-dq", compute_dtype=quant.compute_dtype_for(model.tok_embeddings.weight.device))
    return load_adapter(model, path)


def read_prompt(prompt):
    if prompt.startswith("FILE:"):
        path = prompt[len("FILE:"):]
        if not os.path.exists(path):
            raise FileNotFoundError(f"prompt file {path} not found")
        with open(path, encoding="utf-8") as f:
            return f.read()
    return prompt


def fits_graph_step(model, prompt_ids, max_new_tokens):
    """Whether decode's CUDA-graph step can decode this prompt: on a GPU, when
    decode.check_batch accepts it."""
    if model.tok_embeddings.weight.device.type != "cuda":
        return False
    try:
        decode.check_batch(model, [prompt_ids], max_new_tokens, cuda_graph=True)
    except ValueError:
        return False
    return True


def stream(model, tokenizer, prompt_ids, args, generator, out=sys.stdout):
    """Generate one sample, printing text as soon as it decodes to whole characters. On a GPU
    each step is replayed from a CUDA graph where it can be (decode.GraphStep: the same
    tokens, several times faster for small models)."""
    x = torch.tensor([prompt_ids], dtype=torch.long, device=next(model.parameters()).device)
    ids = list(prompt_ids)
    printed = readable(tokenizer.decode(ids))
    out.write(printed)
    sampling = (args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if fits_graph_step(model, prompt_ids, args.max_new_tokens):
        tokens = decode.batched_tokens(model, [prompt_ids], *sampling, eos_id=args.eos_id, generator=generator,
                                       n_vocab=tokenizer.n_vocab, cuda_graph=True)
    else:
        tokens = model.generate_tokens(x, *sampling, eos_id=args.eos_id, generator=generator,
                                       n_vocab=tokenizer.n_vocab)
    for next_id in tokens:
        ids.append(int(next_id[0]))
        text = readable(tokenizer.decode(ids))  # <|endoftext|> as a separator line
        if not text.endswith("\ufffd"):  # a byte-level token may end inside a UTF-8 character
            out.write(text[len(printed):])
            out.flush()
            printed = text
    out.write("\n")
    return ids


def chat(model, tokenizer, args, generator, read=input, out=sys.stdout):
    """A multi-turn conversation in align.py's chat template, Ⓤ{you}␃Ⓐ{model}␃ per turn.

    The KV cache is kept across turns: each turn feeds only its new tokens (your message,
    then one sampled token at a time) at the positions after everything said so far. The
    model's turn ends at the end-of-turn token or after --max_new_tokens. An empty line or
    end of input ends the chat; so does a full context (block_size)."""
    try:
        eot = tokenizer.encode(EOT)
    except ValueError:
        raise ValueError("this model's tokenizer has no chat-template markers: --chat needs an align.py run") from None
    caches, pos, pending = model.new_kv_caches(1), 0, []  # pending: sampled but not yet in the cache
    device = next(model.parameters()).device
    while True:
        try:
            message = read("you> ")
        except EOFError:
            return
        if not message.strip():
            return
        new = pending + tokenizer.encode(USER + message + EOT + BOT)
        out.write("bot> ")
        reply, printed = [], ""
        with torch.inference_mode():
            for _ in range(args.max_new_tokens):
                if pos + len(new) > model.config.block_size:
                    out.write(f"\n[the context of {model.config.block_size} tokens is full: start a new chat]\n")
                    return
                logits, _ = model(torch.tensor([new], device=device), caches=caches, start_pos=pos)
                pos += len(new)
                new = [int(sample_next(logits[:, -1, :tokenizer.n_vocab], args.temperature, args.top_k,
                                       args.top_p, generator)[0])]
                if new == eot:
                    break
                reply += new
                text = tokenizer.decode(reply)
                if not text.endswith("\ufffd"):  # a byte-level token may end inside a character
                    out.write(text[len(printed):])
                    out.flush()
                    printed = text
            else:  # no end-of-turn token: close the turn so the next one starts in the template
                new = new + eot
        pending = new
        out.write("\n")


def sample_image(args, device):
    """--image: a llava.py run answers about the picture (the image's features stand in for <image>)."""
    model, tokenizer = llava.load(args.out_dir, device)
    image = read_image(args.image, model.vision.config.image_size)
    prompt_ids = llava.encode_prompt(tokenizer, read_prompt(args.prompt), 1, model.n_image_tokens)
    x = torch.tensor([prompt_ids], device=device)
    pixels = llava.pixel_values(image)[None].to(device)  # (1, 3, H, W)
    shown = [i for i in prompt_ids if i != tokenizer.image_token]  # the text, without the visual tokens
    generator = torch.Generator(device=device).manual_seed(args.seed)
    eos_id = tokenizer.eot_token if args.eos_id is None else args.eos_id
    for k in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {k + 1}/{args.num_samples}")
        ids, printed = list(shown), tokenizer.decode(shown)
        print(printed, end="", flush=True)
        for next_id in model.generate_tokens(x, pixels, args.max_new_tokens, args.temperature, args.top_k,
                                             args.top_p, eos_id, generator):
            if int(next_id[0]) == eos_id:
                break
            ids.append(int(next_id[0]))
            text = tokenizer.decode(ids)
            print(text[len(printed):], end="", flush=True)
            printed = text
        print()


def argument_parser():
    p = Parser(__doc__)
    p.add_argument("--out_dir", default="out/debug", help="a training out_dir (ckpt.pt + tokenizer)")
    p.add_argument("--hf_dir", default="", help="a Hugging Face Llama checkpoint directory instead")
    p.add_argument("--prompt", default="\n", help="the prompt text, or FILE:path")
    p.add_argument("--max_new_tokens", type=Number(int, 1), default=200, help="tokens generated per sample")
    p.add_argument("--temperature", type=Number(float, 0, text="a finite number >= 0 (0 is greedy)"),
                   default=0.8, help="divides the logits: below 1 sharper, above 1 flatter")
    p.add_argument("--top_k", type=Number(int, 1), default=200, help="sample among the k likeliest tokens")
    p.add_argument("--top_p", type=Number(float, 0, 1, low_open=True), default=None,
                   help="nucleus sampling: the likeliest tokens holding this much probability; none: off")
    p.add_argument("--num_samples", type=Number(int, 1), default=1, help="samples from the one prompt")
    p.add_argument("--seed", type=Number(int, 0), default=1337, help="seeds the sampling")
    p.add_argument("--eos_id", type=Number(int, 0), default=None, help="stop a sample at this token id")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--adapter", default="", help="a PEFT adapter directory (or a --peft run's out_dir)")
    p.add_argument("--image", default="", help="a PNG for a llava.py run (--out_dir); '<image>' in the prompt "
                   "places it, else it goes first")
    p.add_argument("--quantize", default="", choices=["", "nf4", "nf4-dq", "int8"],
                   help="store the blocks' linear layers quantized (quant.quantize_model)")
    p.add_argument("--quantized_decoding", default="cached", choices=["cached", "per_call"],
                   help="with --quantize: 'cached' keeps a dequantized copy of each quantized weight and decodes at "
                   "about the unquantized speed (that copy's memory on top of the quantized storage, "
                   "quant.cache_dequantized); 'per_call' "
                   "dequantizes inside every matmul: only the quantized storage, slower decoding")
    p.add_argument("--chat", action="store_true", help="a multi-turn conversation (align.py's chat template)")
    return p


def parse_args(argv):
    """argv -> the options, every number checked (before any model is loaded)."""
    args = argument_parser().parse_args(argv)
    if os.environ.get("NANO_QUICK"):  # the documentation test: the command, not a long sample
        args.max_new_tokens, args.num_samples = min(args.max_new_tokens, 10), min(args.num_samples, 2)
    check_sampling_args(args.temperature, args.top_k, args.top_p)
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        device = resolve_device(args.device)
        choose_threads(device, quiet=True)  # as train.py does, silently: the output is the text
        if args.image:
            return sample_image(args, device)
        model, tokenizer = load_model(args.out_dir, args.hf_dir, device, args.adapter, args.quantize)
        for_decoding(model)  # on a CPU: the weight layout its BLAS reads fastest
        if args.quantize and args.quantized_decoding == "cached":
            quant.cache_dequantized(model)
            print(f"--quantize {args.quantize}: decoding from a cached dequantized copy of the weights (about the "
                  f"unquantized model's speed, and its memory on top); --quantized_decoding per_call keeps only the "
                  f"quantized storage", file=sys.stderr)
        if args.eos_id is not None and not 0 <= args.eos_id < model.config.vocab_size:
            raise ValueError(f"--eos_id {args.eos_id} is not a token id of this model (0 .. "
                             f"{model.config.vocab_size - 1})")
        if args.chat:
            return chat(model, tokenizer, args, torch.Generator(device=device).manual_seed(args.seed))
        prompt_ids = tokenizer.encode(read_prompt(args.prompt))
        if not prompt_ids:
            raise ValueError("the prompt encodes to no tokens; give some text")
        generator = torch.Generator(device=device).manual_seed(args.seed)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        with autocast:
            for k in range(args.num_samples):
                if args.num_samples > 1:
                    print(f"--- sample {k + 1}/{args.num_samples}")
                stream(model, tokenizer, prompt_ids, args, generator)
    except KeyboardInterrupt:  # Ctrl-C ends the stream: a newline, no traceback
        print("\n(interrupted)", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, ImportError) as e:
        exit_with_error(e)


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"  # one line, no source excerpt
    main()
