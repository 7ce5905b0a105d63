"""bench/reproduce.py runs each distilled cell at the learning-rate multiplier the committed search
chose for it, and at x1 with a note where no search was committed."""
import json
import re

from tests.conftest import ROOT, run_script

COMMITTED = ROOT / "bench" / "results" / "w2a4_sweep.json"


def plan(tmp_path, *flags):
    out = run_script("bench/reproduce.py", "--plan", "--out", tmp_path / "out", *flags).stdout
    return {m[0]: (float(m[1]), m[2]) for m in re.findall(r"^W\d+A\d+ (\w+): LoRA lr x([\d.]+), (.*)$", out, re.M)}


def lowest_eps_mse(search, cell, wbits=2, iters=40):
    runs = [r for r in search.values() if (r["cell"], r["wbits"], r["iters"]) == (cell, wbits, iters)
            and r["eps_mse"] is not None]
    return min(runs, key=lambda r: r["eps_mse"])["lr_mult"]


def test_default_multiplier_is_the_committed_choice(tmp_path):
    search = json.loads(COMMITTED.read_text())["search"]
    cells = ["baseline", "omq", "trd", "mpqdm", "random"]
    got = plan(tmp_path, "--bits", 2, "--cells", ",".join(["fp", *cells]))
    assert set(got) == set(cells)  # fp is not distilled
    for c in cells:
        assert got[c] == (lowest_eps_mse(search, c),
                          "chosen by the committed search (bench/results/w2a4_sweep.json, both eps MSE)")
    assert got["baseline"][0] != got["mpqdm"][0]  # per cell, not one multiplier for all


def test_multiplier_is_read_from_the_committed_file(tmp_path):
    """Another committed search gives other multipliers: nothing is typed into the code."""
    committed = tmp_path / "committed"
    committed.mkdir()
    search = {f"k{i}": dict(cell=c, wbits=2, seed=99, lr_mult=m, iters=40, eps_mse=e, eps_mse_guided=g)
              for i, (c, m, e, g) in enumerate([("baseline", 2, 0.02, 0.001), ("baseline", 4, 0.01, 0.002),
                                                ("baseline", 8, None, None), ("mpqdm", 2, 0.005, 0.004),
                                                ("mpqdm", 4, 0.03, 0.003)])}
    (committed / "w2a4_sweep.json").write_text(json.dumps(dict(format=2, runs={}, search=search)))
    got = plan(tmp_path, "--bits", 2, "--cells", "baseline,mpqdm,trd", "--committed", committed)
    assert got["baseline"][0] == 4 and got["mpqdm"][0] == 2  # a diverged run (None) is never chosen
    assert got["trd"][0] == 1 and "official rule x1: no committed search for W2A4 trd" in got["trd"][1]
    # --select-by guided: the same rule on the guided eps's error picks the other multipliers
    got = plan(tmp_path, "--bits", 2, "--cells", "baseline,mpqdm", "--committed", committed, "--select-by", "guided")
    assert got["baseline"][0] == 2 and got["mpqdm"][0] == 4 and "guided eps MSE" in got["mpqdm"][1]
    # a committed search that says it ran under the guided rule is read by that rule
    (committed / "w2a4_sweep.json").write_text(json.dumps(dict(format=2, runs={}, search=search, select_by="guided")))
    got = plan(tmp_path, "--bits", 2, "--cells", "baseline,mpqdm", "--committed", committed)
    assert got["baseline"][0] == 2 and got["mpqdm"][0] == 4
    (committed / "w2a4_sweep.json").write_text(json.dumps(dict(format=2, runs={}, search=search)))
    # the search's number of updates must be the run's
    got = plan(tmp_path, "--bits", 2, "--cells", "baseline", "--committed", committed, "--distill-iters", 10)
    assert got["baseline"][0] == 1 and "at 200 updates" in got["baseline"][1]


def test_no_committed_choice_runs_x1_with_a_note(tmp_path):
    got = plan(tmp_path, "--bits", 3, "--cells", "baseline,mpqdm", "--committed", tmp_path / "nothing")
    for c in ("baseline", "mpqdm"):
        assert got[c][0] == 1 and "official rule x1: no committed search for W3A4" in got[c][1]
    got = plan(tmp_path, "--bits", 2, "--cells", "mpqdm", "--select-by", "guided")  # the W2A4 search predates it
    assert got["mpqdm"][0] == 1 and "by the guided eps MSE" in got["mpqdm"][1]
    got = plan(tmp_path, "--bits", 2, "--cells", "mpqdm", "--lr-mult", 4)
    assert got["mpqdm"] == (4, "--lr-mult")


def test_lowrank_cells_carry_their_rank(tmp_path):
    """baseline_lrR, mpqdm_lrR, ptq_lrR: the cell's rank is in its name (runs of two ranks never share a key)."""
    got = plan(tmp_path, "--bits", 2, "--cells", "fp,ptq_lr2,baseline_lr2,mpqdm_lr8", "--lr-mult", 4)
    assert got == {"baseline_lr2": (4, "--lr-mult"), "mpqdm_lr8": (4, "--lr-mult")}  # ptq_lr2: not distilled
    for bad in ("baseline_lr0", "fp_lr2", "trd_lr2"):
        proc = run_script("bench/reproduce.py", "--plan", "--cells", bad, "--out", tmp_path / "out", check=False)
        assert proc.returncode == 2 and "unknown cells" in proc.stderr, bad
