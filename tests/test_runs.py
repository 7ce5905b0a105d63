"""The experiment driver's decisions (bench/runs.py), on small fixed results, without training: the
learning-rate search grows its grid past an edge choice and stops once the choice is bracketed, the
selection takes the rule's minimum, an interval does not depend on the order the runs finished in,
and seeds that would serve two roles are refused. The last test runs bench/reproduce.py on a fixed
results file to check that it makes these decisions through bench/runs.py."""
import json
import re

import numpy as np
import pytest

from bench import runs as R
from models.seeds import HELD_OUT_SEED_OFFSET
from tests.conftest import run_script


def search_run(mult, guided, both=None):
    return dict(lr_mult=mult, eps_mse_guided=guided, eps_mse=guided if both is None else both)


def test_selection_takes_the_rules_minimum_and_never_a_diverged_run():
    tried = [search_run(16, 0.30, both=0.10), search_run(32, 0.20, both=0.40), search_run(64, None, both=None),
             search_run(128, 0.25, both=0.05), None]
    assert R.choose(tried, "guided") == 32
    assert R.choose(tried, "both") == 128
    assert R.choose([search_run(8, None), None], "guided") is None


@pytest.mark.parametrize("grid, choice, bigger", [
    ([32, 64, 128], 128, [32, 64, 128, 256]),   # at the top edge: the next doubling
    ([32, 64, 128], 32, [16, 32, 64, 128]),     # at the bottom edge: the next halving
    ([32, 64, 128], 64, None),                  # bracketed: both neighbours tried
    ([32, 64, 128, 256, 512], 512, None),       # two doublings past [32, 64, 128]: the limit (lr_extend 2)
    ([8, 16, 32, 64, 128], 8, None),            # two halvings past it
    ([64], 64, None),                           # one multiplier: nothing to bracket
])
def test_edge_choice_gets_the_next_multiplier_and_a_bracketed_one_does_not(grid, choice, bigger):
    assert R.extended(grid, choice, [32, 64, 128], lr_extend=2) == bigger


def test_search_grows_until_every_choice_is_bracketed_and_runs_each_multiplier_once():
    figures = {  # guided eps MSE per (cell, multiplier): baseline's best is x256, mpqdm's x16, trd's x64
        "baseline": {32: 0.5, 64: 0.4, 128: 0.3, 256: 0.2, 512: 0.25},
        "mpqdm": {8: 0.6, 16: 0.1, 32: 0.2, 64: 0.3, 128: 0.4},
        "trd": {32: 0.3, 64: 0.1, 128: 0.2}}
    kept, calls = {}, []

    def tried(c, n, m):
        return kept.get((c, n, m))

    def run(jobs):
        calls.append(sorted(jobs))
        for c, n, m in jobs:
            assert (c, n, m) not in kept, "a run kept in the results was run again"
            kept[c, n, m] = search_run(m, figures[c][m])

    grids, chosen = R.search([(c, 2) for c in figures], [32, 64, 128], 3, "guided", tried, run)
    assert chosen == {("baseline", 2): 256, ("mpqdm", 2): 16, ("trd", 2): 64}
    assert grids == {("baseline", 2): [32, 64, 128, 256, 512], ("mpqdm", 2): [8, 16, 32, 64, 128],
                     ("trd", 2): [32, 64, 128]}
    assert [len(c) for c in calls] == [9, 2, 2]  # the grid, then one multiplier per edge cell per round
    # resumed with every run kept: nothing runs, the same choices
    calls.clear()
    assert R.search([(c, 2) for c in figures], [32, 64, 128], 3, "guided", tried, run)[1] == chosen
    assert calls and all(c == [] for c in calls)


def test_search_refuses_a_cell_whose_every_run_diverged():
    with pytest.raises(ValueError, match="every multiplier of the search diverged for W2 mpqdm"):
        R.search([("mpqdm", 2)], [32, 64], 1, "guided", lambda c, n, m: search_run(m, None), lambda jobs: None)


def paired_folder(tmp_path, order):
    """A folder with a cell and the baseline at seeds 0, 1, 2 (per-image figures of different means and
    spreads per seed), its runs listed in `order`."""
    rng = np.random.default_rng(0)
    folder = R.RunFolder(tmp_path)
    runs = {}
    for cell in ("baseline", "mpqdm"):
        for s in (0, 1, 2):
            f = tmp_path / f"{cell}_{s}.npz"
            np.savez(f, psnr=rng.normal(25 + 2 * s, 1 + s, 200), feature_distance=rng.normal(5 + s, 1, 200))
            runs[cell, s] = dict(cell=cell, train_seed=s, paired_file=f.name)
    return folder, [runs["mpqdm", s] for s in order], [runs["baseline", s] for s in order]


def test_runs_out_of_seed_order_give_the_same_intervals(tmp_path):
    folder, mine, base = paired_folder(tmp_path, [0, 1, 2])
    in_order = folder.paired_columns(mine, base)
    for order in ([2, 0, 1], [1, 2, 0]):
        folder, mine, base = paired_folder(tmp_path, order)
        assert folder.paired_columns(mine, base) == in_order
        assert [r["train_seed"] for r in R.in_seed_order(mine)] == [0, 1, 2]
    # the bootstrap draws seeds by position: taken in another order the same figures give other intervals,
    # which is what the ordering prevents
    from models.paired import format_interval, interval
    shuffled = [np.load(tmp_path / f"mpqdm_{s}.npz")["psnr"] for s in (2, 0, 1)]
    assert format_interval(interval(shuffled), ".2f") != in_order[0]


@pytest.mark.parametrize("train, selection, sample, roles", [
    ([0, 1, 99], 99, 1234, ("--selection-seed", "training seed 99")),
    ([0, 1, 2], 1 + HELD_OUT_SEED_OFFSET, 1234, ("--selection-seed", "held-out check of training seed 1")),
    ([0, 5], 99, 5 + HELD_OUT_SEED_OFFSET, ("--sample-seed", "held-out check of training seed 5")),
    ([0, 1235], 99, 1234, ("--sample-seed + 1", "training seed 1235")),
])
def test_overlapping_seed_roles_are_refused(train, selection, sample, roles):
    with pytest.raises(ValueError) as e:
        R.check_seed_roles(train, selection, sample)
    assert all(r in str(e.value) for r in roles) and "same trajectories or images" in str(e.value)


def test_default_seed_roles_are_apart():
    R.check_seed_roles([0, 1, 2], 99, 1234)  # raises if any two roles share a seed


def test_reproduce_makes_its_search_decisions_through_the_folder(tmp_path):
    """bench/reproduce.py --search-only on a folder whose results already hold the search: a choice at the
    grid's edge with a worse neighbour past it is bracketed; one at the edge of the extension limit gets a
    note; the table marks the rule's minimum."""
    out = tmp_path / "out"
    folder = R.RunFolder(out)
    figures = {"baseline": {32: 0.5, 64: 0.4, 128: 0.3, 256: 0.35}, "mpqdm": {32: 0.5, 64: 0.4, 128: 0.3, 256: 0.2}}
    search = {folder.key(c, 2, 99, m, 40): dict(cell=c, wbits=2, seed=99, lr_mult=m, iters=40, eps_mse=0.01,
                                                eps_mse_guided=g, seconds=1.0)
              for c, by_mult in figures.items() for m, g in by_mult.items()}
    folder.save_results(dict(format=R.RESULTS_FORMAT, runs={}, search=search, select_by="guided", model="digits"))
    proc = run_script("bench/reproduce.py", "--bits", 2, "--cells", "baseline,mpqdm", "--lr-search", "64,128",
                      "--lr-extend", 1, "--search-only", "--out", out)
    got = dict(re.findall(r"^W2A4 (\w+): LoRA lr x([\d.]+), chosen by this search", proc.stdout, re.M))
    assert got == {"baseline": "128", "mpqdm": "256"}
    assert "W2 mpqdm chose a multiplier at the edge" in proc.stdout  # x512 is past --lr-extend 1
    assert "W2 baseline chose" not in proc.stdout  # x256 was tried and is worse: bracketed
    assert "| W2A4 | MPQ-DM (OMQ + TRD) | 800 | 0.5000 | 0.4000 | 0.3000 | 0.2000* |" in proc.stdout
    assert json.loads((out / "results.json").read_text())["search"] == search  # nothing ran, nothing changed


def test_verdicts_read_each_model_at_its_own_choice_and_say_holds_flips_or_unresolved():
    """bench/verdicts.py on the committed digits results against themselves: each arm at its search's
    choice gives the committed table's paired interval, and a verdict resolved on both holds; the
    classification of two intervals by hand."""
    from bench import verdicts as V
    from tests.conftest import ROOT

    files = f"{ROOT}/bench/results/w2a4_sweep.json,{ROOT}/bench/results/w4a4_sweep.json"
    proc = run_script("bench/verdicts.py", "--a", f"digits={files}", "--b", f"again={files}",
                      "--tenth", "mpqdm_lam20", "mpqdm_lam20")
    table = (ROOT / "bench" / "results" / "yardstick.md").read_text()
    row = next(l for l in proc.stdout.splitlines() if "| W2A4 | MPQ-DM against the baseline" in l)
    assert "-0.82 [-0.97, -0.66]" in row and "-0.82 [-0.97, -0.66]" in table and row.endswith("| holds |")
    omq = next(l for l in proc.stdout.splitlines() if "| W2A4 | OMQ only against the baseline" in l)
    assert omq.endswith("| unresolved on both |")
    # the W4A4 baseline ran at x128 and x256: against its chosen x256, OMQ only is resolved ahead (x128: level)
    omq4 = next(l for l in proc.stdout.splitlines() if "| W4A4 | OMQ only against the baseline" in l)
    assert "+0.22 [+0.05, +0.38]" in omq4 and omq4.endswith("| holds |")
    up, down, level = (dict(mean=m, lo=lo, hi=hi) for m, lo, hi in ((0.5, 0.2, 0.8), (-0.4, -0.6, -0.1), (0.1, -0.2, 0.3)))
    assert V.verdict(up, up) == "holds" and V.verdict(up, down) == "flips"
    assert V.verdict(up, level) == "unresolved on the second" and V.verdict(level, down) == "unresolved on the first"
    assert V.verdict(up, level, names=("digits", "photos")) == "unresolved on photos"
    assert V.verdict(None, up) == "not run"


def test_budgeted_branch_cells_pass_their_budget_to_quantize(tmp_path):
    """baseline_bpwB, mpqdm_bpwB, ptq_bpwB: quantize.py --lowrank-budget B, the cell's distillation unchanged;
    two budgets never share a file."""
    folder = R.RunFolder(tmp_path, lowrank_init="svd")
    for c in ("baseline_bpw3.6", "mpqdm_bpw4", "ptq_bpw3.6"):
        assert folder.register(c), c
    variant, trd = folder.cells["baseline_bpw3.6"]
    assert folder.quant[variant] == ["--method", "uniform", "--lowrank-budget", "3.6", "--lowrank-init", "svd"] and trd == "off"
    assert folder.quant[folder.cells["mpqdm_bpw4"][0]][:2] == ["--method", "omq"] and folder.cells["mpqdm_bpw4"][1] == "on"
    assert folder.cells["ptq_bpw3.6"][1] is None
    assert folder.distill_path("baseline_bpw3.6", 2, 0, 32, 40) != folder.distill_path("baseline", 2, 0, 32, 40)
    assert folder.quant_path(folder.cells["ptq_bpw3.6"][0], 2, 0) == folder.quant_path(variant, 2, 0)  # PTQ is its start
    for bad in ("fp_bpw3", "baseline_bpw0", "trd_bpw3", "baseline_bpwx"):
        assert not folder.register(bad), bad


def test_a_branch_cell_can_name_its_start_and_keeps_its_own_files(tmp_path):
    """baseline_bpw3.6_svd in a LoftQ folder: quantize.py --lowrank-init svd, files apart from
    baseline_bpw3.6's; the suffix names no cell without a branch."""
    folder = R.RunFolder(tmp_path, lowrank_init="loftq")
    for c in ("baseline_bpw3.6_svd", "baseline_bpw3.6", "ptq_lr2_svd", "mpqdm_bpw4_loftq"):
        assert folder.register(c), c
    svd, loftq = folder.cells["baseline_bpw3.6_svd"][0], folder.cells["baseline_bpw3.6"][0]
    assert folder.quant[svd] == ["--method", "uniform", "--lowrank-budget", "3.6", "--lowrank-init", "svd"]
    assert folder.quant[loftq][-1] == "loftq" and folder.cells["baseline_bpw3.6_svd"][1] == "off"
    assert folder.quant_path(svd, 2, 0) != folder.quant_path(loftq, 2, 0)
    assert folder.distill_path("baseline_bpw3.6_svd", 2, 0, 32, 40) != folder.distill_path("baseline_bpw3.6", 2, 0, 32, 40)
    assert folder.quant[folder.cells["ptq_lr2_svd"][0]] == ["--method", "uniform", "--lowrank", "2", "--lowrank-init", "svd"]
    assert "SVD-started" in folder.names["baseline_bpw3.6_svd"]
    for bad in ("baseline_svd", "mpqdm_lam20_svd", "fp_svd", "baseline_bpw3.6_qr"):
        assert not folder.register(bad), bad
