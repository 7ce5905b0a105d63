"""Does the selection rule pick what users see? For every learning-rate search run that
bench/reproduce.py kept (selection seed, checkpoints in <out>/distill), samples images on a sample
seed of its own, scores each against the FP model's image from the same noise (evaluate.py --against:
PSNR and feature distance, 95 % intervals over images) and prints, per cell, the multipliers with both
held-out eps MSEs beside the paired fidelity: the rule's choice and the fidelity's best side by side.
Nothing reported is chosen by this: it checks the rule on the selection seed, where nothing else looks.

    python bench/selection_check.py --out runs/w2a4_yard --jobs 2      # after reproduce.py --lr-search ... --out runs/w2a4_yard
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402

from models.paired import format_interval, interval  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", type=Path, required=True, help="a bench/reproduce.py --out that ran a --lr-search")
parser.add_argument("--sample-seed", type=int, default=4321,
                    help="images of this check (not reproduce.py's --sample-seed, 1234, nor its + 1)")
parser.add_argument("--num-images", type=int, default=500)
parser.add_argument("--cells", default=None, help="only these cells' search runs, e.g. mpqdm,mpqdm_lam20 (default: all)")
parser.add_argument("--bits", default=None, help="only these weight bit-widths' search runs, e.g. 2 (default: all)")
parser.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each when more than 1")
args = parser.parse_args()
results = json.loads((args.out / "results.json").read_text())
rule = results.get("select_by", "both")
env = dict(os.environ, **({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if args.jobs > 1 else {}))
folder = args.out / "selection_check"


def run(log, script, *a):
    log = folder / "logs" / f"{log}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        if subprocess.run([sys.executable, str(ROOT / script), *map(str, a)], cwd=ROOT, env=env, stdout=f,
                          stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"{script} failed; see {log}")


def samples(tag, ckpt=None):
    out = folder / tag
    if not (out / "samples.npz").exists():
        run(tag + "_sample", "sample.py", *(["--ckpt", ckpt] if ckpt else []), "--num-images", args.num_images,
            "--seed", args.sample_seed, "--no-png", "--out", out, "--force")
    return out / "samples.npz"


VARIANTS = {"baseline": ("uniform", "mse"), "omq": ("omq", "mse"), "trd": ("uniform", "trd"), "mpqdm": ("omq", "trd"),
            "smooth": ("uniform_smooth", "trd"), "nosmooth": ("omq_nosmooth", "trd"), "random": ("random", "trd")}


def checkpoint(r):
    """The distill.py checkpoint reproduce.py wrote for a search run (its distill_path)."""
    base, _, lam = r["cell"].partition("_lam")  # a relation-weight cell: trd<lam> in the name
    base, _, rank = base.partition("_lr")
    variant, loss = VARIANTS[base]
    loss += f"lam{float(lam):g}" if lam else ""
    name = f"w{r['wbits']}a*_{variant}{'_lr' + rank if rank else ''}_{loss}_s{r['seed']}_x{r['lr_mult']:g}_it{r['iters']}.pt"
    return next((args.out / "distill").glob(name), None)


def score(item):
    tag, r = item
    ckpt = checkpoint(r)
    if r["eps_mse"] is None or ckpt is None:
        return tag, None
    s = samples(tag, ckpt)
    paired = s.with_name("vs_fp.eval.paired.npz")
    if not paired.exists():
        run(tag + "_evaluate", "evaluate.py", s, "--ref", fp, "--against", fp, "--out", s.with_name("vs_fp.eval.json"))
    return tag, np.load(paired)


fp = samples("fp")
runs = {k.replace(" ", "_"): r for k, r in results["search"].items()
        if (args.cells is None or r["cell"] in args.cells.split(","))
        and (args.bits is None or str(r["wbits"]) in args.bits.split(","))}
with ThreadPoolExecutor(args.jobs) as pool:
    scores = dict(pool.map(score, runs.items()))
print(f"Selection seed's search runs, {args.num_images} images at sample seed {args.sample_seed} against the FP "
      f"model's; the search chose by the {rule} eps MSE (*); PSNR and feature distance: mean [95 % interval over images]\n")
print("| setting | method | LoRA lr × | eps MSE, guided | eps MSE, both halves | PSNR vs FP, dB | feature distance vs FP |")
print("|---|---|---|---|---|---|---|")
by_cell = {}
for tag, r in runs.items():
    by_cell.setdefault((r["wbits"], r["cell"]), []).append((r["lr_mult"], tag, r))
for (n, cell), rows in sorted(by_cell.items()):
    finite = [x for x in rows if x[2]["eps_mse"] is not None]
    best = min(finite, key=lambda x: x[2]["eps_mse_guided"] if rule == "guided" else x[2]["eps_mse"])[0] if finite else None
    for m, tag, r in sorted(rows):
        p = scores.get(tag)
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"| W{n} | {cell} | {m:g}{'*' if m == best else ''} | {fmt(r['eps_mse_guided'], '.4f')} | {fmt(r['eps_mse'], '.4f')} | "
              + (f"{format_interval(interval([p['psnr']]), '.2f')} | {format_interval(interval([p['feature_distance']]), '.3f')} |"
                 if p is not None else "diverged | - |"))
