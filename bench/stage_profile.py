"""Where the main job's time goes on the embedded default: each stage of one arm (quantize, distill,
sample, evaluate) run alone, one after another, with the distillation update split into its parts
(distill.py --profile), at each thread count asked for. Prints a table; run it with nothing else on
the machine.

    python bench/stage_profile.py                       # 1 and 2 threads, 100 distillation updates each
    python bench/stage_profile.py --root ../other/tree  # the same stages of another checkout (e.g. an older commit)
    python bench/stage_profile.py --against ../old/tree --threads 1   # only the update, the two checkouts in turns
    python bench/stage_profile.py --against ../old/tree --threads 1 --teacher-cache   # this one reading the teacher from disk

The main job (`bench/reproduce.py --bits 2 --cells fp,baseline,mpqdm --jobs 2`) runs the FP model's
samples first, then the two arms side by side with one thread each, so the 1-thread figures are the
ones that set its time: one arm is quantize + 800 updates + the distillation's fixed cost + sample +
two evaluations.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose scripts are run")
    parser.add_argument("--threads", default="1,2", help="torch CPU thread counts to profile")
    parser.add_argument("--iters", type=int, default=5, help="distill.py --iters (x 20 updates) for the per-update figures")
    parser.add_argument("--method", default="omq", choices=["omq", "uniform"])
    parser.add_argument("--trd", default="on", choices=["on", "off"])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--against", type=Path, default=None,
                        help="another checkout (e.g. an older commit): only the distillation update, timed in turns with "
                             "this one's, --repeats pairs at the first of --threads, on one quantized model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--teacher-cache", action="store_true",
                        help="with --against: this checkout's runs read the FP teacher from distill.py --teacher-cache, "
                             "filled by one untimed run first (what every run of a seed after its first does in a sweep)")
    args = parser.parse_args(argv)
    root = args.root.resolve()

    def run(threads, *cmd, cwd=None):
        """Wall seconds of one command run in `root` (or cwd) with `threads` torch threads; stops on failure."""
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=cwd or root, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-2000:]}")
        return time.perf_counter() - t0

    if args.against:  # the update of two checkouts, in turns, so that the host's drift hits both alike
        threads = int(args.threads.split(",")[0])
        checkouts = {"against": args.against.resolve(), "this": root}
        per = {name: [] for name in checkouts}
        with tempfile.TemporaryDirectory() as tmp:
            q = Path(tmp) / "q.pt"
            run(threads, "quantize.py", "--wbits", 2, "--abits", 4, "--method", args.method, "--seed", 0, "--out", q)
            cache = ["--teacher-cache", Path(tmp) / "teacher"] if args.teacher_cache else []
            distill = lambda name, d: run(threads, "distill.py", "--qckpt", q, "--trd", args.trd, "--iters", args.iters,  # noqa: E731
                                          "--seed", 0, "--eval-samples", 16, "--profile", "--out", d, "--force",
                                          *(cache if name == "this" else []), cwd=checkouts[name])
            if cache:
                distill("this", Path(tmp) / "warm.pt")
            for _ in range(args.repeats):
                for name in checkouts:
                    d = Path(tmp) / f"{name}.pt"
                    distill(name, d)
                    report = json.loads(d.with_suffix(".json").read_text())
                    per[name].append(dict(report["seconds_per_update_by_phase"],
                                          update=report["seconds_train"] / report["updates_run"]))
        print(f"One distillation update, ms, {threads} thread{'s' * (threads > 1)}, {args.iters * 20} updates per run, "
              f"{args.repeats} runs of each in turns (median; min-max)"
              f"{'; this checkout reading the teacher from a filled cache' if cache else ''}:\n")
        print(f"| part | {checkouts['against']} | {checkouts['this']} | ratio of medians |\n|---|---|---|---|")
        for part in per["this"][0]:
            cols = [sorted(1000 * r[part] for r in per[name]) for name in checkouts]
            med = [statistics.median(c) for c in cols]
            print(f"| {'**update**' if part == 'update' else part} | "
                  + " | ".join(f"{m:.1f} ({c[0]:.1f}-{c[-1]:.1f})" for m, c in zip(med, cols)) + f" | {med[0] / med[1]:.2f}x |")
        pairs = [a["update"] / b["update"] for a, b in zip(per["against"], per["this"])]
        print(f"\nper pair (run in turns), update time against / this: {', '.join(f'{p:.2f}x' for p in pairs)}")
        raise SystemExit(0)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for threads in [int(t) for t in args.threads.split(",")]:
            q, d, s = tmp / f"q{threads}.pt", tmp / f"d{threads}.pt", tmp / f"s{threads}"
            stage = {"start-up (import torch and models/)": run(threads, "-c", "import torch, models.checkpoint, models.core.trd")}
            stage["quantize.py"] = run(threads, "quantize.py", "--wbits", 2, "--abits", 4, "--method", args.method, "--seed", 0,
                                       "--out", q)
            stage["distill.py"] = run(threads, "distill.py", "--qckpt", q, "--trd", args.trd, "--iters", args.iters, "--seed", 0,
                                      "--profile", "--out", d)
            report = json.loads(d.with_suffix(".json").read_text())
            stage["sample.py"] = run(threads, "sample.py", "--ckpt", d, "--num-images", args.num_images, "--seed", 1234,
                                     "--no-png", "--out", s)
            stage["evaluate.py"] = run(threads, "evaluate.py", s / "samples.npz")
            per_update = report["seconds_per_update_by_phase"]
            fixed = report["seconds"] - report["seconds_train"]  # load, the eps-MSE checks before and after, saving
            rows.append((threads, stage, per_update, fixed, report["seconds_train"] / report["updates_run"]))

    print(f"Stages of one arm ({args.method}, TRD {args.trd}), run alone in {root}:\n")
    print("| stage | " + " | ".join(f"{t} thread{'s' * (t > 1)} s" for t, *_ in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name in rows[0][1]:
        print(f"| {name} ({args.iters * 20} updates) |" if name == "distill.py" else f"| {name} |",
              " | ".join(f"{r[1][name]:.1f}" for r in rows), "|")
    print("| distill.py fixed cost (load, eps-MSE checks, save) | " + " | ".join(f"{r[3]:.1f}" for r in rows) + " |")
    print("\nOne distillation update, ms (distill.py --profile):\n")
    print("| part | " + " | ".join(f"{t} thread{'s' * (t > 1)}" for t, *_ in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for part in rows[0][2]:
        print(f"| {part} | " + " | ".join(f"{1000 * r[2][part]:.1f} ({100 * r[2][part] / sum(r[2].values()):.0f} %)"
                                          for r in rows) + " |")
    print("| **update, measured over the run** | " + " | ".join(f"**{1000 * r[4]:.1f}**" for r in rows) + " |")
    print("\nOne arm of the main job (800 updates), projected from these stages:\n")
    for threads, stage, per_update, fixed, update in rows:
        arm = stage["quantize.py"] + 800 * update + fixed + stage["sample.py"] * 1000 / args.num_images + 2 * stage["evaluate.py"]
        print(f"- {threads} thread{'s' * (threads > 1)}: {arm / 60:.1f} min (800 updates: {800 * update / 60:.1f} min)")


if __name__ == "__main__":
    main()
