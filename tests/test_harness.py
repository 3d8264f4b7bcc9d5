"""evaluate.py against EleutherAI's lm-evaluation-harness (`lm_eval`, its HFLM on our model
exported by hf.save_llama) as the oracle: the same token ids and log-likelihoods for text
requests (whitespace endings, BPE merges across the context/answer boundary, unicode, an
empty context), the same rolling log-likelihood, the same acc / acc_norm on a task; and
harness.py, our model as `lm_eval --model nano`, on a local task.

The oracle runs in a subprocess in another directory: from the repository's root, our
peft.py and evaluate.py would stand in for the packages of those names."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import sample
from conftest import ROOT, tiny_config
from model import Transformer

needs_harness = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="the oracle is lm-evaluation-harness: pip install lm_eval==0.4.13 "
                                          "(requirements-test.txt)")

# (context, continuation): hand-made to hit each way a split can go wrong
REQUESTS = [
    ("Return the value of", " the expression"),  # plain: the space moves to the continuation
    ("Question: what does it return?\n", "Answer: the object"),  # trailing "\n"
    ("name\t", "value"),  # trailing "\t"
    ("def f(x):\n   ", "return x"),  # trailing "\n   "
    ("x =  ", "1"),  # two trailing spaces
    ("the", " object is"),  # "the▁" is a piece: the tokenizer merges across the boundary
    ("in", " the"),
    ("of", " the"),
    ("to", " be"),
    ("café", " crème brûlée"),  # unicode: byte fallback
    ("日本", "語のテキスト"),
    ("smile 😀", " ok"),
    ("", "The first words"),  # empty context: conditioned on <s>
    ("", "<s> is literal"),  # ... whose first token is <s> itself
    ("a literal </s> in", " the text"),  # added tokens' text is their id
]
TEXTS = ["The value of the object is returned.\n\tIndented  twice.", "日本語 and café", "x"]


def train_tokenizer(path, vocab_size=600):
    """A Llama-style tokenizer.json (TinyLlama's legacy normalizer, byte fallback, no
    pre-tokenizer: merges cross spaces, so pieces like "the▁" exist), trained on pydoc."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, limit_alphabet=90,
                                  special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator((topics[k] for k in sorted(topics)[:60]), trainer)
    tok.save(path)
    return tok


def write_hf_dir(path, seed=0):
    """A tiny random Llama as a Hugging Face directory that transformers' AutoTokenizer reads."""
    os.makedirs(path, exist_ok=True)
    tok = train_tokenizer(os.path.join(path, "tokenizer.json"))
    torch.manual_seed(seed)
    model = Transformer(tiny_config(vocab_size=tok.get_vocab_size(), block_size=32)).eval()
    import hf
    hf.save_llama(model, path)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "model_max_length": 32}, f)
    return path


# the three kinds of harness requests, each a task over a JSONL file of {"query", "choices", "gold", "answer"}
TASKS = {
    "nano_local_mc": "output_type: multiple_choice\ndoc_to_text: '{{query}}'\ndoc_to_choice: '{{choices}}'\n"
                     "doc_to_target: gold\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    "nano_local_rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{query}}'\n"
                          "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
    "nano_local_gen": "output_type: generate_until\ndoc_to_text: '{{query}}'\ndoc_to_target: '{{answer}}'\n"
                      "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 6\n  do_sample: false\n"
                      "metric_list:\n  - metric: exact_match\n",
}


def write_tasks(folder, docs):
    """TASKS as YAML files in folder, over one JSONL file of docs (the harness's --include_path)."""
    data = os.path.join(folder, "docs.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    for name, body in TASKS.items():
        with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
            f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    f"test_split: test\n{body}")
    return data


def mc_docs():
    """Multiple choice whose choices the tokenizer merges into the query's last word."""
    from pydoc_data.topics import topics
    words = " ".join(topics[k] for k in sorted(topics)[:5]).split()
    docs = []
    for i in range(40):
        query = " ".join(words[3 * i:3 * i + 6])
        choices = [words[3 * i + 6], "the", "of the", words[i + 100]]
        docs.append({"query": query, "choices": choices, "gold": i % 4, "answer": choices[i % 4]})
    return docs


ORACLE = r"""
import json, sys
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
spec = json.load(open(sys.argv[1]))
lm = HFLM(pretrained=spec["hf_dir"], device="cpu", batch_size=8, dtype="float32")
requests = [Instance("loglikelihood", {}, tuple(r), i) for i, r in enumerate(spec["requests"])]
out = {"loglikelihood": lm.loglikelihood(requests, disable_tqdm=True),
       "ids": [lm._encode_pair(c, t) if c else None for c, t in spec["requests"]],
       "rolling": lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                            for i, t in enumerate(spec["texts"])], disable_tqdm=True)}
if spec.get("tasks"):
    r = simple_evaluate(model=lm, tasks=spec["tasks"], task_manager=TaskManager(include_path=spec["task_dir"]),
                        bootstrap_iters=0, log_samples=True)
    out["results"] = r["results"]
    out["responses"] = {t: [s["resps"] for s in r["samples"][t]] for t in spec["tasks"]}
json.dump(out, open(sys.argv[2], "w"))
"""


def harness_env(tmp):
    """No repository on the path, datasets' cache in tmp, nothing from the Hub."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_CACHE": os.path.join(tmp, "datasets"), "TOKENIZERS_PARALLELISM": "false"}


def run_oracle(tmp, spec):
    """ORACLE in a subprocess whose working directory is tmp (not the repository)."""
    with open(os.path.join(tmp, "spec.json"), "w") as f:
        json.dump(spec, f)
    r = subprocess.run([sys.executable, "-c", ORACLE, "spec.json", "out.json"], cwd=tmp, env=harness_env(tmp),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(tmp, "out.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("the oracle is lm-evaluation-harness: pip install lm_eval==0.4.13 (requirements-test.txt)")
    tmp = str(tmp_path_factory.mktemp("harness"))
    hf_dir = write_hf_dir(os.path.join(tmp, "hf"))
    docs = mc_docs()
    write_tasks(tmp, docs)
    out = run_oracle(tmp, {"hf_dir": hf_dir, "requests": REQUESTS, "texts": TEXTS, "tasks": list(TASKS),
                           "task_dir": tmp})
    model, tokenizer = sample.load_model(hf_dir=hf_dir)
    return {"out": out, "model": model, "tokenizer": tokenizer, "docs": docs, "hf_dir": hf_dir, "tmp": tmp}


# ----------------------------------------------------------------------------- text requests
@needs_harness
def test_text_requests_give_the_harness_ids_and_log_likelihoods(oracle):
    model, tok, out = oracle["model"], oracle["tokenizer"], oracle["out"]
    pairs = [evaluate.encode_pair(tok, c, t) for c, t in REQUESTS]
    for (c, t), ours, theirs in zip(REQUESTS, pairs, out["ids"]):
        if theirs is not None:
            assert [list(ours[0]), list(ours[1])] == theirs, (c, t)
    merged = [c for c, t in REQUESTS if c and tok.encode(c + t)[:len(tok.encode(c.rstrip()))] != tok.encode(c.rstrip())]
    assert len(merged) >= 3, merged  # the boundary merge is exercised, not just present in the list
    got = evaluate.loglikelihood(model, [p[0] for p in pairs], [p[1] for p in pairs])
    assert [g for _, g in got] == [g for _, g in out["loglikelihood"]]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in out["loglikelihood"]], abs=1e-4)


@needs_harness
def test_rolling_log_likelihood_is_the_harness(oracle):
    got = [evaluate.loglikelihood_rolling(oracle["model"], oracle["tokenizer"], t)[0] for t in TEXTS]
    assert got == pytest.approx(oracle["out"]["rolling"], abs=1e-4)


@needs_harness
def test_multiple_choice_acc_and_acc_norm_are_the_harness(oracle):
    got = evaluate.evaluate_choices(oracle["model"], oracle["tokenizer"], oracle["docs"])
    theirs = oracle["out"]["results"]["nano_local_mc"]
    assert got["n"] == len(oracle["docs"])
    assert got["accuracy"]["sum"] == pytest.approx(theirs["acc,none"])
    assert got["accuracy"]["char"] == pytest.approx(theirs["acc_norm,none"])


# ----------------------------------------------------------------------------- harness.py: --model nano
def flat(x):
    """Nested lists / tuples of numbers and booleans -> one flat list of floats."""
    return [float(v) for item in x for v in flat(item)] if isinstance(x, (list, tuple)) else [x]


@needs_harness
def test_the_nano_model_answers_the_harness_as_its_own_hf_model_does(oracle):
    """The three tasks through the harness's registry by name ("nano"), in this process (our
    evaluate.py is the module of that name here; the harness's metrics used need no other)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import harness  # noqa: F401  (registers "nano")
    r = simple_evaluate(model="nano", model_args=f"hf_dir={oracle['hf_dir']},batch_size=8", tasks=list(TASKS),
                        task_manager=TaskManager(include_path=oracle["tmp"]), bootstrap_iters=0, log_samples=True,
                        device="cpu")
    theirs = oracle["out"]
    for task in TASKS:
        ours = [s["resps"] for s in r["samples"][task]]
        if task == "nano_local_gen":  # greedy text, cut at the first stop string
            assert ours == theirs["responses"][task]
        else:  # per doc, per request: (logprob, is_greedy) or a logprob
            assert flat(ours) == pytest.approx(flat(theirs["responses"][task]), abs=1e-4)
        for metric, value in theirs["results"][task].items():
            if metric.endswith(",none") and "stderr" not in metric:
                assert r["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)


@needs_harness
@pytest.mark.slow  # a documented command, minutes on a busy CPU (conftest.py)
def test_the_documented_command_scores_a_train_run(tmp_path):
    """`python harness.py --model nano --model_args out_dir=RUN ...` from the repository's root,
    on a character-level train.py run: the harness's acc is evaluate.py's."""
    from test_evaluate import CHARS, successor_task
    run = tmp_path / "run"
    run.mkdir()
    from checkpoint import save_checkpoint, write_json
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=len(CHARS), block_size=16)).eval()
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict(),
                     "train_config": {"peft": ""}}, str(run / "ckpt.pt"))
    write_json({"tokenizer": "char", "chars": CHARS}, str(run / "meta.json"))
    docs = [d for d in successor_task(n_test=12, n_train=0)]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(str(tasks), docs)
    r = subprocess.run([sys.executable, "harness.py", "--model", "nano", "--model_args", f"out_dir={run}",
                        "--tasks", "nano_local_mc", "--include_path", str(tasks), "--output_path", str(tmp_path / "out"),
                        "--device", "cpu"], cwd=ROOT, env=harness_env(str(tmp_path)), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    [path] = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "out") for f in files if f.startswith("results")]
    with open(path) as f:
        got = json.load(f)["results"]["nano_local_mc"]
    ours = evaluate.evaluate_choices(model, sample.load_model(str(run))[1], docs, answer_context="a")["accuracy"]
    assert (got["acc,none"], got["acc_norm,none"]) == pytest.approx((ours["sum"], ours["char"]))
    assert "|nano_local_mc|" in r.stdout.replace(" ", "")  # the harness's own table


@needs_harness
def test_a_llava_run_is_scored_on_text_by_its_decoder(tmp_path):
    """A llava.py run's out_dir: the harness's text requests go to its decoder, which reads
    text as the whole LLaVA model does when no image is given."""
    import torch.nn.functional as F
    from lm_eval.api.instance import Instance

    import harness
    import llava
    tok = llava.WordTokenizer(llava.build_vocab())
    model = llava.new_llava(tok, llava.Settings(**llava.QUICK), "mlp").eval()
    llava.save(model, tok, str(tmp_path / "ckpt.pt"))
    lm = harness.NanoLM(out_dir=str(tmp_path), device="cpu")
    context, continuation = "USER: what colour is the circle? ASSISTANT:", " red."
    [(got, _)] = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    c, t = tok.encode(context), tok.encode(continuation)
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([c + t[:-1]]))[0][0], -1)[len(c) - 1:]  # (len(t), vocab)
    assert got == pytest.approx(lp.gather(-1, torch.tensor(t)[:, None]).sum().item(), abs=1e-4)
