"""Scaling shape: pairs/s and whole-process peak memory of ds_dpo and TRL 1.16's DPOTrainer as the pairs per
micro-batch, the pair length (to 32k tokens) and the ranks grow; tables and plots (benchmarks/README.md).

    .venv/bin/pip install -c launch/constraints.txt matplotlib     # the plots (the `bench` extra), once
    .venv/bin/python benchmarks/scaling.py --out docs/scaling.md  # ~25 min on 2 busy CPU cores; --sweeps NAME ... a subset

The runs are long_context.py's (``Run``, ``measure``): its random-init Llama (4 layers x 256, 32000-token vocabulary)
as policy and a second one as reference, synthetic pairs of random token ids (prompt half of the pair, chosen and
rejected a quarter each), fp32, AdamW, gradient checkpointing in both trainers (TRL 1.16's default), one micro-batch
per optimizer step, every run in fresh processes, each process's address space capped (``--limit_gb``) and the run
limited in time (``--timeout``): a run that cannot fit, or runs past the limit, is a missing point, and its trainer's
sweep stops there (a larger point would not fit either). ds_dpo runs its default layout (packed, prefix-shared rows,
block attention, chunked log-probs) with ``deepspeed: auto`` (the estimator's pick, printed by each run and listed in
the report: plain DeepSpeed on one rank, ZeRO-2 on two), without the startup self-check (a one-off before the first
step). TRL runs one process, or DDP over gloo on two (benchmark.py's docstring says why not DeepSpeed). Three sweeps:

1. ``micro_batch``: ``--micro_batches`` pairs per micro-batch, pairs of ``--pair_length`` tokens, one process.
2. ``length``: one pair of each of ``--lengths`` tokens per step, one process.
3. ``ranks``: ``--ranks`` processes, each with its share of the cores, taking the same ``--global_batch`` pairs of
   ``--pair_length`` tokens per step between them; the one-process point is the micro-batch sweep's point of that
   many pairs when that sweep ran.

Each point: ``--warmup`` steps, then ``--steps`` timed steps; in the length sweep, whose steps are long,
``--length_warmup`` (default none: a warm-up step would double the sweep's time, and the first step holds the
one-off costs of a run's first step too) and ``--length_steps``; pairs/s over the timed steps; memory: each
process's peak resident set size over its whole life
(imports and setup included), the largest over the processes. Points run one after another, ds_dpo then TRL at each
size, so slow drifts of the machine hit both alike; the report says how busy other processes kept the machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from benchmark import machine, write_report  # noqa: E402
from long_context import MODEL, Run, measure, prepare  # noqa: E402

INSTALL = ".venv/bin/pip install -c launch/constraints.txt matplotlib"
TRAINERS = {"ds_dpo": "ds_dpo", "trl": "TRL DPOTrainer"}
SWEEPS = {  # name -> (title, what is swept, image)
    "micro_batch": ("Pairs per micro-batch", "pairs per micro-batch", "scaling_micro_batch.png"),
    "length": ("Pair length", "pair tokens", "scaling_length.png"),
    "ranks": ("Ranks", "processes", "scaling_ranks.png"),
}
PRESETS = {"ddp": "ZeRO-0", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "zero3_offload": "ZeRO-3 offload"}


def pyplot():
    """matplotlib's pyplot drawing to files, or a clear stop before any run when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        sys.exit(f"benchmarks/scaling.py draws its plots with matplotlib, which is not installed: {INSTALL}")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cpu_seconds() -> tuple[float, float]:
    """Busy CPU seconds so far: the whole machine's (all cores, ``/proc/stat``) and this process's with its finished
    children's (the runs)."""
    ticks = [int(x) for x in open("/proc/stat").readline().split()[1:9]]  # user nice system idle iowait irq ...
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return busy, sum(u.ru_utime + u.ru_stime for u in usage)


def sweep_runs(args) -> dict[str, dict[int, dict[str, Run]]]:
    """Every sweep's points: sweep -> swept value -> trainer -> run."""

    def run(trainer: str, **fields) -> Run:
        return Run(trainer, deepspeed="auto" if trainer == "ds_dpo" else None, **fields)

    timing = dict(steps=args.warmup + args.steps, warmup=args.warmup)
    points = {
        "micro_batch": {
            k: {t: run(t, length=args.pair_length, pairs=k, **timing) for t in TRAINERS} for k in args.micro_batches
        },
        "length": {
            n: {
                t: run(t, length=n, steps=args.length_warmup + args.length_steps, warmup=args.length_warmup)
                for t in TRAINERS
            }
            for n in args.lengths
        },
        "ranks": {
            n: {t: run(t, length=args.pair_length, nproc=n, pairs=args.global_batch, **timing) for t in TRAINERS}
            for n in args.ranks
        },
    }
    return {name: points[name] for name in args.sweeps}


def measure_all(sweeps: dict, args) -> dict[Run, dict]:
    """Each distinct run once, ds_dpo then TRL at each value; a trainer's sweep stops at its first missing point
    (the ranks sweep runs every point)."""
    results: dict[Run, dict] = {}
    for name, points in sweeps.items():
        stopped: set[str] = set()
        for value, runs in points.items():
            for trainer, run in runs.items():
                if run in results:  # measured by an earlier sweep
                    pass
                elif trainer in stopped:
                    results[run] = {"skipped": True}
                else:
                    started = time.time()
                    try:
                        results[run] = measure(run, args.work, args.limit_gb, args.timeout)
                    except RuntimeError as e:  # one broken point should not cost the others: its log says why
                        results[run] = {"error": f"failed ({args.work.name}/logs/{run.tag}.rank*.log)"}
                        print(e, flush=True)
                    print(f"{name} {value} {trainer}: {results[run]} ({time.time() - started:.0f} s)", flush=True)
                if "times" not in results[run] and name != "ranks":
                    stopped.add(trainer)
    return results


def rate(run: Run, result: dict) -> float:
    """Pairs per second over the timed steps."""
    return run.pairs / result["step_s"]


def missing(result: dict, args) -> str:
    if result.get("oom"):
        return f"out of memory ({args.limit_gb:g} GiB cap)"
    if result.get("timeout"):
        return f"over {args.timeout} s"
    if result.get("error"):
        return result["error"]
    return "not run (a smaller point was missing)"


def table(name: str, points: dict, results: dict[Run, dict], args) -> list[str]:
    """One sweep's rows: per trainer pairs/s, tokens/s and peak memory (a reason where missing), and the ratios."""
    header = f"| {SWEEPS[name][1]} |" + "".join(f" {TRAINERS[t]}: pairs/s | tokens/s | peak GiB |" for t in TRAINERS)
    lines = [header + " pairs/s ds_dpo / TRL | peak ds_dpo / TRL |", "|---" * (3 + 3 * len(TRAINERS)) + "|"]
    for value, runs in points.items():
        cells, measured = [], {}
        for trainer, run in runs.items():
            result = results[run]
            if "times" not in result:
                cells.append(f" {missing(result, args)} | | |")
                continue
            measured[trainer] = (rate(run, result), result["peak_mib"] / 1024)
            pairs_s, peak = measured[trainer]
            cells.append(f" {pairs_s:.3g} | {pairs_s * run.length:.0f} | {peak:.2f} |")
        ratios = (
            f" {measured['ds_dpo'][0] / measured['trl'][0]:.2f}x | {measured['ds_dpo'][1] / measured['trl'][1]:.2f}x |"
            if len(measured) == 2
            else " | |"
        )
        lines.append(f"| {value} |" + "".join(cells) + ratios)
    presets = sorted(
        {
            f"{PRESETS.get(r['preset'], r['preset'])} on {run.nproc} process{'es' if run.nproc > 1 else ''}"
            for runs in points.values()
            for run in runs.values()
            if "preset" in (r := results[run])
        }
    )
    return lines + ["", f"ds_dpo's `deepspeed: auto` picked: {', '.join(presets) or 'no run'}.", ""]


def plot(plt, name: str, points: dict, results: dict[Run, dict], args, path: Path) -> None:
    """Throughput (pairs/s; tokens/s for the length sweep) and peak memory against the swept value, a line per
    trainer; a missing point is an x on the axis, its reason in the legend."""
    title, xlabel, _ = SWEEPS[name]
    values = list(points)
    ticks = [f"{v // 1024}k" if name == "length" else str(v) for v in values]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for trainer, color, marker in (("ds_dpo", "C0", "o"), ("trl", "C1", "s")):
        runs = {v: points[v][trainer] for v in values}
        ok = [v for v in values if "times" in results[runs[v]]]
        throughput = [rate(runs[v], results[runs[v]]) * (v if name == "length" else 1) for v in ok]
        memory = [results[runs[v]]["peak_mib"] / 1024 for v in ok]
        gone = [v for v in values if v not in ok]
        reasons = "; ".join(f"{ticks[values.index(v)]}: {missing(results[runs[v]], args)}" for v in gone)
        for ax, ys in zip(axes, (throughput, memory)):
            ax.plot(ok, ys, color=color, marker=marker, label=TRAINERS[trainer])
            if gone:  # on the x axis, whatever the y scale
                ax.scatter(
                    gone,
                    [0.0] * len(gone),
                    marker="x",
                    s=80,
                    color=color,
                    transform=ax.get_xaxis_transform(),
                    clip_on=False,
                    zorder=3,
                    label=f"{TRAINERS[trainer]} missing ({reasons})",
                )
    axes[1].axhline(args.limit_gb, color="grey", linestyle="--", linewidth=1, label="address-space cap per process")
    ylabels = (
        "tokens/s (pair tokens x pairs/s)" if name == "length" else "pairs/s",
        "peak resident memory, GiB (largest process)",
    )
    for ax, label in zip(axes, ylabels):
        if name != "ranks":
            ax.set_xscale("log", base=2)
        else:
            ax.set_xlim(min(values) - 0.5, max(values) + 0.5)
        ax.set_xticks(values, ticks)
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.legend(*axes[1].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"{title}: ds_dpo vs TRL 1.16 DPOTrainer ({subtitle(name, args)})", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def subtitle(name: str, args) -> str:
    if name == "micro_batch":
        return f"{args.pair_length}-token pairs, 1 process"
    if name == "length":
        return "1 pair per step, 1 process"
    return f"{args.global_batch} {args.pair_length}-token pairs per step over all processes"


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def report(sweeps: dict, results: dict[Run, dict], args, machine_line: str, others: float) -> str:
    command = shlex.join(["python", "benchmarks/scaling.py", *sys.argv[1:]])
    lines = [
        "# Scaling: ds_dpo vs TRL 1.16 as micro-batch, pair length and ranks grow",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}; do not edit by hand.",
        "",
        f"- Machine: {machine_line}.",
        f"- Shared machine: while the runs ran, other processes kept {others:.2f} of its {os.cpu_count()} cores busy "
        "on average (the machine's busy CPU time from `/proc/stat` less this script's and its runs'): timings "
        "are those of a shared machine, worth comparing side by side more than as absolute speeds.",
        f"- Model: random-init Llama {MODEL['num_hidden_layers']} layers x {MODEL['hidden_size']} "
        f"({MODEL['vocab_size']}-token vocabulary) as policy, a different one as reference; fp32, AdamW, gradient "
        "checkpointing in both trainers (TRL 1.16's default); one micro-batch per optimizer step.",
        "- Pairs: synthetic random token ids, prompt half of a pair's tokens, chosen and rejected a quarter each.",
        "- ds_dpo: its default layout (packed, prefix-shared rows, block attention, chunked log-probs), "
        "`deepspeed: auto` (picks below), no startup self-check. TRL: `DPOTrainer` on one process, DDP over gloo "
        "on two (each process half of the step's pairs and of the cores).",
        f"- Each point in fresh processes: {count(args.warmup, 'warm-up step')}, then "
        f"{count(args.steps, 'timed step')}; in the length sweep {count(args.length_warmup, 'warm-up step')} and "
        f"{count(args.length_steps, 'timed step')} (a long step holds a run's one-off first-step costs as well); "
        "pairs/s over the timed steps; tokens/s = pairs/s x pair tokens. Peak GiB: the peak resident set size of "
        "the largest process over its whole life (imports and setup included). Each process's address space is "
        f"capped at {args.limit_gb:g} GiB and each run limited to {args.timeout} s: a run past either is a missing "
        "point, and its trainer's sweep stops there.",
        "",
    ]
    for name, points in sweeps.items():
        title, _, image = SWEEPS[name]
        lines += [f"## {title}", "", f"{subtitle(name, args).capitalize()}.", "", f"![{title}](images/{image})", ""]
        lines += table(name, points, results, args)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", nargs="+", choices=list(SWEEPS), default=list(SWEEPS))
    parser.add_argument("--micro_batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--pair_length", type=int, default=512, help="tokens per pair, micro-batch and ranks sweeps")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--global_batch", type=int, default=8, help="pairs per step over all ranks, ranks sweep")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--length_warmup", type=int, default=0, help="warm-up steps in the length sweep")
    parser.add_argument("--length_steps", type=int, default=1, help="timed steps in the length sweep")
    parser.add_argument("--limit_gb", type=float, default=12.0, help="address-space cap of each process")
    parser.add_argument("--timeout", type=int, default=540, help="seconds a run may take, setup included")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "scaling")
    parser.add_argument("--out", type=Path, help="the report; the plots go to images/ beside it (else under --work)")
    args = parser.parse_args()
    plt = pyplot()
    for option in ("micro_batches", "lengths", "ranks"):
        setattr(args, option, sorted(set(getattr(args, option))))
    if any(args.global_batch % n for n in args.ranks):
        parser.error(f"--global_batch {args.global_batch} does not split evenly over --ranks {args.ranks}")

    sweeps = sweep_runs(args)
    runs = [run for points in sweeps.values() for by_trainer in points.values() for run in by_trainer.values()]
    counts: dict[int, int] = {}
    for run in runs:  # enough pairs of each length for every step of the runs that use it
        counts[run.length] = max(counts.get(run.length, 1), run.pairs * run.steps)
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work, counts)
    machine_line = machine()  # the commit the runs start from
    busy, own = cpu_seconds()
    started = time.time()
    results = measure_all(sweeps, args)
    busy_after, own_after = cpu_seconds()
    others = max(0.0, (busy_after - busy) - (own_after - own)) / (time.time() - started)
    images = (args.out.parent if args.out else args.work) / "images"
    for name, points in sweeps.items():
        plot(plt, name, points, results, args, images / SWEEPS[name][2])
    write_report(report(sweeps, results, args, machine_line, others), args.out)
    print(f"plots: {', '.join(str(images / SWEEPS[name][2]) for name in sweeps)}")


if __name__ == "__main__":
    main()
