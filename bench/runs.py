"""The experiment driver's vocabulary and decisions, importable: what a cell is, where each run of a
bench/reproduce.py folder keeps its files and under which key, the results file and its per-image
figures, and the choices the driver makes (which seeds may serve which role, which learning-rate
multiplier a search chooses and when its grid grows, the order runs enter an interval in).

bench/reproduce.py runs experiments with it; bench/selection_check.py and bench/paired_diff.py read a
folder through it; tests/test_runs.py checks the decisions on small fixed results, without training.
No torch here.

A run is (cell, n, training seed, LoRA learning-rate multiplier, distill.py --iters): a job tuple.
"""
import json
import re
import statistics
from pathlib import Path

import numpy as np

from models.paired import format_interval, interval
from models.seeds import HELD_OUT_SEED_OFFSET, SEED_STRIDE

ROOT = Path(__file__).resolve().parents[1]
MODEL_CHECKPOINTS = {"digits": "checkpoints/digits_unet.pt", "photos": "checkpoints/photo_unet.pt"}
RESULTS_FORMAT = 2  # 1: one training seed, keys without seed / multiplier / iterations

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


class RunFolder:
    """One bench/reproduce.py --out: its cells (the fixed ones and those named by a branch rank, x_lrR,
    or a relation weight, x_lamL), each run's file names and key, and its results file."""

    def __init__(self, out, abits=4, lowrank_init="loftq"):
        self.out, self.abits, self.lowrank_init = Path(out), abits, lowrank_init
        self.quant, self.cells, self.names = dict(QUANT), dict(CELLS), dict(NAMES)
        self.results_path = self.out / "results.json"

    def register(self, c):
        """Adds a low-rank cell (ptq_lrR, baseline_lrR, mpqdm_lrR: its rank in its name), a budgeted-branch cell
        (ptq_bpwB, baseline_bpwB, mpqdm_bpwB: quantize.py --lowrank-budget B, B stored bits per weight in all) or
        a relation-weight cell (trd_lamL, mpqdm_lamL: its weight in its name); False if c names no cell.
        A branch cell's name may end in _svd or _loftq (baseline_bpw3.6_svd): its branch starts so, whatever the
        folder's --lowrank-init, and its files are its own; so one folder pairs the two starts directly."""
        if c in self.cells:
            return True
        for init in ("svd", "loftq"):
            if c.endswith("_" + init) and ("_bpw" in c or "_lr" in c) and self.register(c[:-len(init) - 1]):
                bare = c[:-len(init) - 1]
                variant, trd = self.cells[bare]
                self.quant[f"{variant}_{init}"] = self.quant[variant][:-1] + [init]  # its --lowrank-init replaced
                self.cells[c] = (f"{variant}_{init}", trd)
                self.names[c] = self.names[bare].replace(" branch", f" {'SVD' if init == 'svd' else 'LoftQ'}-started branch", 1)
                return True
        base, _, lam = c.partition("_lam")
        if base in ("trd", "mpqdm") and re.fullmatch(r"\d+(\.\d+)?", lam) and float(lam) > 0:
            self.cells[c] = (self.cells[base][0], f"on:{float(lam):g}")
            self.names[c] = f"{self.names[base].split(' (')[0]}, relation weight {float(lam):g}"
            return True
        base, _, budget = c.partition("_bpw")
        if base in ("ptq", "baseline", "mpqdm") and re.fullmatch(r"\d+(\.\d+)?", budget) and float(budget) > 0:
            variant = f"{self.cells[base][0]}_bpw{float(budget):g}"
            self.quant[variant] = self.quant[self.cells[base][0]] + ["--lowrank-budget", f"{float(budget):g}",
                                                                     "--lowrank-init", self.lowrank_init]
            self.cells[c] = (variant, self.cells[base][1])
            self.names[c] = (f"{self.names[base].split(' (')[0]} + branches within {float(budget):g} bits per weight"
                             + (" (no distillation)" if base == "ptq" else ""))
            return True
        base, _, rank = c.partition("_lr")
        if rank.isdigit() and int(rank) > 0 and base in ("ptq", "baseline", "mpqdm"):
            variant = f"{self.cells[base][0]}_lr{int(rank)}"
            self.quant[variant] = self.quant[self.cells[base][0]] + ["--lowrank", str(int(rank)), "--lowrank-init",
                                                                     self.lowrank_init]
            self.cells[c] = (variant, self.cells[base][1])
            self.names[c] = (f"{self.names[base].split(' (')[0]} + rank-{int(rank)} branch"
                             + (" (no distillation)" if base == "ptq" else ""))
            return True
        return False

    def order(self, c):
        """A cell's place in the tables."""
        return list(self.cells).index(c)

    # ---- file names and keys
    def quant_path(self, variant, n, seed):
        return self.out / "quant" / f"w{n}a{self.abits}_{variant}_s{seed}.pt"

    def distill_flags(self, cell):
        """distill.py's flags that make this cell's distillation what it is."""
        trd, _, lam = self.cells[cell][1].partition(":")
        return ["--trd", trd] + (["--lam", lam] if lam else [])

    def distill_path(self, cell, n, seed, mult, iters):
        variant, trd = self.cells[cell]
        tag = "mse" if trd == "off" else "trd" + (f"lam{trd.partition(':')[2]}" if ":" in trd else "")
        return self.out / "distill" / f"w{n}a{self.abits}_{variant}_{tag}_s{seed}_x{mult:g}_it{iters}.pt"

    def key(self, cell, n=None, seed=None, mult=None, iters=None):
        """A run's key in results.json (its 'runs' or its 'search')."""
        if self.cells[cell][0] is None:
            return cell
        return f"W{n}A{self.abits} {cell} seed{seed}" + (f" x{mult:g} it{iters}" if self.cells[cell][1] else "")

    def samples_dir(self, job):
        return self.out / "samples" / self.key(*job).replace(" ", "_")

    def selection_check_dir(self, key):
        """bench/selection_check.py's samples of a search run (by its key), or of the FP model ('fp')."""
        return self.out / "selection_check" / key.replace(" ", "_")

    # ---- the results file
    def load_results(self):
        """results.json, or a new one where there is none or it has another format."""
        results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        return results if results.get("format") == RESULTS_FORMAT else dict(format=RESULTS_FORMAT, runs={}, search={})

    def save_results(self, results):
        """Atomically: a killed sweep leaves the last complete file."""
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(self.results_path)

    def per_image(self, run, key):
        """A run's per-image paired figure ('psnr' or 'feature_distance', evaluate.py --against the FP
        samples), or None."""
        path = self.out / run["paired_file"] if run.get("paired_file") else None
        return np.load(path)[key] if path and path.is_file() else None

    def paired_columns(self, rs, base_runs, baseline_cell=False):
        """Per paired figure: the mean over seeds and images with its 95 % interval (models/paired.py), and
        the difference from the baseline run of the same training seed, image by image, with its interval
        ('-' for the baseline itself). The bootstrap draws seeds by position, so the runs enter in
        training-seed order, whatever order they finished in."""
        rs, cols = in_seed_order(rs), []
        for k, f in (("psnr", ".2f"), ("feature_distance", ".3f")):
            mine = {r["train_seed"]: self.per_image(r, k) for r in rs}
            if not mine or any(v is None for v in mine.values()):
                cols += ["-", "-"]
                continue
            cols.append(format_interval(interval(list(mine.values())), f))
            base = {b["train_seed"]: self.per_image(b, k) for b in base_runs}
            diffs = [mine[s] - base[s] for s in mine if base.get(s) is not None]
            cols.append(format_interval(interval(diffs), "+" + f) if diffs and not baseline_cell else "-")
        return cols


def merge_results(paths):
    """The results files (one --out's results.json, or the committed w<n>a<m>_sweep.json of one folder)
    as one results dict: their runs and searches, and the settings they agree on (model, rule, branch
    start). Raises ValueError for a missing file, another format, or two files that differ on a setting
    or a run."""
    merged = dict(format=RESULTS_FORMAT, runs={}, search={})
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(f"no results file at {path}")
        part = json.loads(path.read_text())
        if part.get("format") != RESULTS_FORMAT:
            raise ValueError(f"{path} is not a bench/reproduce.py results file of format {RESULTS_FORMAT}")
        part.setdefault("model", "digits")  # written since the photograph model; digits before it
        for k in ("model", "select_by", "lowrank_init"):
            if k in part and merged.setdefault(k, part[k]) != part[k]:
                raise ValueError(f"{path} was made with {k} {part[k]}, an earlier file with {merged[k]}")
        for k in ("runs", "search"):
            if clash := [key for key, run in part[k].items() if merged[k].get(key, run) != run]:
                raise ValueError(f"{path} and an earlier file differ on {clash[0]}")
            merged[k].update(part[k])
    return merged


# ---- the driver's decisions
def check_seed_roles(train_seeds, selection_seed, sample_seed):
    """Every role draws its trajectories or images (x_T, classes, noise) from the generators of its own
    seed (models/seeds.py: seed s owns generator seeds s * SEED_STRIDE + i, i < SEED_STRIDE), so the
    roles share no draw exactly when no seed serves two. Raises ValueError naming the two roles."""
    roles = {}
    for role, seed in ([(f"training seed {s}", s) for s in train_seeds] +
                       [(f"the held-out check of training seed {s}", s + HELD_OUT_SEED_OFFSET) for s in train_seeds] +
                       [("--selection-seed", selection_seed),
                        ("the held-out check of --selection-seed", selection_seed + HELD_OUT_SEED_OFFSET),
                        ("--sample-seed", sample_seed), ("--sample-seed + 1 (the fp2 cell)", sample_seed + 1)]):
        if seed in roles:
            raise ValueError(f"{role} and {roles[seed]} would draw the same trajectories or images (seed {seed}); "
                             f"choose seeds that keep training, selection, held-out checks and evaluation images apart")
        roles[seed] = role


def check_num_images(n):
    if n > SEED_STRIDE:
        raise ValueError(f"--num-images must be at most {SEED_STRIDE}: more would reach the next seed's draws")


def selection_mse(r, rule):
    """A search run's figure under a selection rule: the held-out eps MSE of both guidance halves ('both')
    or of the guided eps ('guided'); None where it diverged or was not measured by that rule."""
    return r["eps_mse"] if rule == "both" else r.get("eps_mse_guided")


def choose(tried, rule):
    """The multiplier of the lowest figure under the rule among the search runs tried (dicts with lr_mult);
    diverged runs are never chosen. None if no run has the figure."""
    finite = [r for r in tried if r is not None and selection_mse(r, rule) is not None]
    return min(finite, key=lambda r: selection_mse(r, rule))["lr_mult"] if finite else None


def extended(grid, choice, search, lr_extend):
    """The grid grown by one step past the edge that holds its choice (x 2 past the largest, / 2 past the
    smallest), at most lr_extend steps past the first grid `search` on each side; None when the choice has
    a tried neighbour on both sides (bracketed), or the limit is reached."""
    if len(grid) < 2:
        return None
    if choice == max(grid) < max(search) * 2 ** lr_extend:
        return sorted(grid) + [2 * max(grid)]
    if choice == min(grid) > min(search) / 2 ** lr_extend:
        return [min(grid) / 2] + sorted(grid)
    return None


def search(cells_widths, grid, lr_extend, rule, tried, run):
    """The learning-rate search. Every (cell, n) tries the multipliers of `grid`; round after round, a cell
    whose choice sits at an edge of its grid tries the next multiplier past it (extended), until every
    choice is bracketed or the limit is reached. tried(cell, n, mult): the kept search run (a dict with
    lr_mult and the eps MSEs) or None; run(jobs): runs the missing (cell, n, mult) jobs. Returns
    ({(cell, n): its grid}, {(cell, n): its choice})."""
    grids = {cn: sorted(grid) for cn in cells_widths}
    while True:
        run([(c, n, m) for (c, n), ms in grids.items() for m in ms if tried(c, n, m) is None])
        chosen, grown = {}, False
        for (c, n), ms in grids.items():
            chosen[c, n] = choose([tried(c, n, m) for m in ms], rule)
            if chosen[c, n] is None:
                raise ValueError(f"every multiplier of the search diverged for W{n} {c}, or was run before distill.py "
                                 f"reported the {rule} eps MSE; search lower ones, or delete those runs")
            if (bigger := extended(ms, chosen[c, n], grid, lr_extend)) is not None:
                grids[c, n], grown = bigger, True
        if not grown:
            return grids, chosen


def committed_choice(path, cell, n, iters, select_by=None):
    """(multiplier, rule) that a committed search file (w<n>a<m>_sweep.json) chose for this cell and width at
    this number of distill.py iterations, by select_by or, if None, the rule the file ran under ('both'
    where it does not say); (None, rule) where it has no finite run."""
    committed = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    rule = select_by or committed.get("select_by", "both")
    tried = [r for r in committed.get("search", {}).values() if (r["cell"], r["wbits"], r["iters"]) == (cell, n, iters)]
    return choose(tried, rule), rule


def same_images(kept, made):
    """Whether FP samples made again are the ones a kept fp run scored: their digests where both runs
    have one; for a run kept from before the digest, FID and sFID equal to 1e-8 relative. On the digits
    model's 1,000 FP samples, evaluate.py's own float noise (another thread count) moved FID by 6e-10
    relative, while one pixel moved by one step moved it by 2e-7: the tolerance admits the first and
    refuses the second."""
    if kept.get("images_sha256") and made.get("images_sha256"):
        return kept["images_sha256"] == made["images_sha256"]
    return all(abs(kept[k] - made[k]) <= 1e-8 * abs(kept[k]) for k in ("fid", "sfid"))


def in_seed_order(runs):
    """Runs in training-seed order: an interval must not depend on the order in which the runs finished
    (a resumed or parallel sweep stores them in any order)."""
    return sorted(runs, key=lambda r: r["train_seed"] or 0)


def chosen_runs(results, cell, n, iters=40):
    """A results file's reported runs of a cell at width n, in training-seed order, at the multiplier its
    search chose (PTQ: no multiplier; a folder without a search: the one multiplier its runs have)."""
    rs = [r for r in results["runs"].values() if r["cell"] == cell and r["wbits"] == n and r["iters"] in (None, iters)]
    if any(r["lr_mult"] for r in rs):
        mult = choose([r for r in results["search"].values() if (r["cell"], r["wbits"], r["iters"]) == (cell, n, iters)],
                      results.get("select_by", "both"))
        if mult is None and len({r["lr_mult"] for r in rs}) == 1:  # no search (reproduce.py --lr-mult): its one multiplier
            mult = rs[0]["lr_mult"]
        rs = [r for r in rs if r["lr_mult"] == mult]
    return in_seed_order(rs)


# ---- table cells
OLD_COUNT = "¹"  # marks bits per weight counted before models/core/bits.py: the low-bit layers' code bits only


def bits_cell(rs, n):
    """A row's bits per weight: the mean over its runs of the count quantize.py reported (models/core/bits.py),
    marked OLD_COUNT where a run reported the earlier count (or, before that, none: then n)."""
    old = any(r.get("bits_count", 1) < 2 for r in rs)
    return f"{statistics.mean(r.get('bits_per_weight', n) for r in rs):.2f}" + (OLD_COUNT if old else "")


def bits_note(runs):
    """The tables' sentence on what bits per weight counts."""
    note = ("bits / weight: what the UNet stores per conv/linear weight, every overhead counted (codes at each "
            "channel's width, full-precision and W8A8 layers, quantizer parameters, any branch: models/core/bits.py)")
    if any(r.get("wbits") and r.get("bits_count", 1) < 2 for r in runs):
        note += f"; {OLD_COUNT} runs made before that count show the low-bit layers' code bits (and branch) only"
    return note + "."


def fmt(v, f=".3f"):
    return "-" if v is None else format(v, f)


def mean_std(values, f=".3f", f_std=None):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], f)
    return f"{statistics.mean(values):{f}} ± {statistics.stdev(values):{f_std or f}}"
