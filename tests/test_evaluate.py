"""evaluate.py: log-likelihoods as lm-evaluation-harness and transformers compute them, GPT-3's
normalizations, K-shot prompts, a rigged task scored 100%, one-line errors, the ICL experiment."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import evaluate
import sample
from checkpoint import save_checkpoint, write_json
from conftest import ROOT, one_error_line, tiny_config
from data.tokenizer import CharTokenizer
from model import Transformer

CHARS = "\n abcdefghij:"
HIGH = 10.0  # the rigged model's logit for the token its rule picks (0 for every other)
LP_HIGH = HIGH - math.log(math.exp(HIGH) + len(CHARS) - 1)  # log-probability of that token
LP_LOW = -math.log(math.exp(HIGH) + len(CHARS) - 1)  # of any other token


def approx(x, abs=1e-6):
    return pytest.approx(x, rel=1e-4, abs=abs)  # float32 logits


class Rigged(nn.Module):
    """A "model" whose next token follows a rule we know: after a space, the letter after the
    last letter seen (or "a"); after a letter that follows a space, a newline; else a space.
    So "abc" continues " d\\n": the answer of the task "abc -> d"."""

    def __init__(self, block_size=64):
        super().__init__()
        self.config = tiny_config(vocab_size=len(CHARS), block_size=block_size)
        self.tok_embeddings = nn.Embedding(len(CHARS), 1)

    def rule(self, ids):
        space, newline, letters = CHARS.index(" "), CHARS.index("\n"), "abcdefghij"
        last = ids[-1]
        if last == space:
            seen = [i for i in ids if CHARS[i] in letters]
            return CHARS.index(letters[(letters.index(CHARS[seen[-1]]) + 1) % 10]) if seen else CHARS.index("a")
        if CHARS[last] in letters:
            return newline if len(ids) > 1 and ids[-2] == space else space
        return space

    def forward(self, idx):  # (B, T) -> (B, T, vocab)
        rows = [[self.rule(row[:t + 1]) for t in range(len(row))] for row in idx.tolist()]
        return HIGH * F.one_hot(torch.tensor(rows), len(CHARS)).float(), None

    def generate_tokens(self, idx, max_new_tokens, temperature=0, n_vocab=None):
        ids = idx[0].tolist()
        for _ in range(max_new_tokens):
            ids.append(self.rule(ids))
            yield torch.tensor([ids[-1]])


def successor_task(n_test=6, n_train=5):
    """'abc' -> 'd': choices the successor letter and two wrong ones (never 'b', the
    unconditional favourite after 'a', which would tie with it)."""
    docs = []
    for i in range(n_train + n_test):
        start = 1 + i % 6  # queries 'bcd' .. 'ghi'
        query = "abcdefghij"[start:start + 3]
        gold = "abcdefghij"[start + 3]
        wrong = [c for c in "ceg" if c != gold][:2]
        choices = wrong[:i % 3] + [gold] + wrong[i % 3:]
        docs.append({"query": query, "choices": choices, "gold": i % 3, "answer": gold, "until": ["\n"],
                     "split": "train" if i < n_train else "test"})
    return docs


# ----------------------------------------------------------------------------- log-likelihood
def test_loglikelihood_by_hand():
    model, tok = Rigged(), CharTokenizer(CHARS)
    ctx, cont = evaluate.encode_pair(tok, "abc ", "d")  # the trailing space moves to the continuation
    assert (ctx, cont) == (tok.encode("abc"), tok.encode(" d"))
    lp, greedy = evaluate.loglikelihood(model, ctx, cont)
    assert lp == approx(2 * LP_HIGH) and greedy
    lp, greedy = evaluate.loglikelihood(model, ctx, tok.encode(" e"))
    assert lp == approx(LP_HIGH + LP_LOW) and not greedy


def test_loglikelihood_truncates_from_the_left_and_warns():
    model, tok = Rigged(block_size=8), CharTokenizer(CHARS)
    ctx = tok.encode("a" * 20 + "bcd")
    with pytest.warns(UserWarning, match="1 of 1 requests are longer than the model's window of 8"):
        lp, greedy = evaluate.loglikelihood(model, ctx, tok.encode(" e"))
    assert lp == approx(2 * LP_HIGH) and greedy
    with pytest.raises(ValueError, match="does not fit the model's window"):
        evaluate.loglikelihood(model, ctx, [0] * 9)


def test_batched_equals_unbatched():
    model = Transformer(tiny_config()).eval()
    g = torch.Generator().manual_seed(1)
    lengths = [(5, 3), (17, 1), (2, 9), (30, 4), (11, 11)]
    ctxs = [torch.randint(97, (a,), generator=g).tolist() for a, _ in lengths]
    conts = [torch.randint(97, (b,), generator=g).tolist() for _, b in lengths]
    one = [evaluate.loglikelihood(model, c, t) for c, t in zip(ctxs, conts)]
    batched = evaluate.loglikelihood(model, ctxs, conts, batch_size=3)
    assert [g for _, g in one] == [g for _, g in batched]
    assert [lp for lp, _ in batched] == approx([lp for lp, _ in one], abs=1e-4)
    by_hand = F.log_softmax(model(torch.tensor([ctxs[0] + conts[0][:-1]]))[0][0], -1)  # (T, vocab)
    assert one[0][0] == approx(sum(by_hand[len(ctxs[0]) - 1 + j, t].item() for j, t in enumerate(conts[0])),
                                      abs=1e-4)


def test_loglikelihood_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the oracle is transformers' LlamaForCausalLM")
    import hf
    ours = Transformer(tiny_config(n_layer=2)).eval()
    hf.save_llama(ours, str(tmp_path))
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    loaded = hf.load_llama(str(tmp_path)).eval()
    ctx, cont = list(range(3, 20)), [5, 50, 7, 7]
    with torch.no_grad():
        logits = theirs(torch.tensor([ctx + cont[:-1]])).logits[0].float()  # (T, vocab)
    lp = F.log_softmax(logits, -1)[len(ctx) - 1:]  # the positions that predict the continuation
    expected = lp.gather(-1, torch.tensor(cont)[:, None]).sum().item()
    greedy = bool((lp.argmax(-1) == torch.tensor(cont)).all())
    got = evaluate.loglikelihood(loaded, ctx, cont)
    assert got[0] == approx(expected, abs=1e-4) and got[1] == greedy
    top = lp.argmax(-1).tolist()  # the greedy continuation itself is greedy, in both
    assert evaluate.loglikelihood(loaded, ctx, top[:1])[1]


def test_a_hugging_face_directory_with_its_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="reading tokenizer.json needs the tokenizers package")
    import hf
    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab["</s>"] = len(vocab)  # HFTokenizer's end-of-text token: perplexity conditions the first token on it
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(".|\n"), behavior="isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    ours = Transformer(tiny_config(vocab_size=len(vocab))).eval()
    hf.save_llama(ours, str(tmp_path))
    tok.save(str(tmp_path / "tokenizer.json"))
    model, loaded_tok = sample.load_model(hf_dir=str(tmp_path))
    text = "abc d\nefg h\n"
    ids = [vocab[c] for c in text]
    got = evaluate.perplexity(model, loaded_tok, text)
    by_hand = F.log_softmax(ours(torch.tensor([[len(CHARS)] + ids[:-1]]))[0][0], -1)  # (T, vocab)
    nll = -by_hand[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
    assert got["tokens"] == len(ids) and got["bytes"] == len(text)
    assert got["bits_per_byte"] == approx(nll / (math.log(2) * len(text)))


def test_perplexity_and_bits_per_byte_by_hand():
    model, tok = Rigged(block_size=8), CharTokenizer(CHARS)
    text = "\n a\n b\n c\n d\n e\n f\n"  # every token after the first follows the rule, given 2 before it
    got = evaluate.perplexity(model, tok, text, stride=4)  # every window has >= 8 + 1 - 4 tokens of context
    n = len(text) - 1  # a char tokenizer has no end-of-text token: the first is not scored
    assert got["tokens"] == n and got["bytes"] == n
    assert got["bits_per_byte"] == approx(-LP_HIGH / math.log(2))
    assert got["perplexity"] == approx(math.exp(-LP_HIGH))
    # disjoint windows of 8 at tokens 1, 9, 17: the first two read one token before them, the
    # last (2 tokens long) 7. Only token 9 is guessed wrong: after a lone "c", a space, not "\n".
    disjoint = evaluate.perplexity(model, tok, text)
    assert disjoint["perplexity"] == approx(math.exp(-(17 * LP_HIGH + LP_LOW) / 18))


# ----------------------------------------------------------------------------- tasks
def test_normalizations_by_hand():
    lls, n_tokens, n_chars, unconditional = [-6.0, -4.0, -5.0], [6, 2, 10], [3, 4, 2], [-5.5, -1.0, -2.0]
    scores = evaluate.normalized_scores(lls, n_tokens, n_chars, unconditional)
    assert scores == {"sum": [-6.0, -4.0, -5.0], "token": [-1.0, -2.0, -0.5], "char": [-2.0, -1.0, -2.5],
                      "unconditional": [-0.5, -3.0, -3.0]}
    assert [evaluate.argmax(scores[k]) for k in evaluate.NORMALIZATIONS] == [1, 2, 1, 0]


def test_a_task_whose_answer_is_known_scores_100_percent():
    model, tok = Rigged(), CharTokenizer(CHARS)
    docs = successor_task()
    for k in (0, 2):
        got = evaluate.evaluate_choices(model, tok, docs, k=k, seed=3, answer_context="a")
        assert got["n"] == 6 and got["accuracy"] == {name: 1.0 for name in evaluate.NORMALIZATIONS}
        got = evaluate.evaluate_generation(model, tok, docs, k=k, max_gen_toks=5)
        assert got["accuracy"]["exact_match"] == 1.0
        assert got["predictions"] == [" " + d["answer"] for d in docs if d["split"] == "test"]  # cut at "\n"
    wrong = [{**d, "gold": (d["gold"] + 1) % 3} for d in docs]
    assert evaluate.evaluate_choices(model, tok, wrong, answer_context="a")["accuracy"]["sum"] == 0.0


def test_fewshot_is_seeded_nested_and_never_leaks():
    docs = [{"query": f"q{i}", "answer": f"a{i}", "split": "train"} for i in range(20)]
    docs += [{"query": f"q{i}", "answer": "x", "split": "test"} for i in (3, 30, 31)]  # q3 also in train
    for i in range(20, 23):
        shots = evaluate.fewshot(docs, i, 8, seed=5)
        assert shots == evaluate.fewshot(docs, i, 8, seed=5)
        assert evaluate.fewshot(docs, i, 4, seed=5) == shots[:4]
        assert all(s["split"] == "train" and s["query"] != docs[i]["query"] for s in shots)
    assert evaluate.fewshot(docs, 21, 8, seed=5) != evaluate.fewshot(docs, 21, 8, seed=6)
    assert len(evaluate.fewshot(docs, 20, 19, seed=0)) == 19  # all the train lines but q3
    with pytest.raises(ValueError, match="only 19 examples"):
        evaluate.fewshot(docs, 20, 20, seed=0)
    tests_only = [d for d in docs if d["split"] == "test"]  # no train split: the other test lines
    assert [s["query"] for s in evaluate.fewshot(tests_only, 0, 2, seed=0)] in (["q30", "q31"], ["q31", "q30"])
    prompt = evaluate.build_prompt(docs[20], docs[:2], "Say a.")
    assert prompt == "Say a.\n\nq0 a0\n\nq1 a1\n\nq3"


# ----------------------------------------------------------------------------- the command line
@pytest.fixture
def run_dir(tmp_path):
    """A train.py-shaped out_dir holding a tiny model and a character tokenizer."""
    model = Transformer(tiny_config(vocab_size=len(CHARS), block_size=16))
    out = tmp_path / "run"
    out.mkdir()
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict(),
                     "train_config": {"peft": ""}}, str(out / "ckpt.pt"))
    write_json({"tokenizer": "char", "chars": CHARS}, str(out / "meta.json"))
    return out


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_bad_inputs_are_one_line_each(run_dir, tmp_path, capsys):
    bad = {"json": '{"query": "ab", "answer": "c"}\n\n{"query": "ab", "answer": \n',
           "gold": '{"query": "ab", "answer": "c"}\n{"query": "ab", "choices": ["c", "d", "e"], "gold": 3}\n',
           "gold_text": '{"query": "ab", "choices": ["c", "d"], "gold": "0"}\n'}
    expected = {"json": "line 3: not valid JSON", "gold": "line 2: gold 3 is out of range for 3 choices",
                "gold_text": "line 1: gold must be an integer index (0 .. 1), got the str '0'; write it without quotes"}
    for name, text in bad.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--out_dir", str(run_dir), "--task", str(tmp_path / f"{name}.jsonl")])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith("error: ") and expected[name] in err and err.count("\n") == 1
    long = {"query": "abcdefgh" * 3, "choices": ["c", "d"], "gold": 0}
    (tmp_path / "long.jsonl").write_text(json.dumps(long) + "\n" + json.dumps({**long, "query": "ab"}) + "\n")
    r = cli("--out_dir", run_dir, "--task", tmp_path / "long.jsonl", "--device", "cpu", "--answer_context", "a")
    assert r.returncode == 0, r.stderr
    warning, *summary = r.stderr.splitlines()
    assert warning == ("warning: 2 of 8 requests are longer than the model's window of 16 tokens: "
                       "their contexts were truncated from the left")
    result = json.loads(r.stdout)  # stdout is the JSON alone; the readable summary went to stderr first
    assert result["n"] == 2
    assert summary[0] == f"{run_dir} on {tmp_path / 'long.jsonl'}: 2 test examples, 0 shots (seed 0)"
    assert summary[1:] == [f"  accuracy, {name:<26} {result['accuracy'][key]:.1%}" for key, name in
                           [("sum", "sum log P (acc)"), ("token", "per token"), ("char", "per character (acc_norm)"),
                            ("unconditional", "unconditional")]]


def test_unknown_characters_are_named_or_skipped_or_replaced(run_dir, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("abc def\nab\u2581cd ghij\nXa")  # '▁' (line 2, column 3) and 'X' are not in CHARS
    err = one_error_line(capsys, evaluate.main, ["--out_dir", str(run_dir), "--text", str(notes), "--device", "cpu"])
    assert err == (f"error: {notes}: character '\u2581' (line 2, column 3) is not in the model's vocabulary of "
                   f"{len(CHARS)} characters, nor are 1 more; --unknown skip drops them, --unknown replace makes "
                   f"them ' '")
    model, tok = sample.load_model(str(run_dir))
    for how, clean in [("skip", "abc def\nabcd ghij\na"), ("replace", "abc def\nab cd ghij\n a")]:
        evaluate.main(["--out_dir", str(run_dir), "--text", str(notes), "--device", "cpu", "--unknown", how])
        out = capsys.readouterr()
        result = json.loads(out.out)
        assert result == {**evaluate.perplexity(model, tok, clean), "unknown_characters": 2}
        assert out.err.splitlines()[-1] == f"  2 unknown characters were {how}{'d' if how == 'replace' else 'ped'} " \
                                           f"(--unknown {how})"
    task = tmp_path / "task.jsonl"
    task.write_text('{"query": "ab", "answer": "c"}\n\n{"query": "ab", "choices": ["c", "Dd"], "gold": 0}\n')
    err = one_error_line(capsys, evaluate.main, ["--out_dir", str(run_dir), "--task", str(task), "--device", "cpu"])
    assert err.startswith(f'error: {task} line 3, "choices": character \'D\' (line 1, column 1) is not in')


@pytest.mark.slow  # the experiment: the slow set (conftest.py)
def test_icl_experiment_quick(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EXPERIMENTS_OUT": str(tmp_path)}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "icl.py"), "--quick"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "icl_quick.png").stat().st_size > 10_000
    result = json.loads((tmp_path / "icl_quick.json").read_text())
    shots = result["shots"]
    for row in result["models"].values():
        assert set(row["curves"]) == {f"{t}|{d}" for t in ("clean", "upper", "symbols", "mapping")
                                      for d in ("none", "description")}
        for acc in row["curves"].values():  # per K, one accuracy per seed, each a multiple of 1/n
            assert len(acc) == len(shots) and all(len(a) == result["seeds"] and all(0 <= x <= 1 for x in a)
                                                  for a in acc)
        assert set(row["templates"]) == {"arrow", "io", "qa"}
        scores = torch.tensor(row["induction_scores"])  # attention weights: each in [0, 1]
        assert scores.shape == (row["n_layer"], row["n_head"]) and 0 <= scores.min() <= scores.max() <= 1
        assert list(row["best_head"]) == list(divmod(int(scores.argmax()), row["n_head"]))
