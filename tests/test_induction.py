"""experiments/induction.py: the scores of Olsson et al. 2022 on hand-made attention patterns
(known values), the ablation hook, the episodes; and (the slow set) what the --quick run
measures."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_config

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import induction  # noqa: E402
from model import Transformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def patterns(n):
    """(1, 3, 2n, 2n) attention on [A A]: a perfect induction head, uniform causal attention,
    a previous-token head (each row sums to 1)."""
    T = 2 * n
    induction_head = torch.zeros(T, T)
    induction_head[:n, 0] = 1  # the first A has no earlier occurrence: it rests on the first token
    for t in range(n, T):
        induction_head[t, t - n + 1] = 1  # the token after the earlier occurrence
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    previous = torch.zeros(T, T)
    previous[0, 0] = 1
    previous[torch.arange(1, T), torch.arange(T - 1)] = 1
    return torch.stack([induction_head, uniform, previous])[None]


def test_prefix_matching_and_previous_token_scores_on_known_patterns():
    n = 5
    att = patterns(n)
    assert torch.allclose(att.sum(-1), torch.ones(1, 3, 2 * n))
    uniform_pm = sum(1 / (t + 1) for t in range(n, 2 * n)) / n  # 0.0746 for n = 5
    assert induction.prefix_matching_score(att, n).tolist() == pytest.approx([1.0, uniform_pm, 0.0])
    uniform_prev = sum(1 / (t + 1) for t in range(1, 2 * n)) / (2 * n - 1)
    # the induction pattern attends to t - 1 only at t = 1 (the rows of the first A rest on token 0)
    assert induction.previous_token_score(att).tolist() == pytest.approx([1 / (2 * n - 1), uniform_prev, 1.0])


def test_copying_score_is_the_eigenvalue_balance():
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # eigenvalues +-i: neither copies nor suppresses
    ov = torch.stack([3 * torch.eye(2), -torch.eye(2), rotation, torch.diag(torch.tensor([2.0, -1.0]))])
    assert induction.copying_score(ov).tolist() == pytest.approx([1.0, -1.0, 0.0, 1 / 3], abs=1e-6)


def test_ov_circuit_is_what_a_head_writes_into_the_logits():
    """A one-layer model whose only head attends to position 0: the head's share of the final
    logits at the last position, before the final norm's per-token scale, is its OV circuit's
    column of the token at position 0."""
    model = Transformer(tiny_config(n_layer=1, n_head=2, n_kv_head=2, n_embd=32)).eval()
    ov = induction.ov_circuits(model, 0)  # (2, V, V)
    x = torch.tensor([[7, 3, 5]])
    att = model.layers[0].attention
    v = att.wv(model.layers[0].attention_norm(model.tok_embeddings(x)))  # (1, 3, n_head * hd)
    hd = model.config.head_dim
    for h in range(2):
        out = att.wo.weight[:, h * hd:(h + 1) * hd] @ v[0, 0, h * hd:(h + 1) * hd]  # attention 1 on token 7
        assert torch.allclose(ov[h][:, 7], model.output(out * model.norm.weight), atol=1e-5)


def test_icl_score_and_wilson_interval():
    losses = torch.cat([torch.full((4, 8), 3.0), torch.full((4, 8), 1.0)], dim=1)  # (B, 16)
    assert induction.icl_score(losses, slice(0, 8), slice(8, 16)) == pytest.approx(-2.0)
    low, high = induction.wilson(8, 10)  # the textbook example: 8 of 10 -> (0.490, 0.943)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)


def test_ablating_a_head_is_zeroing_its_values():
    """Zeroing a head's columns of W_O silences it exactly as zeroing its values does, and
    only it: the other heads' weights are untouched."""
    config = tiny_config(n_layer=2, n_head=4, n_kv_head=4)
    a, b = Transformer(config).eval(), Transformer(config).eval()
    b.load_state_dict(a.state_dict())
    hd = config.head_dim
    wo = a.layers[1].attention.wo.weight.detach().clone()
    induction.ablate(a, [(1, 2)])
    b.layers[1].attention.wv.weight.data[2 * hd:3 * hd] = 0
    idx = torch.randint(config.vocab_size, (2, 16))
    assert torch.allclose(a(idx)[0], b(idx)[0], atol=1e-6)
    after = a.layers[1].attention.wo.weight
    assert torch.equal(after[:, :2 * hd], wo[:, :2 * hd]) and torch.equal(after[:, 3 * hd:], wo[:, 3 * hd:])
    assert after[:, 2 * hd:3 * hd].abs().sum() == 0


class Letters:
    def encode(self, text):
        return [induction.ALPHABET.index(c) for c in text]


def test_episodes_and_repeated_tokens():
    tok = Letters()
    ids = induction.repeated_tokens(tok, 16, 8)
    assert ids.shape == (8, 32) and torch.equal(ids[:, :16], ids[:, 16:])
    assert all(len(set(row[:16].tolist())) == 16 for row in ids)  # distinct: one earlier occurrence each
    prompts, choices, gold = induction.mapping_episodes(tok, 8, 200, seed=3)
    assert prompts.shape == (200, 17) and choices.shape == (200, 4)
    # an ideal induction head: the token after the query's last earlier occurrence
    answered = correct = 0
    for p, c, g in zip(prompts.tolist(), choices.tolist(), gold.tolist()):
        q = p[-1]
        seen = [p[i + 1] for i in range(0, len(p) - 1, 2) if p[i] == q]
        if seen:
            answered += 1
            correct += seen[-1] == c[g]
    assert correct == answered and answered / 200 == pytest.approx(1 - (3 / 4) ** 8, abs=0.06)
    text = induction.corpus(2000, 1.0, (4, 12), seed=0, repeats=4)
    assert set(text) <= set(induction.ALPHABET) and len(text) >= 2000


@pytest.mark.slow  # a few minutes (conftest.py)
def test_quick_run_learns_from_its_context(tmp_path):
    """What the --quick JSON shows at this budget (README, induction heads): both models use
    their context (the ICL score falls, the second A costs far less than the first), and the
    1-layer control, which cannot compose two heads, stays at chance on a fresh mapping."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EXPERIMENTS_OUT": str(tmp_path)}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "induction.py"), "--quick"], env=env,
                       capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "induction_quick.json").read_text())
    for name in ("L2", "L1"):
        first, last = result["runs"][name]["trajectory"][0], result["runs"][name]["trajectory"][-1]
        assert abs(first["icl_score"]) < 0.1 and last["icl_score"] < -0.3, name
        assert last["loss_first"] - last["loss_second"] > 1.0, name  # nats: the repeated letters are predicted
    n = result["settings"]["n_episodes"]
    low, high = induction.wilson(result["shots"]["L1"]["8"], n)
    assert low < result["chance"] < high
    assert math.isclose(result["chance"], 0.25)
