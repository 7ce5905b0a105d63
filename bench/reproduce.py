"""Reproduces the paper's comparison on the embedded default, end to end through the four scripts
(quantize.py -> distill.py -> sample.py -> evaluate.py), over several training seeds, with a shared
learning-rate search for every arm, controls of OMQ's parts and a training-budget curve. Writes
Markdown tables, a JSON file holding every run's figures, the fidelity-over-updates curve as a PNG and the sample
grids side by side. Finished runs are kept in the JSON and skipped (delete --out to start over);
--start-from copies committed results into a new --out, so that new cells pair with them.

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
  a float low-rank branch of rank R (quantize.py --lowrank R --lowrank-init, models/core/lowrank.py), which
  distillation trains in place of the cold-start LoRA:
    ptq_lrR   uniform bits + branch, no distillation   baseline_lrR  the baseline + branch
    mpqdm_lrR MPQ-DM + branch
  float branches with a rank per layer, within B stored bits per weight in all (quantize.py --lowrank-budget B,
  models/core/bits.py's count):
    ptq_bpwB, baseline_bpwB, mpqdm_bpwB   as the _lrR cells, e.g. baseline_bpw3.6
  any branch cell with _svd or _loftq appended (baseline_bpw3.6_svd) starts its branch so, whatever
  --lowrank-init says for the others: one folder pairs the two starts.
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
files were named by seed, every seed of a sweep read the first seed's trajectories (docs/history.md).

--jobs 2 runs two runs at a time with one thread each (on 2 cores: about 1.6x the throughput of one
2-thread job, measured; never run two 2-thread torch jobs at once). Figures then differ from a
--jobs 1 run in the last float bits.
"""
import argparse
import hashlib
import json
import os
import shutil
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

from bench import runs as R  # noqa: E402
from models.paired import format_interval, interval  # noqa: E402

SWEEP = dict(bits="2", cells="fp,fp2,baseline,omq,trd,mpqdm,smooth,nosmooth,random", train_seeds="0,1,2",
             lr_search="16,32", lr_extend=2, budget_iters="10,160", budget_cells="baseline,mpqdm")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="2,3,4", help="weight bit-widths n (activations: --abits)")
    parser.add_argument("--abits", type=int, default=4)
    parser.add_argument("--cells", default="fp,fp2,ptq,baseline,omq,trd,mpqdm", help=f"any of {','.join(R.CELLS)}")
    parser.add_argument("--train-seeds", default="0", help="calibration + distillation seeds, one run per cell each")
    parser.add_argument("--sample-seed", type=int, default=1234, help="evaluation images of every run")
    parser.add_argument("--num-images", type=int, default=1000, help="samples per run for the metrics")
    parser.add_argument("--distill-iters", type=int, default=40, help="distill.py --iters of the reported runs (x 20 updates)")
    parser.add_argument("--lr-mult", type=float, default=None,
                        help="LoRA learning-rate multiplier of every distilled cell when there is no --lr-search (default: "
                             "per cell, the one the committed search chose, read from --committed; x1, the official rule, "
                             "where it has none)")
    parser.add_argument("--model", choices=sorted(R.MODEL_CHECKPOINTS), default="digits", help="which embedded default")
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
                             "(which can drift where the guided eps cannot see it: docs/history.md). Default: guided for a "
                             "search run here; for a committed search, the rule it ran under (both where its file does not say)")
    parser.add_argument("--search-iters", type=int, default=None, help="distill.py --iters of the search (default: --distill-iters)")
    parser.add_argument("--search-only", action="store_true", help="run the learning-rate search, then only write the tables")
    parser.add_argument("--lowrank-init", choices=["svd", "loftq"], default="loftq", help="the *_lrR cells' branch")
    parser.add_argument("--budget-iters", default="", help="extra distill.py --iters for the budget curve, e.g. 10,160")
    parser.add_argument("--budget-cells", default="baseline,mpqdm")
    parser.add_argument("--budget-seeds", type=int, default=2, help="the first this many training seeds run the budget curve")
    parser.add_argument("--sweep", action="store_true",
                        help="the W2A4 seed sweep: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SWEEP.items()))
    parser.add_argument("--start-from", default=None,
                        help="comma-separated results files (e.g. the committed bench/results/w<n>a<m>_sweep.json) to start a "
                             "new --out from: their runs and searches are copied in with the per-image files beside them "
                             "and are not rerun; the FP samples are made again (same seed, so the pairs stay pairs)")
    parser.add_argument("--jobs", type=int, default=1, help="stages run at once, one thread each when more than 1")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce")
    args = parser.parse_args(argv)
    if args.sweep:
        for k, v in SWEEP.items():
            setattr(args, k, v)
    cells = args.cells.split(",")
    model_ckpt = R.MODEL_CHECKPOINTS[args.model]
    if args.committed is None:
        args.committed = ROOT / "bench" / "results" / ("photos" if args.model == "photos" else "")
    folder = R.RunFolder(args.out, args.abits, args.lowrank_init)
    CELLS, key = folder.cells, folder.key
    if unknown := [c for c in cells + args.budget_cells.split(",") if not folder.register(c)]:
        parser.error(f"unknown cells {unknown}: choose from {list(CELLS)}")
    bits = [int(b) for b in args.bits.split(",")]
    seeds = [int(s) for s in args.train_seeds.split(",")]
    search = [float(m) for m in args.lr_search.split(",")] if args.lr_search else []
    budget_iters = [int(i) for i in args.budget_iters.split(",") if i]
    try:
        R.check_seed_roles(seeds, args.selection_seed, args.sample_seed)
        R.check_num_images(args.num_images)
    except ValueError as e:
        parser.error(str(e))
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = folder.results_path
    results = folder.load_results()
    if results.setdefault("model", "digits" if results["runs"] or results["search"] else args.model) != args.model:
        parser.error(f"{results_path} holds runs of the {results['model']} model; pass --model {results['model']}, or use "
                     f"another --out")
    if args.start_from:
        try:
            start_from(results, [Path(p) for p in args.start_from.split(",")], args)
        except ValueError as e:
            parser.error(str(e))
        folder.save_results(results)
    for r in list(results["runs"].values()) + list(results["search"].values()):  # the tables show every run kept
        folder.register(r["cell"])
    if any("_lr" in c or "_bpw" in c for c in CELLS):  # one branch init per --out: the cells' names do not carry it
        if results.setdefault("lowrank_init", args.lowrank_init) != args.lowrank_init:
            parser.error(f"{results_path} holds low-rank cells with --lowrank-init {results['lowrank_init']}; pass that, "
                         f"or use another --out")
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if args.jobs > 1 else {}))
    t_sweep = time.time()

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

    # ---- the stages of a run: (cell, n, training seed, lr multiplier, distill iterations)
    def quantize(job):
        variant, n, seed = job
        path = folder.quant_path(variant, n, seed)
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            run(path.stem + "_quantize", "quantize.py", "--ckpt", model_ckpt, "--wbits", n, "--abits", args.abits,
                *folder.quant[variant], "--seed", seed, "--out", path, "--force")

    def distill(job):
        cell, n, seed, mult, iters = job
        path = folder.distill_path(*job)
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            resume = ["--resume"] if path.with_name(path.name + ".state.pt").exists() else []  # a stopped sweep's last state
            run(path.stem + "_distill", "distill.py", "--qckpt", folder.quant_path(CELLS[cell][0], n, seed),
                *folder.distill_flags(cell), "--seed", seed, "--lr-mult", mult, "--iters", iters, "--out", path, "--force",
                *resume, "--teacher-cache", args.out / "teacher")
        return json.loads(path.with_suffix(".json").read_text())

    def search_distill(job):
        """distill(), except that a run whose loss stops being finite (too high a multiplier) counts as
        diverged (eps MSE None, never chosen) instead of stopping the sweep; any other failure still stops it."""
        try:
            return distill(job)
        except SystemExit:
            log = args.out / "logs" / f"{folder.distill_path(*job).stem}_distill.log"
            if "error: the loss is" not in log.read_text():
                raise
            print(f"diverged: {key(*job)} (see {log})", flush=True)
            return dict(eps_mse_after=None, eps_mse_after_guided=None, seconds=None)

    def sample_and_score(job):
        """Samples and scores one run; returns its results entry."""
        cell, n, seed, mult, iters = job
        variant, trd = CELLS[cell]
        ckpt = (folder.distill_path(*job) if trd else folder.quant_path(variant, n, seed)) if variant else None
        tag = key(*job).replace(" ", "_")
        samples = folder.samples_dir(job)
        sample_seed = args.sample_seed + 1 if cell == "fp2" else args.sample_seed
        times = {"sample": run(tag + "_sample", "sample.py", "--ckpt", ckpt or model_ckpt, "--num-images",
                               args.num_images, "--seed", sample_seed, "--no-png", "--out", samples, "--force")}
        times["evaluate"] = run(tag + "_evaluate", "evaluate.py", samples / "samples.npz")
        metrics = json.loads((samples / "samples.eval.json").read_text())
        fid_vs_fp, paired = None, {}
        if cell != "fp":  # FID against the FP samples, and (but for fp2, another sample seed) each image against its FP twin
            fp_samples = folder.samples_dir(("fp",)) / "samples.npz"
            run(tag + "_evaluate_vs_fp", "evaluate.py", samples / "samples.npz", "--ref", fp_samples,
                *(["--against", fp_samples] if cell != "fp2" else []), "--out", samples / "vs_fp.eval.json")
            vs_fp = json.loads((samples / "vs_fp.eval.json").read_text())
            fid_vs_fp = vs_fp["fid"]
            if "paired" in vs_fp:
                paired = dict(psnr_vs_fp=vs_fp["paired"]["psnr"], feature_distance_vs_fp=vs_fp["paired"]["feature_distance"],
                              paired_file=str((samples / "vs_fp.eval.paired.npz").relative_to(args.out)))
        eps_mse, stage_seconds = None, {}
        if variant:
            q = json.loads(folder.quant_path(variant, n, seed).with_suffix(".json").read_text())
            eps_mse, stage_seconds["quantize"] = q["eps_mse"], q["seconds"]
            paired["bits_per_weight"] = q.get("bits_per_weight", float(n))  # written since the branch; n before it
            paired["bits_count"] = q.get("bits_count", 1)  # 2: models/core/bits.py's count
            if trd:
                d = json.loads(ckpt.with_suffix(".json").read_text())
                eps_mse, stage_seconds["distill"] = d["eps_mse_after"], d["seconds"]
                paired["eps_mse_guided"] = d.get("eps_mse_after_guided")
        return dict(cell=cell, wbits=n, abits=args.abits if variant else None, train_seed=seed, lr_mult=mult, iters=iters,
                    updates=iters * 20 if trd else None, sample_seed=sample_seed, checkpoint=str(ckpt or model_ckpt),
                    n_samples=metrics["n_samples"], fid=metrics["fid"], fid_vs_fp=fid_vs_fp, eps_mse=eps_mse,
                    sfid=metrics["sfid"], IS=metrics["is"], precision=metrics["precision"], recall=metrics["recall"],
                    feature_network=metrics["feature_network"], seconds={**stage_seconds, **times}, **paired)

    def done(job):
        r = results["runs"].get(key(*job))
        if job[0] == "fp" and not (folder.samples_dir(job) / "samples.npz").exists():
            return False  # every "FID vs FP" reads these samples: a results.json copied without them reruns the fp cell
        return r is not None and (r["sample_seed"], r["n_samples"]) == (
            args.sample_seed + (job[0] == "fp2"), args.num_images) and (
            job[0] in ("fp", "fp2") or (args.out / r.get("paired_file", "-")).is_file())  # older runs lack the paired figures

    # ---- 1. the learning-rate search on the selection seed (bench/runs.py: search): per cell, the multiplier
    # of lowest eps MSE, the grid grown past an edge that holds the choice until every choice is bracketed
    distilled = [(c, n) for n in bits for c in dict.fromkeys(cells + (args.budget_cells.split(",") if budget_iters else []))
                 if CELLS[c][1]]
    search_iters = args.search_iters or args.distill_iters
    chosen, source = {}, {}  # (cell, n): LoRA learning-rate multiplier, and where it comes from
    for c, n in distilled:
        if args.lr_mult is not None:
            chosen[c, n], source[c, n] = args.lr_mult, "--lr-mult"
            continue
        path = args.committed / f"w{n}a{args.abits}_sweep.json"
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        chosen[c, n], rule = R.committed_choice(path, c, n, search_iters, args.select_by)
        source[c, n] = f"chosen by the committed search ({shown}, {rule} eps MSE)"
        if chosen[c, n] is None:
            chosen[c, n], source[c, n] = 1.0, (f"the official rule x1: no committed search for W{n}A{args.abits} {c} at "
                                               f"{search_iters * 20} updates by the {rule} eps MSE in {shown}")
    rule = args.select_by or "guided"  # this invocation's search, if any

    def tried(c, n, m):
        return results["search"].get(key(c, n, args.selection_seed, m, search_iters))

    if search:
        if results["search"] and results.get("select_by", "both") != rule:
            parser.error(f"{results_path} holds a search selected by the {results.get('select_by', 'both')} eps MSE; "
                         f"pass --select-by {results.get('select_by', 'both')}, or use another --out")
        if args.plan:  # a plan runs nothing: the search's grid, and how much of it --out already holds
            for c, n in distilled:
                kept = sum(tried(c, n, m) is not None for m in search)
                print(f"W{n}A{args.abits} {c}: LoRA lr searched over x{', x'.join(f'{m:g}' for m in sorted(search))} on "
                      f"seed {args.selection_seed} by the {rule} eps MSE (--lr-extend {args.lr_extend}); {kept} of these "
                      f"kept in {results_path}\n    distill.py {' '.join(folder.distill_flags(c))}", flush=True)
            return
        results["select_by"] = rule
        search_lock = threading.Lock()

        def search_run(j):  # each run saved as it ends, so that a stopped round keeps its finished runs
            report = search_distill(j)
            with search_lock:
                results["search"][key(*j)] = dict(cell=j[0], wbits=j[1], seed=j[2], lr_mult=j[3], iters=j[4],
                                                  eps_mse=report["eps_mse_after"],
                                                  eps_mse_guided=report.get("eps_mse_after_guided"), seconds=report["seconds"])
                folder.save_results(results)

        def run_search(missing):
            jobs = [(c, n, args.selection_seed, m, search_iters) for c, n, m in missing]
            parallel(quantize, sorted({(CELLS[c][0], n, s) for c, n, s, m, i in jobs}))
            parallel(search_run, jobs)

        try:
            grids, found = R.search(distilled, search, args.lr_extend, rule, tried, run_search)
        except ValueError as e:
            raise SystemExit(str(e))
        for cn, m in found.items():
            chosen[cn], source[cn] = m, f"chosen by this search (seed {args.selection_seed}, {rule} eps MSE)"
            if m in (max(grids[cn]), min(grids[cn])) and len(grids[cn]) > 1:
                print(f"note: W{cn[1]} {cn[0]} chose a multiplier at the edge of the search ({m:g}); its optimum may lie "
                      "beyond it", flush=True)

    for (c, n), m in chosen.items():
        print(f"W{n}A{args.abits} {c}: LoRA lr x{m:g}, {source[c, n]}", flush=True)
        print(f"    distill.py {' '.join(folder.distill_flags(c))}", flush=True)
    if args.plan:
        return

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
    fp_job = ("fp", None, None, None, None)
    if "fp" not in cells and not args.search_only and not done(fp_job):  # every "FID vs FP" needs the FP samples
        jobs.insert(0, fp_job)
    todo = [j for j in dict.fromkeys(jobs) if not done(j)]
    for j in [j for j in todo if j[0] == "fp"]:  # first: the reference of every other run
        kept, r = results["runs"].get(key(*j)), sample_and_score(j)
        r["images_sha256"] = hashlib.sha256(np.load(folder.samples_dir(j) / "samples.npz")["arr_0"].tobytes()).hexdigest()
        if kept and (kept["sample_seed"], kept["n_samples"]) == (r["sample_seed"], r["n_samples"]) and not R.same_images(kept, r):
            (folder.samples_dir(j) / "samples.npz").unlink()  # else a rerun would take them as the kept run's
            raise SystemExit(f"the FP samples made again here are not those the kept runs were scored against (FID "
                             f"{r['fid']!r}, kept {kept['fid']!r}): another CPU or code rounds differently, and new runs would "
                             f"not pair with the kept ones; start {args.out} without --start-from, or on the machine "
                             f"that made them")
        results["runs"][key(*j)] = r
        folder.save_results(results)
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
            folder.save_results(results)

    rest = sorted((j for j in todo if j[0] != "fp"), key=lambda j: (
        j[4] not in (None, args.distill_iters), cells.index(j[0]) if j[0] in cells else len(cells), j[2] or 0))
    parallel(chain, rest)
    for j in dict.fromkeys(jobs):
        r = results["runs"][key(*j)]
        print(f"{key(*j):36s} FID {r['fid']:8.3f}" + (f"  FID vs FP {r['fid_vs_fp']:8.3f}" if r["fid_vs_fp"] else "")
              + (f"  eps MSE {r['eps_mse']:.4f}" if r["eps_mse"] else "")
              + (f"  (lr x{j[3]:g}: {source[j[0], j[1]]})" if (j[0], j[1]) in source else ""))

    # ---- 3. tables, from every run in the JSON that matches this invocation's settings
    runs = R.in_seed_order(r for r in results["runs"].values() if r["sample_seed"] in (args.sample_seed, args.sample_seed + 1)
                           and r["n_samples"] == args.num_images)
    md = tables(args, folder, results, runs, chosen, source, search_iters)
    if todo:
        md += ["", f"Wall time of the invocation that ran the last runs: {(time.time() - t_sweep) / 60:.1f} min "
               f"(--jobs {args.jobs})."]
    (args.out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    pictures(args, folder, results, runs, chosen, seeds, bits, cells)


def start_from(results, paths, args):
    """Copies the runs and searches of earlier results files (and their per-image files) into a new --out's
    results; refuses what this --out would not have made: another model, --abits, branch start or rule."""
    if results["runs"] or results["search"]:
        raise ValueError(f"--start-from fills a new --out; {args.out / 'results.json'} already holds runs")
    try:
        start = R.merge_results(paths)
    except ValueError as e:
        raise ValueError(f"--start-from: {e}")
    if start["model"] != args.model:
        raise ValueError(f"--start-from: the files hold runs of the {start['model']} model, not {args.model}")
    if any(r.get("abits") not in (None, args.abits) for r in start["runs"].values()):
        raise ValueError(f"--start-from: the files hold runs at another activation width than --abits {args.abits}")
    for k, mine in (("lowrank_init", args.lowrank_init), ("select_by", args.select_by)):
        if start.get(k) and mine and start[k] != mine:
            raise ValueError(f"--start-from: the files were made with --{k.replace('_', '-')} {start[k]}, not {mine}")
    for r in start["runs"].values():
        if r.get("paired_file"):
            source = next((p.parent / r["paired_file"] for p in paths if (p.parent / r["paired_file"]).is_file()), None)
            if source is None:
                raise ValueError(f"--start-from: {r['paired_file']}, a per-image file, is missing beside the files")
            (args.out / r["paired_file"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, args.out / r["paired_file"])
    results.update(start)


HEADER = ["| setting | method | bits / weight | LoRA lr × | seeds | FID | FID vs FP | eps MSE vs FP | FID vs baseline (paired per seed) "
          "| PSNR vs FP, dB | PSNR vs baseline, dB | feature distance vs FP | feature distance vs baseline |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


def tables(args, folder, results, runs, chosen, source, search_iters):
    """The Markdown tables of every run kept (runs: in training-seed order)."""
    CELLS, NAMES, fmt, mean_std = folder.cells, folder.names, R.fmt, R.mean_std
    main = [r for r in runs if r["iters"] in (None, args.distill_iters)]

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
        bpw = R.bits_cell(rs, n) if n else "32.00"
        return (f"| {'FP32' if not n else f'W{n}A{args.abits}'} | {NAMES[cell]} | {bpw} | {fmt(rs[0]['lr_mult'], 'g')} | "
                f"{','.join(str(r['train_seed']) for r in rs) if CELLS[cell][0] else '-'} | {mean_std([r['fid'] for r in rs])} | "
                f"{mean_std([r['fid_vs_fp'] for r in rs])} | {mean_std([r['eps_mse'] for r in rs], '.4f')} | "
                f"{mean_std(paired, '+.0f', '.0f') + ' %' if paired else '-'} | "
                + " | ".join(folder.paired_columns(rs, base_runs, cell == "baseline") if CELLS[cell][0] else ["-"] * 4)
                + " |")

    groups = {}
    for r in main:
        groups.setdefault((r["wbits"] or 0, r["lr_mult"] or 0, folder.order(r["cell"])), []).append(r)
    md = [f"Seed sweep: mean ± std over training seeds (calibration + distillation; sample seed {args.sample_seed} for all); "
          "paired columns: mean [95 % bootstrap interval over seeds and images], "
          f"{args.distill_iters * 20} distillation updates, {args.num_images} samples per run; in-domain metrics. "
          + R.bits_note(main), ""]
    if any("chosen by" in v for v in source.values()):  # each cell at its search's choice, paired with the baseline at its choice
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
            rows.setdefault((r["wbits"], folder.order(r["cell"]), r["iters"]), {})[r["lr_mult"]] = r
        for (n, ci, iters), by_mult in sorted(rows.items()):
            best = R.choose(by_mult.values(), rule)
            md.append(f"| W{n}A{args.abits} | {NAMES[list(CELLS)[ci]]} | {iters * 20} | "
                      + " | ".join(("diverged" if m in by_mult and by_mult[m]["eps_mse"] is None
                                    else fmt(R.selection_mse(by_mult[m], rule) if m in by_mult else None, ".4f"))
                                   + ("*" if m == best else "") for m in mults) + " |")
    md += budget_table(args, folder, runs, main)
    md += lowrank_table(args, folder, main, chosen)
    md += width_table(args, folder, results, main, search_iters)
    return md


def budget_curves(args, folder, runs, main):
    """{(n, cell, mult): [(updates, [runs])]}: every budget run of the budget cells, 0 being the PTQ model the
    distillation starts from where the cell has one."""
    budget = {}
    for r in runs:
        if r["cell"] in args.budget_cells.split(",") and r["iters"]:
            budget.setdefault((r["wbits"], r["cell"], r["lr_mult"], r["iters"]), []).append(r)
    if len({k[3] for k in budget}) < 2:
        return {}
    lines = {}
    for n, cell, mult in sorted({k[:3] for k in budget}, key=lambda k: (k[0], folder.order(k[1]), k[2])):
        start = cell.replace("baseline", "ptq") if cell.startswith("baseline") else None  # its update 0
        points = [(0, [r for r in main if r["cell"] == start and r["wbits"] == n])] if start else []
        points += [(i * 20, rs) for (m, c, mm, i), rs in sorted(budget.items()) if (m, c, mm) == (n, cell, mult)]
        lines[n, cell, mult] = [(u, rs) for u, rs in points if rs]
    return lines


def budget_table(args, folder, runs, main):
    lines = budget_curves(args, folder, runs, main)
    if not lines:
        return []
    md = ["", "Training budget: fidelity to the FP model over distillation updates (0: the uniform PTQ model the "
          "distillation starts from, where the cell has one); mean ± std over the seeds run at each budget, PSNR "
          "[95 % interval over seeds and images]:", "",
          "| setting | method | LoRA lr × | updates | seeds | PSNR vs FP, dB | FID | FID vs FP | eps MSE vs FP |",
          "|---|---|---|---|---|---|---|---|---|"]
    for (n, cell, mult), points in lines.items():
        for u, rs in points:
            psnr = [folder.per_image(r, "psnr") for r in rs]
            ok = all(v is not None for v in psnr)
            md.append(f"| W{n}A{args.abits} | {folder.names[cell]} | {mult:g} | {u} | {','.join(str(r['train_seed']) for r in rs)} | "
                      f"{format_interval(interval(psnr), '.2f') if ok else '-'} | {R.mean_std([r['fid'] for r in rs])} | "
                      f"{R.mean_std([r['fid_vs_fp'] for r in rs])} | {R.mean_std([r['eps_mse'] for r in rs], '.4f')} |")
    return md


def lowrank_table(args, folder, main, chosen):
    """Each low-rank cell against its cold start: the same cell without the branch, same seed."""
    lowrank_rows = [c for c in dict.fromkeys(r["cell"] for r in main) if "_lr" in c or "_bpw" in c]
    if not lowrank_rows:
        return []
    md = ["", "The float low-rank branch against the cold start (the same cell without it; paired per training seed "
          "and image, mean [95 % interval]):", "",
          "| setting | method | bits / weight | seeds | PSNR vs cold start, dB | feature distance vs cold start |",
          "|---|---|---|---|---|---|"]
    for n in sorted({r["wbits"] for r in main if r["wbits"]}):
        for c in lowrank_rows:
            cold = c.partition("_lr")[0].partition("_bpw")[0]
            mine = {r["train_seed"]: r for r in main if r["cell"] == c and r["wbits"] == n
                    and (r["lr_mult"] or 0) == (chosen.get((c, n)) or 0)}
            base = {r["train_seed"]: r for r in main if r["cell"] == cold and r["wbits"] == n
                    and (r["lr_mult"] or 0) == (chosen.get((cold, n)) or 0)}
            common = sorted(set(mine) & set(base))
            if not common:
                continue
            cols = []
            for k, f in (("psnr", "+.2f"), ("feature_distance", "+.3f")):
                d = [folder.per_image(mine[s], k) - folder.per_image(base[s], k) for s in common
                     if folder.per_image(mine[s], k) is not None and folder.per_image(base[s], k) is not None]
                cols.append(format_interval(interval(d), f) if d else "-")
            md.append(f"| W{n}A{args.abits} | {folder.names[c]} | "
                      f"{R.bits_cell([mine[s] for s in common], n)} | "
                      f"{','.join(map(str, common))} | " + " | ".join(cols) + " |")
    return md


def width_table(args, folder, results, main, search_iters):
    """Every width this folder holds, each cell at its search's choice."""
    widths = sorted({r["wbits"] for r in main if r["wbits"]})
    if not (len(widths) > 1 or results["search"]):
        return []
    CELLS, rule = folder.cells, results.get("select_by", "both")

    def at_choice(c, n):
        choice = R.choose([r for r in results["search"].values() if (r["cell"], r["wbits"], r["iters"]) == (c, n, search_iters)],
                          rule)
        return [r for r in main if r["cell"] == c and r["wbits"] == n and (not CELLS[c][1] or r["lr_mult"] == choice)]

    md = ["", f"By bit width, each cell at the multiplier this folder's search chose ({rule} eps MSE, selection seed): PSNR "
          "vs the FP model's images, dB, mean [95 % interval over seeds and images]; below it the paired difference "
          "from the baseline of the same width and seed; in brackets the seeds, the multiplier and the bits per weight:",
          "",
          "| method | " + " | ".join(f"W{n}A{args.abits}" for n in reversed(widths)) + " |", "|---|" + "---|" * len(widths)]
    for c in [c for c in CELLS if CELLS[c][0] and any(at_choice(c, n) for n in widths)]:
        cols = []
        for n in reversed(widths):
            rs, base_runs = at_choice(c, n), at_choice("baseline", n)
            if not rs or any(folder.per_image(r, "psnr") is None for r in rs):
                cols.append("not run")
                continue
            psnr, delta = folder.paired_columns(rs, base_runs, c == "baseline")[:2]
            mult = f", × {rs[0]['lr_mult']:g}" if CELLS[c][1] else ""
            cols.append(f"{psnr}{'' if delta == '-' else '<br>' + delta} ({len(rs)} seeds{mult}, {R.bits_cell(rs, n)} bits)")
        md.append(f"| {folder.names[c]} | " + " | ".join(cols) + " |")
    return md


# ---- 4. pictures: the fidelity-over-updates curve, and the sample grids of FP, baseline and MPQ-DM side by side
def plot_budget(curves, path, size=(820, 420), margin=60, right=260):
    """Mean PSNR vs FP against distillation updates (the budgets run, evenly spaced, 0 the PTQ model),
    one line per method with its seed range; PIL only."""
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = sorted({u for pts in curves.values() for u, _ in pts})
    ys = [v for pts in curves.values() for _, vs in pts for v in vs]
    y0, y1 = int(min(ys)) - 1, int(max(ys)) + 2
    px = lambda u: margin + xs.index(u) / max(len(xs) - 1, 1) * (size[0] - margin - right)  # noqa: E731
    py = lambda v: size[1] - margin - (v - y0) / (y1 - y0) * (size[1] - 2 * margin)  # noqa: E731
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


def pictures(args, folder, results, runs, chosen, seeds, bits, cells):
    main = [r for r in runs if r["iters"] in (None, args.distill_iters)]
    curves = {}  # the plot: every budget on the seeds that all budgets of the line have
    for line, points in budget_curves(args, folder, runs, main).items():
        if not all(folder.per_image(r, "psnr") is not None for _, rs in points for r in rs):
            continue
        common = set.intersection(*({r["train_seed"] for r in rs} for _, rs in points))
        for u, rs in points:
            if vals := [float(np.mean(folder.per_image(r, "psnr"))) for r in rs if r["train_seed"] in common]:
                curves.setdefault(line, []).append((u, vals))
    for n in bits:
        c = {f"{folder.names[cell].split(' (')[0].replace('EfficientDM-style ', '')}, x{mult:g}": pts
             for (m, cell, mult), pts in curves.items() if m == n and len(pts) > 1}
        if c:
            plot_budget(c, args.out / f"fidelity_w{n}a{args.abits}.png")
            print(f"wrote {args.out / f'fidelity_w{n}a{args.abits}.png'}")
        panels = [("FP", folder.samples_dir(("fp",)))] + [
            (f"{folder.names[c].split(' (')[0]}, W{n}A{args.abits}, lr x{chosen.get((c, n)):g}",
             folder.samples_dir((c, n, seeds[0], chosen.get((c, n)), args.distill_iters)))
            for c in ("baseline", "mpqdm") if c in cells]
        if results["runs"].get("fp") and len(panels) > 1 and all((p / "grid.png").exists() for _, p in panels):
            grids = [Image.open(p / "grid.png").convert("RGB") for _, p in panels]
            w, h = grids[0].size
            sheet = Image.new("RGB", (len(grids) * (w + 16) - 16, h + 24), "white")
            for i, ((label, _), g) in enumerate(zip(panels, grids)):
                sheet.paste(g, (i * (w + 16), 24))
                ImageDraw.Draw(sheet).text((i * (w + 16) + 4, 4), label, fill="black")
            sheet.save(args.out / f"grids_w{n}a{args.abits}.png")
            print(f"wrote {args.out / f'grids_w{n}a{args.abits}.png'}")


if __name__ == "__main__":
    main()
