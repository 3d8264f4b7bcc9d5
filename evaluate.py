"""Evaluate a language model without a gradient step: perplexity, multiple choice, exact match.

    python evaluate.py --out_dir out/demo --text notes.txt              # perplexity, bits per byte
    python evaluate.py --out_dir out/demo --task tasks/sym.jsonl --num_fewshot 4 --seed 0
    python evaluate.py --hf_dir path/to/TinyLlama --task hellaswag.jsonl --description "..."
    python evaluate.py --out_dir out/base --adapter out/lora --quantize nf4 --task t.jsonl

Read it next to GPT-3 (Brown et al. 2020, arXiv:2005.14165) section 2.4, "Evaluation":
  - K-shot: "we evaluate each example in the evaluation set by randomly drawing K examples
    from that task's training set as conditioning, delimited by 1 or 2 newlines";
  - multiple choice: "we provide K examples of context plus correct completion, followed by
    one example of context only, and compare the LM likelihood of each completion",
    normalized per token, or (ARC, OpenBookQA, RACE) by the unconditional probability
    P(completion | context) / P(completion | answer_context), answer_context "Answer: ";
  - free-form completion: beam search in the paper; greedy here, cut at stop strings,
    scored by exact match.
The conventions follow EleutherAI's lm-evaluation-harness (its `loglikelihood`, its
MultipleChoiceTask fields `query`, `choices`, `gold`, its `until` stop strings), so a
task file reads the same in both; harness.py runs our models inside the harness itself.

A task is a JSONL file, one example per line:
    {"query": "c#a@t ->", "choices": ["cat", "CAT", "#@"], "gold": 0}    multiple choice
    {"query": "c#a@t ->", "answer": "cat", "until": ["\\n"]}               exact match
    {"query": ..., ..., "split": "train"}    a few-shot example (default split: "test")
The prompt of a test example, with the delimiters as in lm-evaluation-harness:

    description + FEWSHOT_DELIMITER                          (when there is one)
    query_1 + TARGET_DELIMITER + answer_1 + FEWSHOT_DELIMITER     K shots, drawn with the seed
    ...                                                           from the train split (else
    query_K + TARGET_DELIMITER + answer_K + FEWSHOT_DELIMITER     from the other test lines)
    query                                                    <- scored: TARGET_DELIMITER + choice
"""

import json
import math
import os
import random
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from checkpoint import json_lines
from cli import Number, Parser
from data.tokenizer import CharTokenizer
from runs import exit_with_error, resolve_device
from sample import load_model

FEWSHOT_DELIMITER = "\n\n"  # between shots (GPT-3: "1 or 2 newlines")
TARGET_DELIMITER = " "  # between a query and its answer (lm-evaluation-harness's " " + choice)
ANSWER_CONTEXT = "Answer:"  # GPT-3's unconditional normalization conditions on this alone
NORMALIZATIONS = ("sum", "token", "char", "unconditional")


# ----------------------------------------------------------------------------- log-likelihood
def prefix_token(tokenizer):
    """The token a text with no context is conditioned on: lm-evaluation-harness's
    prefix_token_id, the start token (<s>) when the tokenizer has one, else end-of-text
    (None for a character vocabulary, which has neither)."""
    bos = getattr(tokenizer, "bos_token", None)
    return bos if bos is not None else getattr(tokenizer, "eot_token", None)


def encode_pair(tokenizer, context, continuation):
    """(context_ids, continuation_ids) exactly as lm-evaluation-harness tokenizes a request
    (lm_eval/api/model.py, TemplateLM.loglikelihood and _encode_pair):
      1. all trailing whitespace of the context (spaces, "\n", "\t") moves to the front of
         the continuation: "Q:\n" + "A" is scored as "Q:" + "\nA";
      2. the whole string is encoded, and the context alone; the continuation is what the
         whole has past the context's length, also when BPE merged across the boundary
         ("the" + " object" -> "the▁" + "object": the ids are not the continuation's own,
         and may be none; the harness's choice, kept so that the numbers agree);
      3. an empty context: the continuation alone, after prefix_token (or, when the
         continuation already starts with that token, its first token is the context)."""
    if not context:
        continuation_ids = tokenizer.encode(continuation)
        prefix = prefix_token(tokenizer)
        if prefix is None:
            raise ValueError("an empty context needs a start or end-of-text token to condition on, and this "
                             "tokenizer has neither (a character vocabulary); give every request a context")
        if continuation_ids[:1] == [prefix]:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    n_whitespace = len(context) - len(context.rstrip())
    if n_whitespace:
        context, continuation = context[:-n_whitespace], context[-n_whitespace:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def _window(model):
    return model.config.block_size


@torch.no_grad()
def loglikelihood(model, context_ids, continuation_ids, batch_size=32):
    """log P(continuation | context) and whether greedy decoding would produce it.

    lm-evaluation-harness's semantics: the model reads (context + continuation)[:-1], cut
    from the left to its window, and the continuation's tokens are scored at the last
    len(continuation) positions. Returns (logprob, is_greedy), or a list of them when
    given lists of requests (context_ids: list of lists). Requests are sorted by length,
    right-padded into batches of batch_size (a causal model never reads the padding to
    its right) and returned in their order.

    An empty continuation (encode_pair gives one when BPE merged all of it into the
    context) is (0.0, True): the log-probability of nothing. The harness gives the same
    when it batches the request with a one-token continuation of the same context (its
    logits cache), and stops on an assert otherwise. Beware: such a choice always wins.
    """
    single = not context_ids or not isinstance(context_ids[0], (list, tuple))
    if single:
        context_ids, continuation_ids = [context_ids], [continuation_ids]
    if len(context_ids) != len(continuation_ids):
        raise ValueError(f"{len(context_ids)} contexts but {len(continuation_ids)} continuations")
    window = _window(model)
    rows, cut = [], 0
    for ctx, cont in zip(context_ids, continuation_ids):
        if not ctx:
            raise ValueError("a request needs a context of at least one token (encode_pair puts the start or "
                             "end-of-text token before an empty context, as lm-evaluation-harness does)")
        if len(cont) > window:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's window of {window}")
        whole = list(ctx) + list(cont)
        cut += len(whole) - 1 > window
        rows.append((whole[-(window + 1):][:-1], list(cont)))  # (input, targets), input <= window
    if cut:
        warnings.warn(f"{cut} of {len(rows)} requests are longer than the model's window of {window} tokens: "
                      f"their contexts were truncated from the left", stacklevel=2)
    results = [(0.0, True) if not cont else None for _, cont in rows]
    order = sorted((i for i in range(len(rows)) if rows[i][1]), key=lambda i: -len(rows[i][0]))  # longest first
    device = model.tok_embeddings.weight.device
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start:start + batch_size]]
        T = len(batch[0][0])
        idx = torch.zeros(len(batch), T, dtype=torch.long, device=device)  # (B, T), right-padded with 0
        for b, (inp, _) in enumerate(batch):
            idx[b, :len(inp)] = torch.tensor(inp)
        logprobs = F.log_softmax(model(idx)[0].float(), dim=-1)  # (B, T, vocab)
        for b, (inp, cont) in enumerate(batch):
            n = len(cont)
            lp = logprobs[b, len(inp) - n:len(inp)]  # (n, vocab): the positions that predict cont
            target = torch.tensor(cont, device=device)
            results[order[start + b]] = (float(lp.gather(-1, target[:, None]).sum()),
                                         bool((lp.argmax(-1) == target).all()))
    return results[0] if single else results


# ----------------------------------------------------------------------------- perplexity
def rolling_requests(ids, prefix, window, stride=None):
    """Every token of ids as the continuation of one request, in windows of `stride` tokens
    (default: the model's window, lm-evaluation-harness's disjoint rolling windows,
    lm_eval/utils.py get_rolling_token_windows with context_len=1), each with as much of
    the text before it as fits as context. The first token is conditioned on `prefix`, or,
    when there is none, is not scored. Returns (contexts, continuations)."""
    stride = stride or window
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in 1 .. {window} (the model's window), got {stride}")
    full = ([prefix] if prefix is not None else []) + list(ids)  # full[0] is never predicted
    contexts, continuations = [], []
    for j in range(1, len(full), stride):
        cont = full[j:j + stride]
        contexts.append(full[max(0, j - (window + 1 - len(cont))):j])
        continuations.append(cont)
    return contexts, continuations


def loglikelihood_rolling(model, tokenizer, text, stride=None, batch_size=32):
    """(log P(text), tokens scored): lm-evaluation-harness's loglikelihood_rolling."""
    ids = tokenizer.encode(text)
    contexts, continuations = rolling_requests(ids, prefix_token(tokenizer), _window(model), stride)
    if not continuations:
        return 0.0, 0
    return sum(lp for lp, _ in loglikelihood(model, contexts, continuations, batch_size)), sum(map(len, continuations))


def perplexity(model, tokenizer, text, stride=None, batch_size=32):
    """Perplexity per token and bits per byte of a text, every token scored once by
    loglikelihood_rolling. Without a prefix token (a character vocabulary) the first
    token, and its bytes, are not scored.
    bits per byte = total NLL / (ln 2 * UTF-8 bytes): comparable across tokenizers.
    """
    logprob, n_tokens = loglikelihood_rolling(model, tokenizer, text, stride, batch_size)
    if n_tokens == 0:
        raise ValueError("the text is too short to score: it needs at least two tokens")
    nll = -logprob
    skipped = b"" if prefix_token(tokenizer) is not None else tokenizer.decode(tokenizer.encode(text)[:1]).encode()
    n_bytes = len(text.encode("utf-8")) - len(skipped)
    return {"tokens": n_tokens, "bytes": n_bytes, "nll_per_token": nll / n_tokens,
            "perplexity": math.exp(nll / n_tokens), "bits_per_byte": nll / (math.log(2) * n_bytes)}


# ----------------------------------------------------------------------------- task files
def read_task(path, tokenizer=None, unknown="error"):
    """Examples of a JSONL task file, checked line by line (a bad line names its number).
    Given the tokenizer, characters it cannot encode are handled as `unknown` says
    (see clean_text); returns (docs, how many were skipped or replaced) then."""
    docs, n_unknown = [], 0
    with open(path, encoding="utf-8") as f:
        for n, doc in json_lines(f, path):
            doc = check_doc(doc, f"{path} line {n}")
            if tokenizer is not None:
                for key in ("query", "answer", "choices"):
                    texts = doc.get(key)
                    if texts is None:
                        continue
                    cleaned = [clean_text(tokenizer, t, f'{path} line {n}, "{key}"', unknown)
                               for t in (texts if key == "choices" else [texts])]
                    n_unknown += sum(k for _, k in cleaned)
                    doc[key] = [t for t, _ in cleaned] if key == "choices" else cleaned[0][0]
            docs.append(doc)
    if not any(d.get("split", "test") == "test" for d in docs):
        raise ValueError(f"{path}: no test examples (lines without \"split\" or with \"split\": \"test\")")
    return docs if tokenizer is None else (docs, n_unknown)


UNKNOWN = ("error", "skip", "replace")
REPLACEMENT = " "  # --unknown replace: what an unknown character becomes (when the vocabulary has it)


def clean_text(tokenizer, text, where, unknown="error"):
    """(text, how many characters were skipped or replaced). Only a character vocabulary
    (data/tokenizer.py's CharTokenizer) has characters it cannot encode; BPE falls back
    to bytes. unknown="error" raises one line naming the first one and its place."""
    if not isinstance(tokenizer, CharTokenizer):
        return text, 0
    stoi = tokenizer.stoi
    bad = [i for i, c in enumerate(text) if c not in stoi]
    if not bad:
        return text, 0
    if unknown == "error":
        i = bad[0]
        line = text.count("\n", 0, i) + 1
        column = i - (text.rfind("\n", 0, i) + 1) + 1
        raise ValueError(f"{where}: character {text[i]!r} (line {line}, column {column}) is not in the model's "
                         f"vocabulary of {tokenizer.n_vocab} characters, nor are {len(bad) - 1} more; "
                         f"--unknown skip drops them, --unknown replace makes them {REPLACEMENT!r}")
    if unknown == "replace" and REPLACEMENT not in stoi:
        raise ValueError(f"--unknown replace: the vocabulary has no {REPLACEMENT!r} to replace with; use --unknown skip")
    new = REPLACEMENT if unknown == "replace" else ""
    return "".join(new if c not in stoi else c for c in text), len(bad)


def check_doc(doc, where):
    if not isinstance(doc, dict) or not isinstance(doc.get("query"), str):
        raise ValueError(f"{where}: expected an object with a string \"query\"")
    doc = {"split": "test", **doc}
    if doc["split"] not in ("train", "test"):
        raise ValueError(f"{where}: split must be \"train\" or \"test\", got {doc['split']!r}")
    if "choices" in doc:
        choices, gold = doc["choices"], doc.get("gold")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: \"choices\" must be a non-empty list of strings")
        if gold is None:
            raise ValueError(f"{where}: a multiple-choice example needs \"gold\", the index of the right choice")
        if not isinstance(gold, int) or isinstance(gold, bool):
            raise ValueError(f"{where}: gold must be an integer index (0 .. {len(choices) - 1}), got the "
                             f"{type(gold).__name__} {gold!r}" + ("; write it without quotes" if isinstance(gold, str)
                                                                   and gold.strip().isdigit() else ""))
        if not 0 <= gold < len(choices):
            raise ValueError(f"{where}: gold {gold} is out of range for {len(choices)} choices "
                             f"(an index 0 .. {len(choices) - 1})")
    elif not isinstance(doc.get("answer"), str):
        raise ValueError(f"{where}: give \"choices\" and \"gold\" (multiple choice) or an \"answer\" string "
                         f"(exact match)")
    until = doc.get("until", [])
    if not isinstance(until, list) or not all(isinstance(s, str) and s for s in until):
        raise ValueError(f"{where}: \"until\" must be a list of non-empty stop strings")
    return doc


def target(doc):
    """The text that follows a shot's query: its gold choice or its answer."""
    return doc["choices"][doc["gold"]] if "choices" in doc else doc["answer"]


# ----------------------------------------------------------------------------- K-shot prompts
def fewshot(docs, i, k, seed):
    """K shots for test example docs[i]: the first k of a shuffle seeded by (seed, i) of the
    train split (or, without one, of the other test examples). Never the example itself nor
    any line with the same query; nested in k (the 2 shots are the first 2 of the 4)."""
    test = docs[i]
    split = lambda d: d.get("split", "test")  # noqa: E731
    train = [d for d in docs if split(d) == "train"] or [d for d in docs if split(d) == "test"]
    pool = [d for d in train if d is not test and d["query"] != test["query"]]
    if k > len(pool):
        raise ValueError(f"{k} shots asked for, but only {len(pool)} examples can serve as shots")
    random.Random(seed * 1_000_003 + i).shuffle(pool)
    return pool[:k]


def build_prompt(doc, shots, description=""):
    """description, the shots with their answers, then the query (the module docstring's layout)."""
    parts = [description] if description else []
    parts += [s["query"] + TARGET_DELIMITER + target(s) for s in shots]
    return FEWSHOT_DELIMITER.join(parts + [doc["query"]])


# ----------------------------------------------------------------------------- multiple choice
def normalized_scores(lls, n_tokens, n_chars, lls_unconditional):
    """GPT-3 section 2.4's ways to compare completions, one score list per normalization:
    sum log P; per token; per character (lm-evaluation-harness's acc_norm); and
    log P(completion | context) - log P(completion | answer_context)."""
    return {"sum": list(lls),
            "token": [ll / max(n, 1) for ll, n in zip(lls, n_tokens)],  # (an empty continuation: 0)
            "char": [ll / n for ll, n in zip(lls, n_chars)],
            "unconditional": [ll - u for ll, u in zip(lls, lls_unconditional)]}


def argmax(scores):
    return max(range(len(scores)), key=lambda j: scores[j])  # the first of ties


def evaluate_choices(model, tokenizer, docs, k=0, seed=0, description="", answer_context=ANSWER_CONTEXT,
                     batch_size=32):
    """Accuracy under each normalization over the test examples (all requests in one batched call)."""
    tests = [i for i, d in enumerate(docs) if d.get("split", "test") == "test"]
    contexts, continuations, spans = [], [], []
    for i in tests:
        doc = docs[i]
        prompt = build_prompt(doc, fewshot(docs, i, k, seed), description)
        start = len(contexts)
        for choice in doc["choices"]:
            for ctx in (prompt, answer_context):  # conditional, then unconditional
                c, t = encode_pair(tokenizer, ctx, TARGET_DELIMITER + choice)
                contexts.append(c)
                continuations.append(t)
        spans.append((start, len(contexts)))
    results = loglikelihood(model, contexts, continuations, batch_size)
    correct = {name: 0 for name in NORMALIZATIONS}
    for i, (a, b) in zip(tests, spans):
        doc = docs[i]
        lls = [results[j][0] for j in range(a, b, 2)]
        scores = normalized_scores(lls, [len(continuations[j]) for j in range(a, b, 2)],
                                   [len(c) for c in doc["choices"]], [results[j][0] for j in range(a + 1, b, 2)])
        for name in NORMALIZATIONS:
            correct[name] += argmax(scores[name]) == doc["gold"]
    return {"n": len(tests), "accuracy": {name: correct[name] / len(tests) for name in NORMALIZATIONS}}


# ----------------------------------------------------------------------------- exact match
def prompt_room(model, max_gen_toks):
    return max(1, _window(model) - max_gen_toks)


@torch.no_grad()
def greedy_until(model, tokenizer, prompt_ids, until, max_gen_toks=32):
    """Greedy continuation of prompt_ids (KV-cached), cut at the first stop string or end-of-text.
    As lm-evaluation-harness, the prompt keeps its last window - max_gen_toks tokens, so
    that prompt and answer fit the window together."""
    device = model.tok_embeddings.weight.device
    idx = torch.tensor([prompt_ids[-prompt_room(model, max_gen_toks):]], device=device)  # (1, T)
    new = []
    eot = getattr(tokenizer, "eot_token", None)
    for token in model.generate_tokens(idx, max_gen_toks, temperature=0, n_vocab=tokenizer.n_vocab):
        if int(token[0]) == eot:  # (lm-evaluation-harness adds end-of-text to the stop strings)
            break
        new.append(int(token[0]))
        text = tokenizer.decode(new)
        if any(s in text for s in until):
            break
    text = tokenizer.decode(new)
    cuts = [text.index(s) for s in until if s in text]
    return text[:min(cuts)] if cuts else text


def evaluate_generation(model, tokenizer, docs, k=0, seed=0, description="", max_gen_toks=32):
    """Exact-match accuracy of greedy answers (stripped), each example's `until` or the shot delimiter."""
    tests = [i for i, d in enumerate(docs) if d.get("split", "test") == "test"]
    correct, cut, predictions = 0, 0, []
    for i in tests:
        doc = docs[i]
        ids = tokenizer.encode(build_prompt(doc, fewshot(docs, i, k, seed), description))
        cut += len(ids) > prompt_room(model, max_gen_toks)
        got = greedy_until(model, tokenizer, ids, doc.get("until") or [FEWSHOT_DELIMITER], max_gen_toks)
        predictions.append(got)
        correct += got.strip() == doc["answer"].strip()
    if cut:
        warnings.warn(f"{cut} of {len(tests)} prompts are longer than the model's window of {_window(model)} "
                      f"tokens less --max_gen_toks {max_gen_toks}: truncated from the left", stacklevel=2)
    return {"n": len(tests), "accuracy": {"exact_match": correct / len(tests)}, "predictions": predictions}


def evaluate_task(model, tokenizer, docs, **kw):
    """Multiple choice when the examples have choices, else exact match."""
    if "choices" in docs[0]:
        kw.pop("max_gen_toks", None)
        return evaluate_choices(model, tokenizer, docs, **kw)
    kw.pop("answer_context", None)
    kw.pop("batch_size", None)
    return evaluate_generation(model, tokenizer, docs, **kw)


# ----------------------------------------------------------------------------- speed
def bench_eval(model, tokenizer, docs, batch_sizes=(1, 32), rounds=3):
    """Multiple-choice examples per second at each batch size (median of `rounds`, alternated)."""
    times = {b: [] for b in batch_sizes}
    n = sum(d.get("split", "test") == "test" for d in docs)
    for _ in range(rounds):
        for b in batch_sizes:
            t0 = time.perf_counter()
            evaluate_choices(model, tokenizer, docs, batch_size=b)
            times[b].append(time.perf_counter() - t0)
    return {f"batch {b}": n / sorted(t)[len(t) // 2] for b, t in times.items()}


# ----------------------------------------------------------------------------- command line
def summary(result, args):
    """The result in a few readable lines (stderr, before the JSON on stdout)."""
    source = args.out_dir or args.hf_dir
    if args.bench:
        lines = [f"{source} on {args.task}: multiple-choice examples per second, " +
                 ", ".join(f"{k} {v:,.1f}" for k, v in result.items())]
    elif args.text:
        lines = [f"{source} on {args.text}: {result['tokens']:,} tokens, {result['bytes']:,} bytes",
                 f"  perplexity {result['perplexity']:,.3f} per token, {result['bits_per_byte']:.4f} bits per byte"]
    else:
        acc = result["accuracy"]
        lines = [f"{source} on {args.task}: {result['n']} test examples, {args.num_fewshot} shots (seed {args.seed})"]
        if "exact_match" in acc:
            lines.append(f"  exact match {acc['exact_match']:.1%}")
        else:
            names = {"sum": "sum log P (acc)", "token": "per token", "char": "per character (acc_norm)",
                     "unconditional": "unconditional"}
            lines += [f"  accuracy, {names[k]:<26} {v:.1%}" for k, v in acc.items()]
    if result.get("unknown_characters"):
        lines.append(f"  {result['unknown_characters']} unknown characters were {args.unknown}"
                     f"{'d' if args.unknown == 'replace' else 'ped'} (--unknown {args.unknown})")
    return "\n".join(lines)


def argument_parser():
    p = Parser(__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--out_dir", default="", help="a train.py run (ckpt.pt + tokenizer)")
    src.add_argument("--hf_dir", default="", help="a Hugging Face Llama directory with tokenizer.json")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help="a JSONL task file (see above)")
    what.add_argument("--text", help="a UTF-8 text file: perplexity and bits per byte")
    p.add_argument("--num_fewshot", type=Number(int, 0), default=0, help="K shots per test example")
    p.add_argument("--seed", type=Number(int, 0), default=0, help="seeds the draw of the shots")
    p.add_argument("--description", default="", help="a task description put before the shots")
    p.add_argument("--answer_context", default=ANSWER_CONTEXT, help="for the unconditional normalization")
    p.add_argument("--max_gen_toks", type=Number(int, 1), default=32, help="exact match: the longest greedy answer")
    p.add_argument("--stride", type=Number(int, 0), default=0, help="--text: tokens scored per window (0: the window)")
    p.add_argument("--batch_size", type=Number(int, 1), default=32, help="sequences per forward pass")
    p.add_argument("--adapter", default="", help="a PEFT adapter directory (or a --peft run's out_dir)")
    p.add_argument("--quantize", default="", choices=["", "nf4", "nf4-dq", "int8"],
                   help="store the blocks' linear layers quantized (quant.quantize_model)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--unknown", default="error", choices=UNKNOWN, help="characters a character-level model "
                   f"cannot encode: an error naming the first, skipped, or replaced by {REPLACEMENT!r}")
    p.add_argument("--bench", action="store_true", help="--task: multiple-choice examples/s at batch 1 and "
                   "--batch_size instead of the accuracies")
    return p


def parse_args(argv):
    """argv -> the options, every number checked (before any file is read)."""
    return argument_parser().parse_args(argv)


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.task:
            read_task(args.task)  # bad lines are found before the model loads
        if args.text and not os.path.isfile(args.text):
            raise FileNotFoundError(f"--text {args.text}: no such file")
        device = resolve_device(args.device)
        model, tokenizer = load_model(args.out_dir, args.hf_dir, device, args.adapter, args.quantize)
        if args.text:
            with open(args.text, encoding="utf-8") as f:
                text, n_unknown = clean_text(tokenizer, f.read(), args.text, args.unknown)
        else:
            docs, n_unknown = read_task(args.task, tokenizer, args.unknown)
            description, n = clean_text(tokenizer, args.description, "--description", args.unknown)
            answer_context, m = clean_text(tokenizer, args.answer_context, "--answer_context", args.unknown)
            n_unknown += n + m
        if args.bench:
            if args.text or "choices" not in docs[0]:
                raise ValueError("--bench measures a multiple-choice --task")
            result = bench_eval(model, tokenizer, docs, (1, args.batch_size))
        elif args.text:
            result = perplexity(model, tokenizer, text, args.stride or None, args.batch_size)
        else:
            result = evaluate_task(model, tokenizer, docs, k=args.num_fewshot, seed=args.seed,
                                   description=description, answer_context=answer_context,
                                   batch_size=args.batch_size, max_gen_toks=args.max_gen_toks)
            result.pop("predictions", None)
        if n_unknown:
            result["unknown_characters"] = n_unknown
    except (ValueError, OSError, ImportError) as e:
        exit_with_error(e)
    print(summary(result, args), file=sys.stderr)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"  # one line, no source excerpt
    main()
