"""Does the selection rule pick what users see? For every learning-rate search run that
bench/reproduce.py kept (selection seed, checkpoints in <out>/distill), samples images on a sample
seed of its own, scores each against the FP model's image from the same noise (evaluate.py --against:
PSNR and feature distance, 95 % intervals over images) and prints, per cell, the multipliers with both
held-out eps MSEs beside the paired fidelity: the rule's choice and the fidelity's best side by side.
Nothing reported is chosen by this: it checks the rule on the selection seed, where nothing else looks.

    python bench/selection_check.py --out runs/w2a4_yard --jobs 2      # after reproduce.py --lr-search ... --out runs/w2a4_yard
"""
import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402

from bench.runs import MODEL_CHECKPOINTS, RunFolder, choose, fmt  # noqa: E402
from models.paired import format_interval, interval  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="a bench/reproduce.py --out that ran a --lr-search")
    parser.add_argument("--abits", type=int, default=4, help="the activation bits that folder's runs used")
    parser.add_argument("--sample-seed", type=int, default=4321,
                        help="images of this check (not reproduce.py's --sample-seed, 1234, nor its + 1)")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--cells", default=None, help="only these cells' search runs, e.g. mpqdm,mpqdm_lam20 (default: all)")
    parser.add_argument("--bits", default=None, help="only these weight bit-widths' search runs, e.g. 2 (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each when more than 1")
    args = parser.parse_args(argv)
    folder = RunFolder(args.out, args.abits)
    if not folder.results_path.exists():
        parser.error(f"{folder.results_path} does not exist: run bench/reproduce.py --lr-search ... --out {args.out} first")
    results = folder.load_results()
    folder.lowrank_init = results.get("lowrank_init", folder.lowrank_init)
    rule = results.get("select_by", "both")
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if args.jobs > 1 else {}))

    def run(log, script, *a):
        log = args.out / "selection_check" / "logs" / f"{log}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            if subprocess.run([sys.executable, str(ROOT / script), *map(str, a)], cwd=ROOT, env=env, stdout=f,
                              stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"{script} failed; see {log}")

    def samples(key, ckpt=None):
        out = folder.selection_check_dir(key)
        if not (out / "samples.npz").exists():
            run(out.name + "_sample", "sample.py", *(["--ckpt", ckpt] if ckpt else []), "--num-images", args.num_images,
                "--seed", args.sample_seed, "--no-png", "--out", out, "--force")
        return out / "samples.npz"

    def score(item):
        key, r = item
        ckpt = folder.distill_path(r["cell"], r["wbits"], r["seed"], r["lr_mult"], r["iters"])  # reproduce.py's file
        if r["eps_mse"] is None or not ckpt.exists():
            return key, None
        s = samples(key, ckpt)
        paired = s.with_name("vs_fp.eval.paired.npz")
        if not paired.exists():
            run(s.parent.name + "_evaluate", "evaluate.py", s, "--ref", fp, "--against", fp, "--out",
                s.with_name("vs_fp.eval.json"))
        return key, np.load(paired)

    fp = samples("fp", MODEL_CHECKPOINTS[results.get("model", "digits")])
    runs = {k: r for k, r in results["search"].items()
            if folder.register(r["cell"]) and (args.cells is None or r["cell"] in args.cells.split(","))
            and (args.bits is None or str(r["wbits"]) in args.bits.split(","))}
    with ThreadPoolExecutor(args.jobs) as pool:
        scores = dict(pool.map(score, runs.items()))
    print(f"Selection seed's search runs, {args.num_images} images at sample seed {args.sample_seed} against the FP "
          f"model's; the search chose by the {rule} eps MSE (*); PSNR and feature distance: mean [95 % interval over images]\n")
    print("| setting | method | LoRA lr × | eps MSE, guided | eps MSE, both halves | PSNR vs FP, dB | feature distance vs FP |")
    print("|---|---|---|---|---|---|---|")
    by_cell = {}
    for k, r in runs.items():
        by_cell.setdefault((r["wbits"], r["cell"]), []).append((r["lr_mult"], k, r))
    for (n, cell), rows in sorted(by_cell.items()):
        best = choose([r for _, _, r in rows], rule)
        for m, k, r in sorted(rows):
            p = scores.get(k)
            print(f"| W{n} | {cell} | {m:g}{'*' if m == best else ''} | {fmt(r['eps_mse_guided'], '.4f')} | "
                  f"{fmt(r['eps_mse'], '.4f')} | "
                  + (f"{format_interval(interval([p['psnr']]), '.2f')} | {format_interval(interval([p['feature_distance']]), '.3f')} |"
                     if p is not None else "diverged | - |"))


if __name__ == "__main__":
    main()
