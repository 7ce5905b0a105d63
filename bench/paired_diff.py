"""The paired difference between two sets of runs of a bench/reproduce.py folder: image i of run A minus
image i of run B (the same FP image behind both), per training seed, with the 95 % hierarchical
bootstrap interval over seeds and images (models/paired.py). Runs are named by their results.json
keys with {seed} for the training seed; --selection-check reads bench/selection_check.py's runs.

    python bench/paired_diff.py --out runs/w2a4_yard "W2A4 baseline_lr2 seed{seed} x32 it40" "W3A4 baseline seed{seed} x128 it40"
    python bench/paired_diff.py --out runs/w2a4_yard --seeds 99 --selection-check \\
        "W2A4 mpqdm seed{seed} x128 it40" "W2A4 mpqdm seed{seed} x64 it40"
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.runs import RunFolder  # noqa: E402
from models.paired import format_interval, interval  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--out", type=Path, required=True, help="a bench/reproduce.py --out")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--selection-check", action="store_true", help="runs of bench/selection_check.py (its own sample seed)")
    args = parser.parse_args(argv)
    folder = RunFolder(args.out)
    runs = folder.load_results()["runs"]

    def per_image(name, key):
        if args.selection_check:
            return np.load(folder.selection_check_dir(name) / "vs_fp.eval.paired.npz")[key]
        values = folder.per_image(runs[name], key) if name in runs else None
        if values is None:
            raise SystemExit(f"no paired figures for {name!r} in {folder.results_path}")
        return values

    seeds = [int(s) for s in args.seeds.split(",")]
    for key, f in (("psnr", "+.2f"), ("feature_distance", "+.3f")):
        d = [per_image(args.a.format(seed=s), key) - per_image(args.b.format(seed=s), key) for s in seeds]
        print(f"{key}: {args.a} - {args.b}, seeds {args.seeds}: {format_interval(interval(d), f)}")


if __name__ == "__main__":
    main()
