"""How many threads should a training step use on a CPU that other programs share?

    python experiments/threads.py [--quick]

PyTorch runs each matrix product on torch.get_num_threads() threads (one per core by
default), which meet at a barrier after every operation. On an idle machine more
threads finish the product sooner. When other processes keep the cores busy, the
scheduler hands each thread a slice of a core at different moments: every barrier then
waits for the slowest thread, and the waiting threads spin, burning CPU time the other
processes wanted. This script times one optimizer step (forward, backward, AdamW) of
the README's `first` model (`debug` with --quick) with 1 thread and with one thread per core, on
the machine as it is, then again with 2 busy processes per core running beside it
(each one a Python loop that never sleeps), all in one process. Wall time and CPU time
per step go to experiments/out/threads.{json,png}. train.py's choice of threads
(runs.choose_threads) follows from what this shows.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

from common import plt, write

import torch  # noqa: E402

from model import ModelConfig, Transformer  # noqa: E402

# the training shapes of train.py's configs (batch_size x block_size)
MODELS = {"first": 16, "debug": 16}


def time_steps(config, batch_size, threads, steps):
    """(median wall seconds, median CPU seconds) of one optimizer step on random tokens."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(config.vocab_size, (batch_size, config.block_size + 1))
    walls, cpus = [], []
    for i in range(steps + 1):  # the first step allocates: not timed
        t0, c0 = time.perf_counter(), time.process_time()
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def measure(models, thread_counts, steps):
    """{model: {threads: {"wall": s, "cpu": s}}} on the machine as it is now."""
    out = {}
    for name, config in models.items():
        out[name] = {}
        for n in thread_counts:
            wall, cpu = time_steps(config, MODELS[name], n, steps)
            out[name][str(n)] = {"wall": wall, "cpu": cpu}
            print(f"  {name:5s} {n} thread(s): {1000 * wall:7.0f} ms/step wall, {1000 * cpu:7.0f} ms/step CPU")
    return out


def busy_processes(n):
    """n processes that each keep one core busy until killed."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def tables(results):
    """Markdown for README.md: wall and CPU ms per step, as the machine was and under added load."""
    busy = results["busy"]
    rows = [f"| model | threads | wall ms/step | CPU ms/step | wall ms/step, +{busy} busy "
            f"| CPU ms/step, +{busy} busy |", "|---|---|---|---|---|---|"]
    for name in results["as_it_was"]:
        for n in results["threads"]:
            q, b = results["as_it_was"][name][str(n)], results["loaded"][name][str(n)]
            rows.append(f"| `{name}` | {n} | {1000 * q['wall']:,.0f} | {1000 * q['cpu']:,.0f} | "
                        f"{1000 * b['wall']:,.0f} | {1000 * b['cpu']:,.0f} |")
    note = (f"\nOne optimizer step, median of {results['steps']} (`python experiments/threads.py`), on a "
            f"{results['cores']}-core {results['cpu']} that other work was already sharing (load average "
            f"{results['load_before']:.1f} at the start); \"+{busy} busy\" adds {busy} processes that never "
            f"sleep. CPU time counts every thread, spinning included.\n")
    return {"steps": "\n".join(rows) + "\n" + note}


def plot(results, quick):
    """Bars from 0: wall time per step, each thread count, as the machine was and under load."""
    pyplot = plt()
    names, cores, thread_counts = list(results["as_it_was"]), results["cores"], results["threads"]
    fig, axes = pyplot.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    width = 0.8 / len(thread_counts)
    for ax, name in zip(axes[0], names):
        for i, n in enumerate(thread_counts):
            heights = [1000 * results[k][name][str(n)]["wall"] for k in ("as_it_was", "loaded")]
            bars = ax.bar([j + (i - (len(thread_counts) - 1) / 2) * width for j in range(2)], heights, width,
                          label=f"{n} thread{'s' if n > 1 else ''}", color=f"C{i}")
            ax.bar_label(bars, fmt="%.0f")
        ax.set_xticks([0, 1], [f"as it was (load average {results['load_before']:.1f})",
                               f"the same + {results['busy']} busy processes"])
        ax.set_ylim(0, None)
        ax.set(ylabel="wall time per optimizer step (ms)",
               title=f"`{name}` model, {cores}-core CPU, median of {results['steps']} steps")
        ax.legend()
    fig.suptitle(f"python experiments/threads.py{' --quick' if quick else ''}: one thread vs one per core")
    return fig


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the debug model, 3 steps per setting")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    thread_counts = sorted({1, cores})
    names = ["debug"] if args.quick else ["first"]
    models = {name: ModelConfig.from_name(name) for name in names}
    steps = 3 if args.quick else 6
    results = {"quick": args.quick, "cores": cores, "cpu": cpu_name(), "threads": thread_counts, "steps": steps,
               "busy": 2 * cores, "load_before": os.getloadavg()[0]}
    print(f"{cores} cores, load average {results['load_before']:.1f}; the machine as it is:")
    results["as_it_was"] = measure(models, thread_counts, steps)
    print(f"with {2 * cores} busy processes beside it:")
    procs = busy_processes(2 * cores)
    try:
        time.sleep(1.0)  # let them start
        results["loaded"] = measure(models, thread_counts, steps)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for name in names:
        one, all_ = results["loaded"][name]["1"]["wall"], results["loaded"][name][str(cores)]["wall"]
        print(f"{name}: under load, {cores} threads take {all_ / one:.1f}x the time of 1 thread per step")

    write("threads", args.quick, results, plot(results, args.quick))


if __name__ == "__main__":
    main()
