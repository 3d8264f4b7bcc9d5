"""bench.py runs (tiny sizes) and the memory estimate adds up."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from model import ModelConfig, count_params
from plan import estimate_memory


def test_memory_estimate_parts():
    config = ModelConfig.from_name("demo")
    est = estimate_memory(config, batch_size=8, seq_len=256)
    n = 12_587_904
    assert est["params"] == n
    assert (est["full"]["weights"], est["full"]["gradients"], est["full"]["optimizer"]) == (4 * n, 4 * n, 8 * n)
    assert est["kv_cache"] == 2 * 6 * 2 * 64 * 256 * 8 * 4  # K and V, layers, kv heads, head_dim, T, B, fp32
    # LoRA r=8 on all seven projections of a block: r * (in + out) each
    assert est["lora_params"] == 6 * 8 * ((384 + 384) * 2 + (384 + 128) * 2 + (384 + 1024) * 3)
    assert est["qlora"]["base"] < est["lora"]["base"] < est["full"]["weights"]
    assert est["full"]["total"] == sum(v for k, v in est["full"].items() if k != "total")


@pytest.mark.slow  # about half a minute on an idle 2-core CPU
def test_bench_quick_runs(tmp_path):
    pytest.importorskip("transformers", reason="bench.py compares against transformers (pip install transformers)")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--quick", "--out_dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.load(open(tmp_path / "bench.json"))
    assert report["decode"]["identical_tokens"]  # the same greedy tokens as transformers
    shapes = {tuple(row["shape"]): row["count"] for row in report["roofline"]["shapes"]}
    assert shapes == {(64, 64): 4, (32, 64): 4, (256, 64): 4, (64, 256): 2, (128, 64): 1}  # debug: 2 layers + head
    assert [row["n_kv_head"] for row in report["kv"]] == [4, 2, 1]
    assert [row["bytes_per_token"] for row in report["kv"]] == [2 * 2 * n * 16 * 4 for n in (4, 2, 1)]
    memory = report["memory"][0]  # the estimate is plan.estimate_memory's, and a step holds at least
    config = ModelConfig.from_name("debug")  # weights, gradients and two AdamW moments: 16 B/param
    assert memory["estimate"] == estimate_memory(config, 4, 64)["full"]["total"]
    assert memory["measured"] >= 16 * count_params(config)
