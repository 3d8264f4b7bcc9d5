"""align.py: the losses against hand-computed values, GAE against a plain loop, the PPO clip
against its definition, KL = 0 before the first update, a reward model that learns to rank,
exact resume, bad input, and the experiment's --quick smoke run."""

import json
import math
import os
import string
import subprocess
import sys

import pytest
import torch

import align
from align import AlignConfig, EOT, FAMILIES, Run, render
from checkpoint import save_checkpoint, write_json
from conftest import ROOT
from model import ModelConfig, Transformer
from runs import load_run

ALPHABET = "".join(sorted(set(string.printable[:-5]) | {align.USER, align.BOT, EOT}))


def make_base(path, chars=ALPHABET, seed=0):
    """A randomly initialized 'pretrained' run with a character tokenizer holding the template's markers."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=len(chars), block_size=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=2)
    model = Transformer(config)
    os.makedirs(path, exist_ok=True)
    save_checkpoint({"model": model.state_dict(), "model_config": config.to_dict(), "iter_num": 0,
                     "train_config": {"peft": "", "dataset": ""}}, os.path.join(path, "ckpt.pt"))
    write_json({"tokenizer": "char", "chars": chars, "vocab_size": len(chars)}, os.path.join(path, "meta.json"))
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base"))


def tiny(init_from, out_dir, **kw):
    sizes = dict(batch_size=4, eval_every=1000, eval_prompts=2, prompts_per_step=2, samples_per_prompt=2,
                 ppo_epochs=2, minibatches=2, max_new_tokens=6, learning_rate=3e-3, warmup_iters=0)
    return AlignConfig(init_from=init_from, out_dir=str(out_dir), **{**sizes, **kw})


# ----------------------------------------------------------------------------- losses, by hand
def test_reward_loss_is_mean_minus_log_sigmoid_of_the_margin():
    loss = align.reward_loss(torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0]))
    by_hand = (math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(2))) / 3
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)


def test_dpo_loss_by_hand():
    # margin = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) = (-1 + 2) - (-3 + 2) = 2
    loss = align.dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.0)), abs=1e-6)  # -log sigmoid(0.5 * 2)
    same = align.dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.1)
    assert same.item() == pytest.approx(math.log(2), abs=1e-7)  # policy == reference: log 2


def test_gae_matches_a_plain_python_loop():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    gamma, lam = 0.9, 0.8
    adv, ret = align.gae(rewards, values, gamma, lam)
    for b in range(3):
        a, expected = 0.0, [0.0] * 7
        for t in reversed(range(7)):
            next_v = values[b, t + 1].item() if t + 1 < 7 else 0.0
            a = rewards[b, t].item() + gamma * next_v - values[b, t].item() + gamma * lam * a
            expected[t] = a
        assert adv[b].tolist() == pytest.approx(expected, abs=1e-5)
    assert torch.allclose(ret, adv + values)


def test_gae_with_lambda_and_gamma_one_is_reward_to_go_minus_value():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.25, 0.125]])
    adv, ret = align.gae(rewards, values, 1.0, 1.0)
    assert adv.tolist() == [[0.5, 0.75, 0.875]] and ret.tolist() == [[1.0, 1.0, 1.0]]


def test_ppo_clip_against_its_definition():
    ratios = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5, 0.5, 1.5])
    advs = torch.tensor([1.0, 1.0, -2.0, 1.0, 1.0, -1.0, -1.0])
    old = torch.zeros(7)
    eps = 0.2
    got = align.clipped_surrogate(ratios.log(), old, advs, eps)
    for r, a, x in zip(ratios.tolist(), advs.tolist(), got.tolist()):
        assert x == pytest.approx(-min(r * a, min(max(r, 1 - eps), 1 + eps) * a), abs=1e-6)
    # A > 0 and ratio 1.5: the gain is capped at 1.2 A; A < 0 and ratio 0.5: the loss is at least 0.8 |A|
    assert got[4].item() == pytest.approx(-1.2) and got[5].item() == pytest.approx(0.8)
    # the full loss: masked means of the surrogate and of the clipped value loss
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    values, old_values, returns = torch.tensor([[1.0, 0.0, 9.0]]), torch.tensor([[0.5, 0.0, 0.0]]), torch.zeros(1, 3)
    loss, parts = align.ppo_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[1.0, 3.0, 100.0]]), values,
                                 old_values, returns, mask, clip=0.2, clip_value=0.2, vf_coef=0.5)
    # value: position 0, V = 1 vs clipped 0.7: max(1, 0.49) = 1; position 1: 0; mean 0.5, times 0.5
    assert parts["pg_loss"] == pytest.approx(-2.0) and parts["vf_loss"] == pytest.approx(0.25)
    assert loss.item() == pytest.approx(-2.0 + 0.5 * 0.25)
    # clipfrac as TRL logs it: the clipped term is the active one (ratio 1.5 with A > 0, 0.5 with A < 0),
    # 2 of 7 here; counting every ratio outside [0.8, 1.2] would give 4 of 7
    _, parts = align.ppo_loss(ratios.log()[None], old[None], advs[None], torch.zeros(1, 7), torch.zeros(1, 7),
                              torch.zeros(1, 7), torch.ones(1, 7), clip=eps)
    assert parts["clipfrac"] == pytest.approx(2 / 7)


def test_whiten_and_group_advantages():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 50.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = align.whiten(x, mask)
    # TRL's masked_whiten: the unbiased variance (Bessel's n / (n - 1)): std([1, 2, 3]) = 1
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-4) and w[0, 3] == 0
    adv = align.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 3)
    s = torch.tensor([1.0, 0.0, 0.0]).std().item()  # GRPO: (r - mean) / std within the group
    assert adv[:3].tolist() == pytest.approx([(2 / 3) / (s + 1e-4), (-1 / 3) / (s + 1e-4), (-1 / 3) / (s + 1e-4)])
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]  # a group that all scored alike teaches nothing


# ----------------------------------------------------------------------------- data and labeler
def test_families_phrasings_and_gold_labeler():
    import random
    r = random.Random(0)
    assert len(FAMILIES) >= 8 and all(len(set(p)) >= 3 for p, _ in FAMILIES.values())
    for family in FAMILIES:
        task = align.make_task(family, r)
        assert align.correct(task, task["answer"] + EOT) and align.gold_score(task, task["answer"] + EOT) == 1.0
        assert not align.correct(task, task["answer"])  # a turn must end
    task = {"answer": "tac"}
    assert align.gold_score(task, "tac") == 0.0  # never ended its turn
    assert align.gold_score(task, "tap" + EOT) == pytest.approx(0.5 * (1 - 1 / 3))
    assert align.edit_distance("kitten", "sitting") == 3
    assert render("Hi", "yo") == f"{align.USER}Hi{EOT}{align.BOT}yo{EOT}"


def test_sft_loss_is_on_response_tokens_only():
    seq, mask, last = align.pad_batch([[1, 2, 3], [4, 5]], [[6, 7], [8]])
    assert seq.tolist() == [[1, 2, 3, 6, 7], [4, 5, 8, 0, 0]]
    assert mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]] and last.tolist() == [4, 2]
    assert align.sft_targets(seq, mask).tolist() == [[-100, -100, 6, 7], [-100, 8, -100, -100]]


# ----------------------------------------------------------------------------- PPO and the reward model
@pytest.mark.parametrize("peft_mode", ["", "lora"])
def test_kl_is_exactly_zero_before_the_first_update(base, tmp_path, peft_mode):
    run = Run(tiny(base, tmp_path, peft=peft_mode), "ppo")
    run.frozen_reference()
    run.heads["value"] = torch.nn.Linear(32, 1)
    rm = (Transformer(run.model.config).eval(), torch.nn.Linear(32, 1), True)
    import random
    exp = align.make_experience(run, run.tasks(random.Random(0), 2), rm, it=0)
    assert exp["mask"].sum() > 0
    assert torch.equal(exp["kl"], torch.zeros_like(exp["kl"]))
    rewards_only_score = exp["returns"]  # with KL 0, the only reward is the RM score at the last token
    assert torch.isfinite(rewards_only_score).all()


def synthetic_prefs(path, n, seed):
    """chosen = the right answer (ending its turn), rejected = another family's answer, cut short."""
    import random
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            task = align.make_task(r.choice(["upper", "first", "add"]), r)
            f.write(json.dumps({"prompt": task["prompt"], "chosen": task["answer"] + EOT,
                                "rejected": r.choice(["zz", "q", "xyz"])}) + "\n")


def test_reward_model_learns_a_trivially_separable_preference(base, tmp_path):
    """The regression guard's fast half: chosen = the right answer ending its turn, rejected =
    junk that never ends it. Any working RM separates these; one at chance (the drifted 0.50)
    fails here. Held-out prompts only (every 10th of each family)."""
    prefs = tmp_path / "prefs.jsonl"
    synthetic_prefs(prefs, 120, seed=1)
    history = align.run_rm(tiny(base, tmp_path / "rm", prefs=str(prefs), iters=30, eval_every=30, batch_size=16))
    before, after = history["eval"][0]["val_acc"], history["eval"][-1]["val_acc"]
    assert history["eval"][-1]["val_pairs"] >= 9
    assert after >= 0.95 and before < 0.95


def test_reward_model_is_normalized_so_demonstrations_score_zero(base, tmp_path):
    """InstructGPT section 3.5: the RM's bias is shifted so that demonstrations average 0."""
    prefs = tmp_path / "prefs.jsonl"
    synthetic_prefs(prefs, 60, seed=2)
    cfg = tiny(base, tmp_path / "rm", prefs=str(prefs), iters=5, eval_every=5)
    align.run_rm(cfg)
    rm = align.load_reward_model(str(tmp_path / "rm"), base, "cpu")
    run = Run(cfg, "eval")
    assert align.demonstration_score(run, rm) == pytest.approx(0.0, abs=1e-5)


def test_reward_scores_lm_term_is_the_mean_response_logprob():
    """reward_scores with lm=True adds the mean log-probability of the response tokens, by hand."""
    torch.manual_seed(0)
    trunk = Transformer(ModelConfig(vocab_size=11, block_size=16, n_layer=1, n_embd=8, n_head=2, n_kv_head=2))
    head = torch.nn.Linear(8, 1)
    seq, mask, last = align.pad_batch([[1, 2, 3], [4, 5]], [[6, 7], [8]])
    plain = align.reward_scores(trunk, head, False, seq, mask, last)
    with_lm = align.reward_scores(trunk, head, True, seq, mask, last)
    logp = torch.log_softmax(trunk(seq)[0], -1)
    by_hand = [(logp[0, 2, 6] + logp[0, 3, 7]) / 2, logp[1, 1, 8]]
    assert (with_lm - plain).tolist() == pytest.approx([x.item() for x in by_hand], abs=1e-5)


def test_resume_is_exact(base, tmp_path):
    straight = align.run_sft(tiny(base, tmp_path / "a", iters=4, eval_every=2))
    align.run_sft(tiny(base, tmp_path / "b", iters=2, eval_every=2))
    align.run_sft(tiny(base, tmp_path / "b", iters=4, eval_every=2, resume=True))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("a", "b"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [s["loss"] for s in a["history"]["train"]] == [s["loss"] for s in b["history"]["train"]]
    assert len(straight["train"]) == 4


def make_reward_model(base, path):
    """An rm run by hand: the base's trunk and a random scalar head."""
    ckpt = torch.load(os.path.join(base, "ckpt.pt"), weights_only=True)
    g = torch.Generator().manual_seed(0)
    heads = {"reward.weight": torch.randn(1, 32, generator=g), "reward.bias": torch.zeros(1)}
    os.makedirs(path, exist_ok=True)
    save_checkpoint({**ckpt, "heads": heads}, os.path.join(path, "ckpt.pt"))
    align.copy_tokenizer(base, str(path))
    return str(path)


def test_ppo_resume_with_a_shared_lora_base_is_exact(base, tmp_path):
    rm = make_reward_model(base, tmp_path / "rm")
    kw = dict(reward_model=rm, peft="lora", lora_r=2, eval_every=1, learning_rate=1e-2)
    align.run_ppo(tiny(base, tmp_path / "a", iters=2, **kw))
    align.run_ppo(tiny(base, tmp_path / "b", iters=1, **kw))
    align.run_ppo(tiny(base, tmp_path / "b", iters=2, resume=True, **kw))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("a", "b"))
    assert set(a["model"]) == set(b["model"]) and all("lora_" in k for k in a["model"])  # adapters only
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["heads"]["value.weight"], b["heads"]["value.weight"])
    assert a["history"]["train"][1]["kl"] != 0.0  # the second rollouts come from an updated policy
    model, _, _ = load_run(str(tmp_path / "a"))  # the aligned run samples like any train.py run
    assert model.generate(torch.tensor([[1, 2]]), 3, temperature=0).shape == (1, 5)


def test_lora_sft_run_loads_with_runs_load_run(base, tmp_path):
    align.run_sft(tiny(base, tmp_path / "lora", iters=2, peft="lora", lora_r=2))
    model, tok, ckpt = load_run(str(tmp_path / "lora"))
    assert ckpt["train_config"]["peft"] == "lora" and set(ckpt["model"]) == {
        n for n, p in model.named_parameters() if p.requires_grad}
    for name, t in ckpt["model"].items():
        assert torch.equal(model.state_dict()[name], t)
    assert tok.encode(EOT) == [ALPHABET.index(EOT)]


# ----------------------------------------------------------------------------- bad input: one line each
def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        align.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_identical_pair_is_one_error_line(base, tmp_path, capsys):
    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps({"prompt": "Uppercase: cat", "chosen": "CAT" + EOT, "rejected": "CAT" + EOT}) + "\n")
    err = run_cli(["dpo", "--init_from", base, "--prefs", str(prefs), "--out_dir", str(tmp_path / "o")], capsys)
    assert "line 1: chosen and rejected responses are identical" in err


def test_prompt_longer_than_the_context_is_one_error_line(base, tmp_path, capsys):
    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps({"prompt": "Uppercase: " + "cat " * 30, "chosen": "A", "rejected": "B"}) + "\n")
    err = run_cli(["dpo", "--init_from", base, "--prefs", str(prefs), "--out_dir", str(tmp_path / "o")], capsys)
    assert "does not fit the context block_size=64" in err


def test_reward_model_from_another_tokenizer_is_one_error_line(base, tmp_path, capsys):
    other = make_base(tmp_path / "other", chars=ALPHABET + "\u00e9")
    err = run_cli(["ppo", "--init_from", base, "--reward_model", other, "--out_dir", str(tmp_path / "o")], capsys)
    assert "another tokenizer" in err


# ----------------------------------------------------------------------------- the experiment (slow set)
@pytest.mark.slow  # the slow set (conftest.py)
def test_experiment_quick_shows_each_effect(tmp_path):
    """experiments/align.py --quick guards the claims, not only the code path: the RM ranks
    held-out comparisons well above chance, and better with its LM term than with the head
    alone, and SFT with pretraining text mixed in pays almost no alignment tax while SFT
    without it does."""
    env = {**os.environ, "EXPERIMENTS_OUT": str(tmp_path)}
    subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "align.py"), "--quick"], cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=900)
    r = json.loads((tmp_path / "align_quick.json").read_text())
    assert (tmp_path / "align_quick.png").stat().st_size > 1000
    assert r["rm"]["heldout_pair_acc"] >= 0.75
    assert r["rm"]["ablation"]["both"] > r["rm"]["ablation"]["head_alone"]
    assert r["ppo"]["kl"][0] == 0.0  # the first rollouts come from the SFT model itself
    tax, recipes = r["alignment_tax"], r["sft_recipes"]
    assert recipes["pipeline"]["pretrain_loss"] <= 1.25 * tax["base"] < recipes["no pretraining mix"]["pretrain_loss"]
    # (the methods' few points of win rate over SFT need the full run: test_published_claims guards those)
    # an aligned run samples through sample.py
    out = subprocess.run([sys.executable, "sample.py", "--out_dir", r["runs"]["ppo"], "--prompt", "x",
                          "--max_new_tokens", "3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_reward_model_at_the_documented_size_reaches_its_floor(tmp_path, monkeypatch):
    """The regression guard's slow half: base -> SFT -> RM at align.PIPELINE's settings. The RM's
    held-out accuracy drifted to chance once (a change in train.py's batches moved a noise-level
    RM) and no test noticed; this one would have."""
    from dataclasses import asdict
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread, as the published run: the same numbers
    cfg = AlignConfig(out_dir=str(tmp_path), threads=1)
    torch.set_num_threads(1)
    d = {s: str(tmp_path / s) for s in ("base", "sft", "rm")}
    starts = {"sft": dict(init_from=d["base"]), "rm": dict(init_from=d["sft"])}
    for stage in ("base", "sft", "rm"):
        c = AlignConfig(**{**asdict(cfg), **align.PIPELINE[stage], **starts.get(stage, {}), "out_dir": d[stage]})
        align.run_base(c) if stage == "base" else align.STAGES[stage](c)
    acc = torch.load(os.path.join(d["rm"], "ckpt.pt"), weights_only=True)["history"]["eval"][-1]["val_acc"]
    assert acc >= RM_FLOOR


RM_FLOOR = 0.80  # the published held-out accuracy (README) less its spread across evaluations


def test_published_claims():
    """The README's alignment figures come from experiments/results/align.json (experiments/docs.py);
    this holds that JSON to what the README says of it, so a worse run cannot be published silently."""
    r = json.loads(open(os.path.join(ROOT, "experiments", "results", "align.json")).read())
    assert not r["quick"] and len(r["seeds"]) == 3 and r["eval_seeds"] == 3
    assert r["rm"]["heldout_pair_acc"] >= RM_FLOOR
    assert r["rm"]["ablation"]["both"] > max(r["rm"]["ablation"]["head_alone"], r["rm"]["ablation"]["lm_alone"])
    for m, w in r["win_rate"].items():  # every method beats SFT on the trained families, every training seed
        assert all(align.mean(v) > 0.5 for v in w["trained"].values()), m
    tax = r["alignment_tax"]
    assert r["sft_recipes"]["pipeline"]["pretrain_loss"] <= 1.25 * tax["base"]
    grpo = r["grpo"].values()
    assert align.mean(align.mean(v[-5:]) for v in grpo) > align.mean(align.mean(v[:5]) for v in grpo)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def test_chat_keeps_the_kv_cache_across_turns(base):
    """sample.py --chat, greedy: the second reply from the cache equals decoding the whole transcript afresh."""
    import io
    from types import SimpleNamespace
    import sample
    model, tok, _ = load_run(base)
    args = SimpleNamespace(max_new_tokens=5, temperature=0.0, top_k=None, top_p=None)
    messages, out = iter(["hi", "add 2 and 3", ""]), io.StringIO()
    sample.chat(model, tok, args, torch.Generator(), read=lambda _: next(messages), out=out)
    replies = [line.split("bot> ", 1)[1] for line in out.getvalue().splitlines() if "bot> " in line]
    assert len(replies) == 2
    # each turn ends with EOT in the cache: sampled, or added when the reply hit max_new_tokens
    transcript = render("hi", replies[0]) + f"{align.USER}add 2 and 3{EOT}{align.BOT}"
    fresh = model.generate(torch.tensor([tok.encode(transcript)]), 5, temperature=0)[0].tolist()
    assert tok.decode(fresh[len(tok.encode(transcript)):]).split(EOT)[0] == replies[1]


# ----------------------------------------------------------------------------- bad input, second round
@pytest.mark.parametrize("option,value", [("--beta", "-0.1"), ("--beta", "nan"), ("--dpo_beta", "-1"),
                                          ("--dpo_beta", "nan"), ("--learning_rate", "0"), ("--gae_lambda", "1.5"),
                                          ("--temperature", "inf")])
def test_bad_numbers_are_one_error_line_and_write_nothing(base, tmp_path, capsys, option, value):
    out = tmp_path / "o"
    err = run_cli(["dpo", "--init_from", base, "--out_dir", str(out), option, value], capsys)
    assert option in err and not out.exists()


def test_resume_into_another_stage_is_refused(base, tmp_path, capsys):
    align.run_sft(tiny(base, tmp_path / "sft", iters=1, eval_every=1))
    before = (tmp_path / "sft" / "ckpt.pt").read_bytes()
    err = run_cli(["ppo", "--resume", "--out_dir", str(tmp_path / "sft")], capsys)
    assert "holds an align.py sft run, not an align.py ppo run" in err and "align.py sft --resume" in err
    err = run_cli(["dpo", "--resume", "--out_dir", str(tmp_path / "nothing")], capsys)
    assert "not found; to start this run, drop --resume" in err
    assert (tmp_path / "sft" / "ckpt.pt").read_bytes() == before


def test_resume_with_a_contradicting_option_is_refused(base, tmp_path, capsys):
    align.run_sft(tiny(base, tmp_path / "sft", iters=1, eval_every=1))
    err = run_cli(["sft", "--resume", "--out_dir", str(tmp_path / "sft"), "--n_layer", "3"], capsys)
    assert "--n_layer sets the base model's shape" in err and "drop --n_layer" in err
    err = run_cli(["sft", "--resume", "--out_dir", str(tmp_path / "sft"), "--learning_rate", "0.5"], capsys)
    assert "--learning_rate 0.5 contradicts the run's learning_rate" in err


def test_a_new_run_never_replaces_a_finished_one(base, tmp_path, capsys):
    align.run_sft(tiny(base, tmp_path / "sft", iters=1, eval_every=1))
    before = (tmp_path / "sft" / "ckpt.pt").read_bytes()
    err = run_cli(["sft", "--init_from", base, "--out_dir", str(tmp_path / "sft")], capsys)
    assert "already holds a run (sft)" in err and "--resume" in err
    assert (tmp_path / "sft" / "ckpt.pt").read_bytes() == before


def test_prefs_line_that_is_not_text_is_one_error_line(base, tmp_path, capsys):
    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps({"prompt": "Uppercase: cat", "chosen": 3, "rejected": "CAT" + EOT}) + "\n")
    err = run_cli(["dpo", "--init_from", base, "--prefs", str(prefs), "--out_dir", str(tmp_path / "o")], capsys)
    assert "line 1: prompt, chosen and rejected must be strings" in err


def test_two_runs_into_one_out_dir_are_refused(base, tmp_path, capsys):
    from checkpoint import lock_out_dir, unlock_out_dir
    out = str(tmp_path / "busy")
    lock_out_dir(out)  # another process's run, as far as align.py can tell
    try:
        err = run_cli(["sft", "--init_from", base, "--out_dir", out, "--iters", "1"], capsys)
    finally:
        unlock_out_dir(out)
    assert "is in use by" in err
