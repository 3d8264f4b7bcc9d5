"""Measure data/prepare.py at scale: generate a corpus of N MB of .jsonl on disk (never in
memory), prepare it into shards with worker processes, and report MB/s, tokens/s and the
peak resident memory of all the processes together (sampled every 0.2 s with psutil).

    python data/measure_prepare.py --mb 1000 --dir /tmp/scale --tokenizer path/to/tokenizer.json
"""

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def generate(path, mb, seed=0):
    """Documents of 1-20 shuffled pydoc paragraphs with numbers, until the file has `mb` MB."""
    from pydoc_data.topics import topics
    paragraphs = [p for t in topics.values() for p in t.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    target, size, i = mb * 10**6, 0, 0
    with open(path, "w") as f:
        while size < target:
            doc = f"Document {i} ({rng.randrange(10**6)}).\n\n" + "\n\n".join(rng.choices(paragraphs, k=rng.randint(1, 20)))
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            size += len(line)
            i += 1
    return i


def watch_tree(pid, stop, out):
    """Peak of the summed resident memory of a process and its children, and the CPU
    seconds each used (last seen), sampled every 0.2 s."""
    import psutil
    proc = psutil.Process(pid)
    cpu = out.setdefault("cpu", {})
    while not stop.is_set():
        total = 0
        for p in [proc] + proc.children(recursive=True):
            try:
                total += p.memory_info().rss
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        out["peak"] = max(out.get("peak", 0), total)
        time.sleep(0.2)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=1000)
    p.add_argument("--dir", default="/tmp/prepare_scale")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard_chars", type=int, default=1 << 26)
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    corpus = os.path.join(args.dir, f"corpus_{args.mb}mb.jsonl")
    if not os.path.exists(corpus):
        t0 = time.time()
        n = generate(corpus, args.mb)
        print(f"generated {corpus}: {os.path.getsize(corpus) / 1e6:,.0f} MB, {n:,} documents in {time.time() - t0:.0f} s")
    out = os.path.join(args.dir, f"shards_{args.mb}mb")
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare.py"), "--corpus", corpus,
           "--tokenizer", args.tokenizer, "--out", out, "--workers", str(args.workers),
           "--shard_chars", str(args.shard_chars), "--val_fraction", "0.01"]
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    stop, peak = threading.Event(), {}
    watcher = threading.Thread(target=watch_tree, args=(proc.pid, stop, peak))
    watcher.start()
    rc = proc.wait()
    stop.set()
    watcher.join()
    elapsed = time.time() - t0
    man = json.load(open(os.path.join(out, "manifest.json")))
    tokens = man.get("train_tokens", 0) + man.get("val_tokens", 0)
    print(json.dumps({"corpus_mb": os.path.getsize(corpus) / 1e6, "rc": rc, "seconds": round(elapsed, 1),
                      "tokens": tokens, "shards": len(man["shards"]), "workers": args.workers,
                      "MB_per_s": round(os.path.getsize(corpus) / 1e6 / elapsed, 2),
                      "tokens_per_s": round(tokens / elapsed), "cpu_seconds": round(sum(peak["cpu"].values())),
                      "tokens_per_cpu_s": round(tokens / sum(peak["cpu"].values())),
                      "peak_rss_all_processes_MiB": round(peak["peak"] / 2**20), "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
