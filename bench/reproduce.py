"""Reproduces the paper's comparison on the embedded default, end to end through the four scripts
(quantize.py -> distill.py -> sample.py -> evaluate.py), over several training seeds, with a shared
learning-rate search for every arm, controls of OMQ's parts and a training-budget curve. Writes
Markdown tables, a JSON file holding every run's figures, the fidelity-over-updates curve as a PNG and the sample
grids side by side. Finished runs are kept in the JSON and skipped (delete --out to start over).

    python bench/reproduce.py --bits 2 --cells fp,baseline,mpqdm --jobs 2        # the README's main job
    python bench/reproduce.py --sweep --jobs 2                                    # the W2A4 seed sweep
    python bench/reproduce.py --model photos --bits 2 --cells fp,ptq,baseline --out runs/photos   # the photograph model

--model picks the embedded default: digits (checkpoints/digits_unet.pt) or photos, the latent
diffusion model of photograph patches (checkpoints/photo_unet.pt, models/photos.py); evaluate.py
scores each with its own in-domain network. Its committed searches live in their own folder
(--committed default: bench/results for digits, bench/results/photos for photos), and one --out holds
the runs of one model only.

Cells (method = how the weights are quantized, distillation = what fine-tunes them):
    fp        full precision (sample seed)          fp2  full precision, sample seed + 1 (FID noise)
    ptq       uniform bits, no distillation
    baseline  uniform bits, MSE-only distillation (EfficientDM-style)
    omq       OMQ bits, MSE only                     trd  uniform bits, MSE + TRD
    mpqdm     OMQ bits, MSE + TRD (MPQ-DM)
  controls of OMQ's parts, each with MSE + TRD so that they sit between trd and mpqdm:
    smooth    uniform bits + OMQ's smoothing search (no split)
    nosmooth  OMQ's kurtosis split without smoothing
    random    OMQ's smoothing and its numbers of n+1 / n-1 channels per layer, on random channels
  a float low-rank branch of rank R (quantize.py --lowrank R --lowrank-init, models/lowrank.py), which
  distillation trains in place of the cold-start LoRA:
    ptq_lrR   uniform bits + branch, no distillation   baseline_lrR  the baseline + branch
    mpqdm_lrR MPQ-DM + branch
  TRD at another relation-loss weight (distill.py --lam L; the other TRD cells use --lam auto, the
  official weighting, 200 here):
    trd_lamL  TRD only at weight L                     mpqdm_lamL    MPQ-DM at weight L

Learning rates: without --lr-search or --lr-mult, every distilled cell runs at the LoRA learning-rate
multiplier that the committed search chose for it (the lowest held-out eps MSE in
bench/results/w<n>a<m>_sweep.json at this number of updates), and at x1 (the official rule) where that
file has none; each run's multiplier and its source are printed (--plan prints only them, or with
--lr-search the grid it would search, and runs nothing).

Seeds: a training seed s sets calibration (quantize.py --seed s) and distillation (distill.py --seed s,
its LoRA init and trajectories); the eps-MSE checks use s + 10000. The evaluation images use
--sample-seed for every run (fp2: --sample-seed + 1), and nothing else uses it. Seeds that would let
two of these roles (or the selection seed's) draw the same trajectories or images are refused. The
learning-rate search (--lr-search) runs every distilled cell at each multiplier on --selection-seed,
which nothing reported uses, and keeps
per cell the multiplier with the lowest held-out eps MSE after distillation (no images are scored
for it; --select-by: of both guidance halves, or of the guided eps); the reported runs use that multiplier. With --lr-extend K, a cell whose best multiplier is
the largest (smallest) tried also tries twice (half) that, up to K doublings past the grid, so that
each cell's choice ends between two worse neighbours under the same rule for every cell. Fidelity
to the FP model: "FID vs FP" (the in-domain FID between a row's samples and the FP model's samples of
the same seed), "eps MSE" (the held-out one-step noise-prediction error), and the paired columns:
evaluate.py --against scores image i of a run against image i of the FP cell (same x_T, class and
noise), PSNR and feature distance per image; a row shows their mean over seeds and images with a 95 %
hierarchical bootstrap interval, and the per-image difference from the baseline of the same training
seed with its interval (models/paired.py).

Every distillation run shares <out>/teacher (distill.py --teacher-cache): the FP teacher's trajectories
of a training seed are computed by its first runs and read by the others of that seed only (the same
tensors; about 230 MB per seed at 800 updates; delete it when the sweep is done). Before the cache's
files were named by seed, every seed of a sweep read the first seed's trajectories (docs/results.md).

--jobs 2 runs two runs at a time with one thread each (on 2 cores: about 1.6x the throughput of one
2-thread job, measured; never run two 2-thread torch jobs at once). Figures then differ from a
--jobs 1 run in the last float bits.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402

from models.paired import format_interval, interval  # noqa: E402
from models.seeds import HELD_OUT_SEED_OFFSET, SEED_STRIDE  # noqa: E402

QUANT = {  # quantizer variant: quantize.py flags
    "uniform": ["--method", "uniform"], "omq": ["--method", "omq"], "uniform_smooth": ["--method", "uniform", "--smooth", "search"],
    "omq_nosmooth": ["--method", "omq", "--smooth", "off"], "random": ["--method", "random"],
}
CELLS = {  # cell: (quantizer variant, distillation: None | "off" (MSE) | "on" (MSE + TRD) | "on:L" (TRD at --lam L))
    "fp": (None, None), "fp2": (None, None), "ptq": ("uniform", None), "baseline": ("uniform", "off"),
    "omq": ("omq", "off"), "trd": ("uniform", "on"), "mpqdm": ("omq", "on"),
    "smooth": ("uniform_smooth", "on"), "nosmooth": ("omq_nosmooth", "on"), "random": ("random", "on"),
}
NAMES = {"fp": "FP (full precision)", "fp2": "FP, sample seed + 1", "ptq": "uniform PTQ (no distillation)",
         "baseline": "EfficientDM-style baseline", "omq": "OMQ only", "trd": "TRD only", "mpqdm": "MPQ-DM (OMQ + TRD)",
         "smooth": "control: uniform + smoothing, TRD", "nosmooth": "control: kurtosis split, no smoothing, TRD",
         "random": "control: random channels, TRD"}
SWEEP = dict(bits="2", cells="fp,fp2,baseline,omq,trd,mpqdm,smooth,nosmooth,random", train_seeds="0,1,2",
             lr_search="16,32", lr_extend=2, budget_iters="10,160", budget_cells="baseline,mpqdm")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--bits", default="2,3,4", help="weight bit-widths n (activations: --abits)")
parser.add_argument("--abits", type=int, default=4)
parser.add_argument("--cells", default="fp,fp2,ptq,baseline,omq,trd,mpqdm", help=f"any of {','.join(CELLS)}")
parser.add_argument("--train-seeds", default="0", help="calibration + distillation seeds, one run per cell each")
parser.add_argument("--sample-seed", type=int, default=1234, help="evaluation images of every run")
parser.add_argument("--num-images", type=int, default=1000, help="samples per run for the metrics")
parser.add_argument("--distill-iters", type=int, default=40, help="distill.py --iters of the reported runs (x 20 updates)")
parser.add_argument("--lr-mult", type=float, default=None,
                    help="LoRA learning-rate multiplier of every distilled cell when there is no --lr-search (default: "
                         "per cell, the one the committed search chose, read from --committed; x1, the official rule, "
                         "where it has none)")
parser.add_argument("--model", choices=["digits", "photos"], default="digits", help="which embedded default")
parser.add_argument("--committed", type=Path, default=None,
                    help="folder of the committed sweeps, w<n>a<m>_sweep.json, whose searches give the default multipliers "
                         "(default: bench/results, or bench/results/photos for --model photos)")
parser.add_argument("--plan", action="store_true", help="print every distilled cell's multiplier and its source, then stop")
parser.add_argument("--lr-search", default=None, help="multipliers searched per cell on --selection-seed, e.g. 0.5,1,2,4")
parser.add_argument("--lr-extend", type=int, default=0,
                    help="grow the search grid by up to this many doublings (halvings) past the edge holding the best")
parser.add_argument("--selection-seed", type=int, default=99, help="the search's training seed; nothing reported uses it")
parser.add_argument("--select-by", choices=["both", "guided"], default=None,
                    help="the search's held-out eps MSE: of the guided eps that sampling uses, or of both guidance halves "
                         "(which can drift where the guided eps cannot see it: docs/results.md). Default: guided for a "
                         "search run here; for a committed search, the rule it ran under (both where its file does not say)")
parser.add_argument("--search-iters", type=int, default=None, help="distill.py --iters of the search (default: --distill-iters)")
parser.add_argument("--search-only", action="store_true", help="run the learning-rate search, then only write the tables")
parser.add_argument("--lowrank-init", choices=["svd", "loftq"], default="loftq", help="the *_lrR cells' branch")
parser.add_argument("--budget-iters", default="", help="extra distill.py --iters for the budget curve, e.g. 10,160")
parser.add_argument("--budget-cells", default="baseline,mpqdm")
parser.add_argument("--budget-seeds", type=int, default=2, help="the first this many training seeds run the budget curve")
parser.add_argument("--sweep", action="store_true", help="the W2A4 seed sweep: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SWEEP.items()))
parser.add_argument("--jobs", type=int, default=1, help="stages run at once, one thread each when more than 1")
parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce")
args = parser.parse_args()
if args.sweep:
    for k, v in SWEEP.items():
        setattr(args, k, v)
cells = args.cells.split(",")
MODEL_CKPT = {"digits": "checkpoints/digits_unet.pt", "photos": "checkpoints/photo_unet.pt"}[args.model]
if args.committed is None:
    args.committed = ROOT / "bench" / "results" / ("photos" if args.model == "photos" else "")


def register(c):
    """Adds a low-rank cell (ptq_lrR, baseline_lrR, mpqdm_lrR: its rank in its name) or a relation-weight
    cell (trd_lamL, mpqdm_lamL: its weight in its name) to the cells."""
    base, _, lam = c.partition("_lam")
    if c not in CELLS and base in ("trd", "mpqdm") and re.fullmatch(r"\d+(\.\d+)?", lam) and float(lam) > 0:
        CELLS[c] = (CELLS[base][0], f"on:{float(lam):g}")
        NAMES[c] = f"{NAMES[base].split(' (')[0]}, relation weight {float(lam):g}"
        return
    base, _, rank = c.partition("_lr")
    if c not in CELLS and rank.isdigit() and int(rank) > 0 and base in ("ptq", "baseline", "mpqdm"):
        variant = f"{CELLS[base][0]}_lr{int(rank)}"
        QUANT[variant] = QUANT[CELLS[base][0]] + ["--lowrank", str(int(rank)), "--lowrank-init", args.lowrank_init]
        CELLS[c] = (variant, CELLS[base][1])
        NAMES[c] = f"{NAMES[base].split(' (')[0]} + rank-{int(rank)} branch" + (" (no distillation)" if base == "ptq" else "")


for c in cells + args.budget_cells.split(","):
    register(c)
if unknown := [c for c in cells + args.budget_cells.split(",") if c not in CELLS]:
    parser.error(f"unknown cells {unknown}: choose from {list(CELLS)}")
bits = [int(b) for b in args.bits.split(",")]
seeds = [int(s) for s in args.train_seeds.split(",")]
search = [float(m) for m in args.lr_search.split(",")] if args.lr_search else []
budget_iters = [int(i) for i in args.budget_iters.split(",") if i]
# the splits: every role draws its trajectories or images (x_T, classes, noise) from the generators of its
# own seed (models/seeds.py: seed s owns generator seeds s * SEED_STRIDE + i, i < SEED_STRIDE), so the
# roles share no draw exactly when no seed serves two roles
roles = {}
for role, seed in ([(f"training seed {s}", s) for s in seeds] +
                   [(f"the held-out check of training seed {s}", s + HELD_OUT_SEED_OFFSET) for s in seeds] +
                   [("--selection-seed", args.selection_seed),
                    ("the held-out check of --selection-seed", args.selection_seed + HELD_OUT_SEED_OFFSET),
                    ("--sample-seed", args.sample_seed), ("--sample-seed + 1 (the fp2 cell)", args.sample_seed + 1)]):
    if seed in roles:
        parser.error(f"{role} and {roles[seed]} would draw the same trajectories or images (seed {seed}); choose "
                     f"seeds that keep training, selection, held-out checks and evaluation images apart")
    roles[seed] = role
if args.num_images > SEED_STRIDE:
    parser.error(f"--num-images must be at most {SEED_STRIDE}: more would reach the next seed's draws")
if args.jobs < 1:
    parser.error("--jobs must be at least 1")
args.out.mkdir(parents=True, exist_ok=True)
results_path = args.out / "results.json"
FORMAT = 2  # 1: one training seed, keys without seed/multiplier/iterations
results = json.loads(results_path.read_text()) if results_path.exists() else {}
if results.get("format") != FORMAT:
    results = dict(format=FORMAT, runs={}, search={})
if results.setdefault("model", "digits" if results["runs"] or results["search"] else args.model) != args.model:
    parser.error(f"{results_path} holds runs of the {results['model']} model; pass --model {results['model']}, or use "
                 f"another --out")
for r in list(results["runs"].values()) + list(results["search"].values()):  # the tables show every run kept
    register(r["cell"])
if any("_lr" in c for c in CELLS):  # one branch init per --out: the cells' names do not carry it
    if results.setdefault("lowrank_init", args.lowrank_init) != args.lowrank_init:
        parser.error(f"{results_path} holds low-rank cells with --lowrank-init {results['lowrank_init']}; pass that, "
                     f"or use another --out")
env = dict(os.environ, **({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if args.jobs > 1 else {}))
t_sweep = time.time()


def save_results():
    tmp = results_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(results_path)


def run(tag, script, *script_args):
    """Runs one stage; returns its wall time. Output goes to logs/<tag>.log."""
    log = args.out / "logs" / f"{tag}.log"
    log.parent.mkdir(exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, script_args)], cwd=ROOT, env=env,
                              stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{script} failed; see {log}")
    return time.time() - t0


def parallel(fn, items):
    with ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(fn, items))


def fmt(v, f=".3f"):
    return "-" if v is None else format(v, f)


def mean_std(values, f=".3f", f_std=None):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], f)
    return f"{statistics.mean(values):{f}} ± {statistics.stdev(values):{f_std or f}}"


# ---- the runs: a run is (cell, n, training seed, lr multiplier, distill iterations)
def quant_path(variant, n, seed):
    return args.out / "quant" / f"w{n}a{args.abits}_{variant}_s{seed}.pt"


def distill_flags(cell):
    """distill.py's flags that make this cell's distillation what it is."""
    trd, _, lam = CELLS[cell][1].partition(":")
    return ["--trd", trd] + (["--lam", lam] if lam else [])


def distill_path(cell, n, seed, mult, iters):
    variant, trd = CELLS[cell]
    tag = "mse" if trd == "off" else "trd" + (f"lam{trd.partition(':')[2]}" if ":" in trd else "")
    return args.out / "distill" / f"w{n}a{args.abits}_{variant}_{tag}_s{seed}_x{mult:g}_it{iters}.pt"


def key(cell, n=None, seed=None, mult=None, iters=None):
    if CELLS[cell][0] is None:
        return cell
    return f"W{n}A{args.abits} {cell} seed{seed}" + (f" x{mult:g} it{iters}" if CELLS[cell][1] else "")


def quantize(job):
    variant, n, seed = job
    path = quant_path(variant, n, seed)
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        run(path.stem + "_quantize", "quantize.py", "--ckpt", MODEL_CKPT, "--wbits", n, "--abits", args.abits, *QUANT[variant], "--seed", seed,
            "--out", path, "--force")


def distill(job):
    cell, n, seed, mult, iters = job
    path = distill_path(cell, n, seed, mult, iters)
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        resume = ["--resume"] if path.with_name(path.name + ".state.pt").exists() else []  # a stopped sweep's last state
        run(path.stem + "_distill", "distill.py", "--qckpt", quant_path(CELLS[cell][0], n, seed), *distill_flags(cell),
            "--seed", seed, "--lr-mult", mult, "--iters", iters, "--out", path, "--force", *resume,
            "--teacher-cache", args.out / "teacher")
    return json.loads(path.with_suffix(".json").read_text())


def search_distill(job):
    """distill(), except that a run whose loss stops being finite (too high a multiplier) counts as
    diverged (eps MSE None, never chosen) instead of stopping the sweep; any other failure still stops it."""
    try:
        return distill(job)
    except SystemExit:
        log = args.out / "logs" / f"{distill_path(*job).stem}_distill.log"
        if "error: the loss is" not in log.read_text():
            raise
        print(f"diverged: {key(*job)} (see {log})", flush=True)
        return dict(eps_mse_after=None, eps_mse_after_guided=None, seconds=None)


def sample_and_score(job):
    """Samples and scores one run; returns its results entry."""
    cell, n, seed, mult, iters = job
    variant, trd = CELLS[cell]
    ckpt = (distill_path(*job) if trd else quant_path(variant, n, seed)) if variant else None
    tag = key(*job).replace(" ", "_")
    samples = args.out / "samples" / tag
    sample_seed = args.sample_seed + 1 if cell == "fp2" else args.sample_seed
    times = {"sample": run(tag + "_sample", "sample.py", "--ckpt", ckpt or MODEL_CKPT, "--num-images",
                           args.num_images, "--seed", sample_seed, "--no-png", "--out", samples, "--force")}
    times["evaluate"] = run(tag + "_evaluate", "evaluate.py", samples / "samples.npz")
    metrics = json.loads((samples / "samples.eval.json").read_text())
    fid_vs_fp, paired = None, {}
    if cell != "fp":  # FID against the FP samples, and (but for fp2, another sample seed) each image against its FP twin
        fp_samples = args.out / "samples" / "fp" / "samples.npz"
        run(tag + "_evaluate_vs_fp", "evaluate.py", samples / "samples.npz", "--ref", fp_samples,
            *(["--against", fp_samples] if cell != "fp2" else []), "--out", samples / "vs_fp.eval.json")
        vs_fp = json.loads((samples / "vs_fp.eval.json").read_text())
        fid_vs_fp = vs_fp["fid"]
        if "paired" in vs_fp:
            paired = dict(psnr_vs_fp=vs_fp["paired"]["psnr"], feature_distance_vs_fp=vs_fp["paired"]["feature_distance"],
                          paired_file=str((samples / "vs_fp.eval.paired.npz").relative_to(args.out)))
    eps_mse, stage_seconds = None, {}
    if variant:
        q = json.loads(quant_path(variant, n, seed).with_suffix(".json").read_text())
        eps_mse, stage_seconds["quantize"] = q["eps_mse"], q["seconds"]
        paired["bits_per_weight"] = q.get("bits_per_weight", float(n))  # written since the branch; n before it
        if trd:
            d = json.loads(ckpt.with_suffix(".json").read_text())
            eps_mse, stage_seconds["distill"] = d["eps_mse_after"], d["seconds"]
            paired["eps_mse_guided"] = d.get("eps_mse_after_guided")
    return dict(cell=cell, wbits=n, abits=args.abits if variant else None, train_seed=seed, lr_mult=mult, iters=iters,
                updates=iters * 20 if trd else None, sample_seed=sample_seed, checkpoint=str(ckpt or MODEL_CKPT),
                n_samples=metrics["n_samples"], fid=metrics["fid"], fid_vs_fp=fid_vs_fp, eps_mse=eps_mse, sfid=metrics["sfid"],
                IS=metrics["is"], precision=metrics["precision"], recall=metrics["recall"],
                feature_network=metrics["feature_network"], seconds={**stage_seconds, **times}, **paired)


def done(job):
    r = results["runs"].get(key(*job))
    if job[0] == "fp" and not (args.out / "samples" / "fp" / "samples.npz").exists():
        return False  # every "FID vs FP" reads these samples: a results.json copied without them reruns the fp cell
    return r is not None and (r["sample_seed"], r["n_samples"]) == (
        args.sample_seed + (job[0] == "fp2"), args.num_images) and (
        job[0] in ("fp", "fp2") or (args.out / r.get("paired_file", "-")).is_file())  # older runs lack the paired figures


# ---- 1. the learning-rate search on the selection seed: per cell, the multiplier of lowest eps MSE.
# With --lr-extend K the grid grows by doubling (or halving) past whichever edge holds the best multiplier,
# up to K steps per side, so every cell ends bracketed (both neighbours tried and worse) under one rule.
distilled = [(c, n) for n in bits for c in dict.fromkeys(cells + (args.budget_cells.split(",") if budget_iters else []))
             if CELLS[c][1]]
search_iters = args.search_iters or args.distill_iters


def selection_mse(r, rule):
    """A search run's figure under a selection rule (None: diverged, or not measured by that rule)."""
    return r["eps_mse"] if rule == "both" else r.get("eps_mse_guided")


def committed_choice(cell, n):
    """(multiplier, source) that the committed search chose for this cell and bit width: the lowest
    held-out eps MSE (--select-by) among its finite runs in --committed/w<n>a<m>_sweep.json, at this
    run's number of distillation iterations; (None, why not) where there is none."""
    path = args.committed / f"w{n}a{args.abits}_sweep.json"
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    committed = json.loads(path.read_text()) if path.exists() else {}
    rule = args.select_by or committed.get("select_by", "both")
    tried = [r for r in committed.get("search", {}).values() if (r["cell"], r["wbits"], r["iters"]) == (cell, n, search_iters)
             and selection_mse(r, rule) is not None]
    if not tried:
        return None, (f"no committed search for W{n}A{args.abits} {cell} at {search_iters * 20} updates by the "
                      f"{rule} eps MSE in {shown}")
    best = min(tried, key=lambda r: selection_mse(r, rule))
    return best["lr_mult"], f"chosen by the committed search ({shown}, {rule} eps MSE)"


chosen, source = {}, {}  # (cell, n): LoRA learning-rate multiplier, and where it comes from
for c, n in distilled:
    if args.lr_mult is not None:
        chosen[c, n], source[c, n] = args.lr_mult, "--lr-mult"
    else:
        chosen[c, n], source[c, n] = committed_choice(c, n)
        if chosen[c, n] is None:
            chosen[c, n], source[c, n] = 1.0, f"the official rule x1: {source[c, n]}"
rule = args.select_by or "guided"  # this invocation's search, if any
if search:
    if results["search"] and results.get("select_by", "both") != rule:
        parser.error(f"{results_path} holds a search selected by the {results.get('select_by', 'both')} eps MSE; "
                     f"pass --select-by {results.get('select_by', 'both')}, or use another --out")
    grids = {cn: sorted(search) for cn in distilled}
    if args.plan:  # a plan runs nothing: the search's grid, and how much of it --out already holds
        for (c, n), ms in grids.items():
            kept = sum(key(c, n, args.selection_seed, m, search_iters) in results["search"] for m in ms)
            print(f"W{n}A{args.abits} {c}: LoRA lr searched over x{', x'.join(f'{m:g}' for m in ms)} on seed "
                  f"{args.selection_seed} by the {rule} eps MSE (--lr-extend {args.lr_extend}); {kept} of these kept "
                  f"in {results_path}\n    distill.py {' '.join(distill_flags(c))}", flush=True)
        raise SystemExit(0)
    results["select_by"] = rule
    while True:
        jobs = [(c, n, args.selection_seed, m, search_iters) for (c, n), ms in grids.items() for m in ms]
        todo = [j for j in jobs if key(*j) not in results["search"]]
        parallel(quantize, sorted({(CELLS[c][0], n, s) for c, n, s, m, i in todo}))
        search_lock = threading.Lock()

        def search_run(j):  # each run saved as it ends, so that a stopped round keeps its finished runs
            report = search_distill(j)
            with search_lock:
                results["search"][key(*j)] = dict(cell=j[0], wbits=j[1], seed=j[2], lr_mult=j[3], iters=j[4],
                                                  eps_mse=report["eps_mse_after"],
                                                  eps_mse_guided=report.get("eps_mse_after_guided"), seconds=report["seconds"])
                save_results()

        parallel(search_run, todo)
        grown = False
        for (c, n), ms in grids.items():
            tried = [results["search"][key(c, n, args.selection_seed, m, search_iters)] for m in ms]
            if not (finite := [r for r in tried if selection_mse(r, rule) is not None]):
                raise SystemExit(f"every multiplier of the search diverged for W{n} {c}, or was run before distill.py "
                                 f"reported the {rule} eps MSE; search lower ones, or delete those runs")
            chosen[c, n] = min(finite, key=lambda r: selection_mse(r, rule))["lr_mult"]
            source[c, n] = f"chosen by this search (seed {args.selection_seed}, {rule} eps MSE)"
            if len(ms) > 1 and chosen[c, n] == max(ms) < max(search) * 2 ** args.lr_extend:
                ms.append(2 * max(ms))
            elif len(ms) > 1 and chosen[c, n] == min(ms) > min(search) / 2 ** args.lr_extend:
                ms.insert(0, min(ms) / 2)
            else:
                continue
            grown = True
        if not grown:
            break
    for (c, n), ms in grids.items():
        if chosen[c, n] in (max(ms), min(ms)) and len(ms) > 1:
            print(f"note: W{n} {c} chose a multiplier at the edge of the search ({chosen[c, n]:g}); its optimum may lie "
                  "beyond it", flush=True)

for (c, n), m in chosen.items():
    print(f"W{n}A{args.abits} {c}: LoRA lr x{m:g}, {source[c, n]}", flush=True)
    print(f"    distill.py {' '.join(distill_flags(c))}", flush=True)
if args.plan:
    raise SystemExit(0)

# ---- 2. the reported runs: every cell x training seed, and the budget curve's extra iterations
jobs = []
for n in [] if args.search_only else bits:
    for c in cells:
        if CELLS[c][0] is None:
            jobs += [(c, None, None, None, None)] if n == bits[0] else []
        else:
            jobs += [(c, n, s, chosen.get((c, n)), args.distill_iters if CELLS[c][1] else None) for s in seeds]
    for c in args.budget_cells.split(",") if budget_iters else []:
        jobs += [(c, n, s, chosen[c, n], i) for i in budget_iters for s in seeds[:args.budget_seeds]]
if "fp" not in cells and not args.search_only and not done(("fp", None, None, None, None)):  # every "FID vs FP" needs the FP samples
    jobs.insert(0, ("fp", None, None, None, None))
todo = [j for j in dict.fromkeys(jobs) if not done(j)]
for j in [j for j in todo if j[0] == "fp"]:  # first: the reference of every other run
    results["runs"][key(*j)] = sample_and_score(j)
    save_results()
# each run a chain (quantize -> distill -> sample and score), cell after cell in --cells order, each cell's
# seeds together, so that both workers stay busy and a stopped sweep keeps whole rows (every seed of the
# first cells); runs sharing a quantized model wait for it
locks, results_lock = {}, threading.Lock()


def chain(j):
    if CELLS[j[0]][0]:
        with locks.setdefault((CELLS[j[0]][0], j[1], j[2]), threading.Lock()):
            quantize((CELLS[j[0]][0], j[1], j[2]))
    if CELLS[j[0]][1]:
        distill(j)
    r = sample_and_score(j)
    with results_lock:
        results["runs"][key(*j)] = r
        save_results()


rest = sorted((j for j in todo if j[0] != "fp"), key=lambda j: (
    j[4] not in (None, args.distill_iters), cells.index(j[0]) if j[0] in cells else len(cells), j[2] or 0))
parallel(chain, rest)
for j in dict.fromkeys(jobs):
    r = results["runs"][key(*j)]
    print(f"{key(*j):36s} FID {r['fid']:8.3f}" + (f"  FID vs FP {r['fid_vs_fp']:8.3f}" if r["fid_vs_fp"] else "")
          + (f"  eps MSE {r['eps_mse']:.4f}" if r["eps_mse"] else "")
          + (f"  (lr x{j[3]:g}: {source[j[0], j[1]]})" if (j[0], j[1]) in source else ""))

# ---- 3. tables, from every run in the JSON that matches this invocation's settings
# in training-seed order: the bootstrap draws seeds by position, so an interval must not depend on
# the order in which the runs finished (a resumed or parallel sweep stores them in any order)
runs = sorted((r for r in results["runs"].values() if r["sample_seed"] in (args.sample_seed, args.sample_seed + 1)
               and r["n_samples"] == args.num_images), key=lambda r: r["train_seed"] or 0)
main = [r for r in runs if r["iters"] in (None, args.distill_iters)]
HEADER = ["| setting | method | bits / weight | LoRA lr × | seeds | FID | FID vs FP | eps MSE vs FP | FID vs baseline (paired per seed) "
          "| PSNR vs FP, dB | PSNR vs baseline, dB | feature distance vs FP | feature distance vs baseline |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


def per_image(r, key):
    """A run's per-image paired figure (evaluate.py --against the FP samples), or None."""
    path = args.out / r["paired_file"] if r.get("paired_file") else None
    return np.load(path)[key] if path and path.is_file() else None


def paired_columns(rs, base_runs):
    """Per paired figure: the mean over seeds and images with its 95 % interval (models/paired.py), and
    the difference from the baseline run of the same training seed, image by image, with its interval."""
    cols = []
    for k, f in (("psnr", ".2f"), ("feature_distance", ".3f")):
        mine = {r["train_seed"]: per_image(r, k) for r in rs}
        if not mine or any(v is None for v in mine.values()):
            cols += ["-", "-"]
            continue
        cols.append(format_interval(interval(list(mine.values())), f))
        base = {b["train_seed"]: per_image(b, k) for b in base_runs}
        diffs = [mine[s] - base[s] for s in mine if base.get(s) is not None]
        cols.append(format_interval(interval(diffs), "+" + f) if diffs and rs[0]["cell"] != "baseline" else "-")
    return cols


def table_row(rs, base_mult):
    """One Markdown row over a cell's seeds; the FID change and the paired figures' differences are
    paired per seed with the baseline run at multiplier base_mult (same setting, same training seed)."""
    cell, n = rs[0]["cell"], rs[0]["wbits"]
    if CELLS[cell][0] and not CELLS[cell][1]:  # uniform PTQ: against the baseline at its chosen multiplier
        base_mult = chosen.get(("baseline", n), base_mult)
    base_runs = [b for b in main if b["cell"] == "baseline" and b["wbits"] == n and (b["lr_mult"] or 0) == base_mult]
    base = {b["train_seed"]: b["fid"] for b in base_runs}
    paired = [100 * (r["fid"] - base[r["train_seed"]]) / base[r["train_seed"]] for r in rs
              if CELLS[cell][0] and cell != "baseline" and r["train_seed"] in base]
    bpw = statistics.mean(r.get("bits_per_weight", n) for r in rs) if n else 32
    return (f"| {'FP32' if not n else f'W{n}A{args.abits}'} | {NAMES[cell]} | {bpw:.2f} | {fmt(rs[0]['lr_mult'], 'g')} | "
            f"{','.join(str(r['train_seed']) for r in rs) if CELLS[cell][0] else '-'} | {mean_std([r['fid'] for r in rs])} | "
            f"{mean_std([r['fid_vs_fp'] for r in rs])} | {mean_std([r['eps_mse'] for r in rs], '.4f')} | "
            f"{mean_std(paired, '+.0f', '.0f') + ' %' if paired else '-'} | "
            + " | ".join(paired_columns(rs, base_runs) if CELLS[cell][0] else ["-"] * 4) + " |")


groups = {}
for r in main:
    groups.setdefault((r["wbits"] or 0, r["lr_mult"] or 0, list(CELLS).index(r["cell"])), []).append(r)
md = [f"Seed sweep: mean ± std over training seeds (calibration + distillation; sample seed {args.sample_seed} for all); "
      "paired columns: mean [95 % bootstrap interval over seeds and images], "
      f"{args.distill_iters * 20} distillation updates, {args.num_images} samples per run; in-domain metrics.", ""]
if any("chosen by" in v for v in source.values()):  # each cell at its search's choice (this one's or the committed), paired with the baseline at its choice
    md += ["Each method at its own chosen learning-rate multiplier:", "", *HEADER]
    for (n, mult, ci), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2])):
        if not n or not CELLS[list(CELLS)[ci]][1] or chosen.get((list(CELLS)[ci], n)) == mult:  # FP, PTQ: no multiplier
            md.append(table_row(rs, chosen.get(("baseline", n))))
    md += ["", "Every multiplier run (paired with the baseline at the same multiplier):", ""]
md += HEADER
for (n, mult, _), rs in sorted(groups.items()):  # a row per (setting, multiplier, cell)
    md.append(table_row(rs, mult))
if source and not args.search_only:
    md += ["", "This invocation's LoRA learning-rate multipliers:", ""]
    md += [f"- W{n}A{args.abits} {NAMES[c]}: × {chosen[c, n]:g}, {source[c, n]}" for c, n in chosen]
if results["search"]:
    rule = results.get("select_by", "both")
    mults = sorted({r["lr_mult"] for r in results["search"].values()})
    md += ["", f"Learning-rate search on selection seed {args.selection_seed} (held-out eps MSE after distillation, "
           f"{'of both guidance halves' if rule == 'both' else 'of the guided eps'}; the lowest is chosen, marked *):", "",
           "| setting | method | updates | " + " | ".join(f"× {m:g}" for m in mults) + " |", "|---|---|---|" + "---|" * len(mults)]
    rows = {}
    for r in results["search"].values():
        rows.setdefault((r["wbits"], list(CELLS).index(r["cell"]), r["iters"]), {})[r["lr_mult"]] = r
    for (n, ci, iters), by_mult in sorted(rows.items()):
        best = min((m for m, r in by_mult.items() if selection_mse(r, rule) is not None),
                   key=lambda m: selection_mse(by_mult[m], rule), default=None)
        md.append(f"| W{n}A{args.abits} | {NAMES[list(CELLS)[ci]]} | {iters * 20} | "
                  + " | ".join(("diverged" if m in by_mult and by_mult[m]["eps_mse"] is None
                                else fmt(selection_mse(by_mult[m], rule) if m in by_mult else None, ".4f"))
                               + ("*" if m == best else "") for m in mults) + " |")
budget = {}
for r in runs:
    if r["cell"] in args.budget_cells.split(",") and r["iters"]:
        budget.setdefault((r["wbits"], r["cell"], r["lr_mult"], r["iters"]), []).append(r)
curves = {}
if budget and len({k[3] for k in budget}) > 1:
    md += ["", "Training budget: fidelity to the FP model over distillation updates (0: the uniform PTQ model the "
           "distillation starts from, where the cell has one); mean ± std over the seeds run at each budget, PSNR "
           "[95 % interval over seeds and images]:", "",
           "| setting | method | LoRA lr × | updates | seeds | PSNR vs FP, dB | FID | FID vs FP | eps MSE vs FP |",
           "|---|---|---|---|---|---|---|---|---|"]
    for (n, cell, mult), _ in sorted({k[:3]: 1 for k in budget}.items(), key=lambda kv: (kv[0][0], list(CELLS).index(kv[0][1]), kv[0][2])):
        start = cell.replace("baseline", "ptq") if cell.startswith("baseline") else None  # its update 0
        points = [(0, [r for r in main if r["cell"] == start and r["wbits"] == n])] if start else []
        points += [(i * 20, rs) for (m, c, mm, i), rs in sorted(budget.items()) if (m, c, mm) == (n, cell, mult)]
        seeds_at = {u: {r["train_seed"] for r in rs} for u, rs in points if rs}
        for u, rs in points:
            if not rs:
                continue
            psnr = [per_image(r, "psnr") for r in rs]
            ok = all(v is not None for v in psnr)
            md.append(f"| W{n}A{args.abits} | {NAMES[cell]} | {mult:g} | {u} | {','.join(str(r['train_seed']) for r in rs)} | "
                      f"{format_interval(interval(psnr), '.2f') if ok else '-'} | {mean_std([r['fid'] for r in rs])} | "
                      f"{mean_std([r['fid_vs_fp'] for r in rs])} | {mean_std([r['eps_mse'] for r in rs], '.4f')} |")
            if ok:  # the plot: every budget on the seeds that all budgets of the line have
                common = set.intersection(*seeds_at.values())
                vals = [float(np.mean(per_image(r, "psnr"))) for r in rs if r["train_seed"] in common]
                if vals:
                    curves.setdefault((n, cell, mult), []).append((u, vals))
lowrank_rows = [c for c in dict.fromkeys(r["cell"] for r in main) if "_lr" in c]
if lowrank_rows:  # each low-rank cell against its cold start: the same cell without the branch, same seed
    md += ["", "The float low-rank branch against the cold start (the same cell without it; paired per training seed "
           "and image, mean [95 % interval]):", "",
           "| setting | method | bits / weight | seeds | PSNR vs cold start, dB | feature distance vs cold start |", "|---|---|---|---|---|---|"]
    for n in sorted({r["wbits"] for r in main if r["wbits"]}):
        for c in lowrank_rows:
            cold = c.partition("_lr")[0]
            mine = {r["train_seed"]: r for r in main if r["cell"] == c and r["wbits"] == n
                    and (r["lr_mult"] or 0) == (chosen.get((c, n)) or 0)}
            base = {r["train_seed"]: r for r in main if r["cell"] == cold and r["wbits"] == n
                    and (r["lr_mult"] or 0) == (chosen.get((cold, n)) or 0)}
            common = sorted(set(mine) & set(base))
            if not common:
                continue
            cols = []
            for k, f in (("psnr", "+.2f"), ("feature_distance", "+.3f")):
                d = [per_image(mine[s_], k) - per_image(base[s_], k) for s_ in common
                     if per_image(mine[s_], k) is not None and per_image(base[s_], k) is not None]
                cols.append(format_interval(interval(d), f) if d else "-")
            md.append(f"| W{n}A{args.abits} | {NAMES[c]} | {statistics.mean(mine[s_].get('bits_per_weight', n) for s_ in common):.2f} | "
                      f"{','.join(map(str, common))} | " + " | ".join(cols) + " |")
widths = sorted({r["wbits"] for r in main if r["wbits"]})
if len(widths) > 1 or results["search"]:  # every width this folder holds, each cell at its search's choice
    rule = results.get("select_by", "both")

    def searched_choice(c, n):
        """The multiplier the folder's search chose for (cell, width) by its rule, or None."""
        tried = [r for r in results["search"].values() if (r["cell"], r["wbits"], r["iters"]) == (c, n, search_iters)
                 and selection_mse(r, rule) is not None]
        return min(tried, key=lambda r: selection_mse(r, rule))["lr_mult"] if tried else None

    def at_choice(c, n):
        rs = [r for r in main if r["cell"] == c and r["wbits"] == n]
        return [r for r in rs if not CELLS[c][1] or r["lr_mult"] == searched_choice(c, n)]

    summary_cells = [c for c in CELLS if CELLS[c][0] and any(at_choice(c, n) for n in widths)]
    md += ["", f"By bit width, each cell at the multiplier this folder's search chose ({rule} eps MSE, selection seed): PSNR "
           "vs the FP model's images, dB, mean [95 % interval over seeds and images]; below it the paired difference "
           "from the baseline of the same width and seed; in brackets the seeds, the multiplier and, where a branch adds "
           "some, the bits per weight:", "",
           "| method | " + " | ".join(f"W{n}A{args.abits}" for n in reversed(widths)) + " |", "|---|" + "---|" * len(widths)]
    for c in summary_cells:
        cols = []
        for n in reversed(widths):
            rs, base_runs = at_choice(c, n), at_choice("baseline", n)
            if not rs or any(per_image(r, "psnr") is None for r in rs):
                cols.append("not run")
                continue
            psnr, delta = paired_columns(rs, base_runs)[:2]
            bpw = statistics.mean(r.get("bits_per_weight", n) for r in rs)
            mult = f", × {rs[0]['lr_mult']:g}" if CELLS[c][1] else ""
            cols.append(f"{psnr}{'' if delta == '-' else '<br>' + delta} ({len(rs)} seeds{mult}"
                        + (f", {bpw:.2f} bits)" if abs(bpw - n) > 1e-9 else ")"))
        md.append(f"| {NAMES[c]} | " + " | ".join(cols) + " |")
if todo:
    md += ["", f"Wall time of the invocation that ran the last runs: {(time.time() - t_sweep) / 60:.1f} min (--jobs {args.jobs})."]
(args.out / "results.md").write_text("\n".join(md) + "\n")
print("\n".join(md))


# ---- 4. pictures: the fidelity-over-updates curve, and the sample grids of FP, baseline and MPQ-DM side by side
def plot_budget(curves, path, size=(820, 420), margin=60, right=260):
    """Mean PSNR vs FP against distillation updates (the budgets run, evenly spaced, 0 the PTQ model),
    one line per method with its seed range; PIL only."""
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = sorted({u for pts in curves.values() for u, _ in pts})
    ys = [v for pts in curves.values() for _, vs in pts for v in vs]
    y0, y1 = int(min(ys)) - 1, int(max(ys)) + 2
    px = lambda u: margin + xs.index(u) / max(len(xs) - 1, 1) * (size[0] - margin - right)
    py = lambda v: size[1] - margin - (v - y0) / (y1 - y0) * (size[1] - 2 * margin)
    d.line([(margin, margin), (margin, size[1] - margin), (size[0] - right, size[1] - margin)], fill="black")
    for u in xs:
        d.text((px(u) - 12, size[1] - margin + 6), str(u), fill="black")
    for v in range(y0, y1 + 1):
        d.text((8, py(v) - 6), str(v), fill="black")
        d.line([(margin - 4, py(v)), (margin, py(v))], fill="black")
    d.text((size[0] // 2 - 90, size[1] - 24), "distillation updates (0: PTQ)", fill="black")
    d.text((margin, 12), "PSNR vs the FP model's images, dB (higher is closer); bars: min-max over seeds", fill="black")
    labels = []
    for (label, pts), colour in zip(sorted(curves.items()), [(200, 40, 40), (30, 90, 200), (230, 140, 30), (120, 60, 180), (30, 150, 60)]):
        pts = sorted(pts)
        d.line([(px(u), py(statistics.mean(vs))) for u, vs in pts], fill=colour, width=2)
        for u, vs in pts:
            d.line([(px(u), py(min(vs))), (px(u), py(max(vs)))], fill=colour, width=1)
            d.ellipse([px(u) - 3, py(statistics.mean(vs)) - 3, px(u) + 3, py(statistics.mean(vs)) + 3], fill=colour)
        labels.append([py(statistics.mean(pts[-1][1])) - 6, px(pts[-1][0]) + 6, label, colour])
    prev = float("-inf")
    for y, x, label, colour in sorted(labels):  # from the top down, each label at least a line below the last
        prev = max(y, prev + 12)
        d.text((x, prev), label, fill=colour)
    img.save(path)


fp_run = results["runs"].get("fp")
for n in bits:
    c = {f"{NAMES[cell].split(' (')[0].replace('EfficientDM-style ', '')}, x{mult:g}": pts for (m, cell, mult), pts in curves.items()
         if m == n and len(pts) > 1}
    if c:
        plot_budget(c, args.out / f"fidelity_w{n}a{args.abits}.png")
        print(f"wrote {args.out / f'fidelity_w{n}a{args.abits}.png'}")
    panels = [("FP", args.out / "samples" / "fp")] + [
        (f"{NAMES[c].split(' (')[0]}, W{n}A{args.abits}, lr x{chosen.get((c, n)):g}",
         args.out / "samples" / key(c, n, seeds[0], chosen.get((c, n)), args.distill_iters).replace(" ", "_"))
        for c in ("baseline", "mpqdm") if c in cells]
    if fp_run and len(panels) > 1 and all((p / "grid.png").exists() for _, p in panels):
        grids = [Image.open(p / "grid.png").convert("RGB") for _, p in panels]
        w, h = grids[0].size
        sheet = Image.new("RGB", (len(grids) * (w + 16) - 16, h + 24), "white")
        for i, ((label, _), g) in enumerate(zip(panels, grids)):
            sheet.paste(g, (i * (w + 16), 24))
            ImageDraw.Draw(sheet).text((i * (w + 16) + 4, 4), label, fill="black")
        sheet.save(args.out / f"grids_w{n}a{args.abits}.png")
        print(f"wrote {args.out / f'grids_w{n}a{args.abits}.png'}")
