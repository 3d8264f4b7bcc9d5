"""Our models inside EleutherAI's lm-evaluation-harness, as its model "nano".

    python harness.py --model nano --model_args out_dir=out/demo --tasks my_task --include_path my_tasks/
    python harness.py --model nano --model_args hf_dir=path/to/TinyLlama,batch_size=16 --tasks hellaswag

The harness (Gao et al., "A framework for few-shot language model evaluation", and
Biderman et al. 2024, "Lessons from the Trenches on Reproducible Evaluation of Language
Models", arXiv:2405.14782, section 3) turns every task into three kinds of requests and
asks a model class, looked up by name in its registry (lm_eval.api.registry), to answer
them. Importing this file registers NanoLM there as "nano"; run as a script it then hands
its command line to the harness's own (lm_eval/__main__.py), so every `lm_eval` option
works, --include_path for a task of your own among them. (`lm_eval --model nano` itself
cannot find the class: lm_eval 0.4.13 registers its own models only and reads no entry
points, so the command is `python harness.py`, from the repository's root.)

NanoLM answers each kind of request with evaluate.py, whose semantics are the harness's
(tests/test_harness.py checks them against its HFLM):
    loglikelihood(context, continuation) -> evaluate.encode_pair, evaluate.loglikelihood
    loglikelihood_rolling(text)          -> evaluate.loglikelihood_rolling
    generate_until(context, until, ...)  -> evaluate.greedy_until

model_args: out_dir (a train.py or align.py run; a llava.py run is scored on text by its
decoder alone), or hf_dir (a Hugging Face Llama directory with tokenizer.json); adapter,
quantize, device and batch_size as in evaluate.py.
"""

import os
import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import evaluate
from checkpoint import load_checkpoint
from runs import exit_with_error, resolve_device


def load(out_dir="", hf_dir="", device="cpu", adapter="", quantize=""):
    """(model, tokenizer) of a run or a Hugging Face directory; a llava.py run's text decoder."""
    if bool(out_dir) == bool(hf_dir):
        raise ValueError("give the model as --model_args out_dir=RUN or --model_args hf_dir=DIR (one of the two)")
    if out_dir and "vision" in load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["model_config"]:
        import llava
        if adapter or quantize:
            raise ValueError(f"{out_dir} is a llava.py run: its decoder is scored as it is (no adapter, quantize)")
        model, tokenizer = llava.load(out_dir, device)
        return model.llm, tokenizer
    from sample import load_model
    return load_model(out_dir, hf_dir, device, adapter, quantize)


@register_model("nano")
class NanoLM(LM):
    """The harness's model interface over evaluate.py's functions."""

    def __init__(self, out_dir="", hf_dir="", adapter="", quantize="", device=None, batch_size=32,
                 max_gen_toks=256, **unused):  # (the harness also passes max_batch_size)
        super().__init__()
        if device in (None, "cuda:0") and not torch.cuda.is_available():  # the harness's default is "cuda:0"
            device = "auto"
        self._device = resolve_device(device)
        self.model, self.tok = load(out_dir, hf_dir, self._device, adapter, quantize)
        self.batch_size = 32 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests, disable_tqdm=False):
        """[(log P(continuation | context), is_greedy)] for requests of (context, continuation)."""
        pairs = [evaluate.encode_pair(self.tok, context, continuation) for context, continuation in
                 (r.args for r in requests)]
        results = evaluate.loglikelihood(self.model, [c for c, _ in pairs], [t for _, t in pairs], self.batch_size)
        for r, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """[log P(text)] for requests of (text,): every token scored once, in the model's windows."""
        results = []
        for r in requests:
            logprob, _ = evaluate.loglikelihood_rolling(self.model, self.tok, r.args[0], batch_size=self.batch_size)
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, logprob)
            results.append(logprob)
        return results

    def generate_until(self, requests, disable_tqdm=False):
        """[greedy continuation cut at the first stop string] for requests of (context, gen_kwargs)."""
        results = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if kwargs.get("do_sample") or kwargs.get("temperature", 0) > 0:
                raise ValueError("the nano model generates greedily; the task asks for sampling (do_sample, "
                                 "temperature > 0)")
            text = evaluate.greedy_until(self.model, self.tok, self.tok.encode(context), until,
                                         int(kwargs.get("max_gen_toks", self.max_gen_toks)))
            self.cache_hook.add_partial("generate_until", r.args, text)
            results.append(text)
        return results


def main():
    from lm_eval.__main__ import cli_evaluate
    sys.argv[0] = "harness.py"
    try:
        cli_evaluate()
    except (ValueError, OSError, ImportError) as e:  # a bad out_dir, task file or model_args: one line
        exit_with_error(e)


if __name__ == "__main__":
    main()
