"""The paired difference between two sets of runs of a bench/reproduce.py folder: image i of run A minus
image i of run B (the same FP image behind both), per training seed, with the 95 % hierarchical
bootstrap interval over seeds and images (models/paired.py). Runs are named by their results.json
keys with {seed} for the training seed; --selection-check reads bench/selection_check.py's runs.

    python bench/paired_diff.py --out runs/w2a4_yard "W2A4 baseline_lr2 seed{seed} x32 it40" "W3A4 baseline seed{seed} x128 it40"
    python bench/paired_diff.py --out runs/w2a4_yard --seeds 99 --selection-check \\
        "W2A4 mpqdm seed{seed} x128 it40" "W2A4 mpqdm seed{seed} x64 it40"
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.paired import format_interval, interval  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("a")
parser.add_argument("b")
parser.add_argument("--out", type=Path, required=True, help="a bench/reproduce.py --out")
parser.add_argument("--seeds", default="0,1,2")
parser.add_argument("--selection-check", action="store_true", help="runs of bench/selection_check.py (its own sample seed)")
args = parser.parse_args()
runs = json.loads((args.out / "results.json").read_text())["runs"]


def per_image(name, key):
    if args.selection_check:
        path = args.out / "selection_check" / name.replace(" ", "_") / "vs_fp.eval.paired.npz"
    elif name not in runs or not runs[name].get("paired_file"):
        raise SystemExit(f"no paired figures for {name!r} in {args.out / 'results.json'}")
    else:
        path = args.out / runs[name]["paired_file"]
    return np.load(path)[key]


seeds = [int(s) for s in args.seeds.split(",")]
for key, f in (("psnr", "+.2f"), ("feature_distance", "+.3f")):
    d = [per_image(args.a.format(seed=s), key) - per_image(args.b.format(seed=s), key) for s in seeds]
    print(f"{key}: {args.a} - {args.b}, seeds {args.seeds}: {format_interval(interval(d), f)}")
