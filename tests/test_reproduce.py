"""bench/reproduce.py runs each distilled cell at the learning-rate multiplier the committed search
chose for it, and at x1 with a note where no search was committed."""
import json
import re

from tests.conftest import ROOT, run_script

COMMITTED = ROOT / "bench" / "results" / "w2a4_sweep.json"


def plan(tmp_path, *flags):
    out = run_script("bench/reproduce.py", "--plan", "--out", tmp_path / "out", *flags).stdout
    return {m[0]: (float(m[1]), m[2]) for m in re.findall(r"^W\d+A\d+ ([\w.]+): LoRA lr x([\d.]+), (.*)$", out, re.M)}


def lowest_eps_mse(search, cell, wbits=2, iters=40, rule="both"):
    key = "eps_mse" if rule == "both" else "eps_mse_guided"
    runs = [r for r in search.values() if (r["cell"], r["wbits"], r["iters"]) == (cell, wbits, iters)
            and r[key] is not None]
    return min(runs, key=lambda r: r[key])["lr_mult"]


def test_default_multiplier_is_the_committed_choice(tmp_path):
    """By the rule the committed search ran under (its file says which), per cell."""
    committed = json.loads(COMMITTED.read_text())
    search, rule = committed["search"], committed.get("select_by", "both")
    cells = sorted({r["cell"] for r in search.values()})
    got = plan(tmp_path, "--bits", 2, "--cells", ",".join(["fp", *cells]))
    assert set(got) == set(cells)  # fp is not distilled
    for c in cells:
        assert got[c] == (lowest_eps_mse(search, c, rule=rule),
                          f"chosen by the committed search (bench/results/w2a4_sweep.json, {rule} eps MSE)")
    assert len({m for m, _ in got.values()}) > 1  # per cell, not one multiplier for all
    # the other rule on the same file picks by the other figure
    other = "both" if rule == "guided" else "guided"
    got = plan(tmp_path, "--bits", 2, "--cells", ",".join(cells), "--select-by", other)
    assert all(got[c][0] == lowest_eps_mse(search, c, rule=other) for c in cells)
    assert any(lowest_eps_mse(search, c, rule=other) != lowest_eps_mse(search, c, rule=rule) for c in cells)


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
    got = plan(tmp_path, "--bits", 2, "--cells", "mpqdm_lr8")  # the committed W2A4 search did not run this cell
    assert got["mpqdm_lr8"][0] == 1 and "no committed search for W2A4 mpqdm_lr8" in got["mpqdm_lr8"][1]
    got = plan(tmp_path, "--bits", 2, "--cells", "mpqdm", "--lr-mult", 4)
    assert got["mpqdm"] == (4, "--lr-mult")


def test_lowrank_cells_carry_their_rank(tmp_path):
    """baseline_lrR, mpqdm_lrR, ptq_lrR: the cell's rank is in its name (runs of two ranks never share a key)."""
    got = plan(tmp_path, "--bits", 2, "--cells", "fp,ptq_lr2,baseline_lr2,mpqdm_lr8", "--lr-mult", 4)
    assert got == {"baseline_lr2": (4, "--lr-mult"), "mpqdm_lr8": (4, "--lr-mult")}  # ptq_lr2: not distilled
    for bad in ("baseline_lr0", "fp_lr2", "trd_lr2"):
        proc = run_script("bench/reproduce.py", "--plan", "--cells", bad, "--out", tmp_path / "out", check=False)
        assert proc.returncode == 2 and "unknown cells" in proc.stderr, bad


def test_relation_weight_cells_pass_their_weight(tmp_path):
    """trd_lamL, mpqdm_lamL: distill.py runs with --lam L (the plain TRD cells with the official auto weight)."""
    out = run_script("bench/reproduce.py", "--plan", "--out", tmp_path / "out", "--bits", 2, "--lr-mult", 4,
                     "--cells", "baseline,trd,mpqdm_lam20,trd_lam2.5").stdout
    flags = dict(re.findall(r"^W2A4 (\w+(?:\.\d+)?): .*\n    distill\.py (.*)$", out, re.M))
    assert flags == {"baseline": "--trd off", "trd": "--trd on", "mpqdm_lam20": "--trd on --lam 20",
                     "trd_lam2.5": "--trd on --lam 2.5"}
    for bad in ("baseline_lam20", "mpqdm_lam0", "mpqdm_lam-1", "trd_lamx"):
        proc = run_script("bench/reproduce.py", "--plan", "--cells", bad, "--out", tmp_path / "out", check=False)
        assert proc.returncode == 2 and "unknown cells" in proc.stderr, bad


def test_plan_with_a_search_runs_nothing(tmp_path):
    """--plan --lr-search prints the grid to search instead of running the search (it once ran it whole)."""
    out = tmp_path / "out"
    proc = run_script("bench/reproduce.py", "--plan", "--bits", 2, "--cells", "baseline,mpqdm_lam20",
                      "--lr-search", "2,4", "--out", out)
    assert "W2A4 baseline: LoRA lr searched over x2, x4 on seed 99" in proc.stdout
    assert "W2A4 mpqdm_lam20: LoRA lr searched over x2, x4" in proc.stdout and "--trd on --lam 20" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == []  # no quantized model, log or results file


def test_photo_model_reads_its_own_searches_and_never_shares_an_out_with_digits(tmp_path):
    """--model photos: the committed digits searches are not the photo model's (x1 with a note until its
    own folder holds one), and an --out holding one model's runs refuses the other model."""
    got = plan(tmp_path, "--model", "photos", "--bits", 2, "--cells", "baseline,mpqdm")
    for c in ("baseline", "mpqdm"):
        assert "bench/results/photos/w2a4_sweep.json" in got[c][1]  # its own folder, searched or not
    got = plan(tmp_path, "--model", "photos", "--bits", 5, "--cells", "baseline")  # a width nothing searched
    assert got["baseline"][0] == 1 and "no committed search for W5A4" in got["baseline"][1]
    out = tmp_path / "digits_out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(dict(format=2, runs={"fp": dict(cell="fp")}, search={})))
    proc = run_script("bench/reproduce.py", "--plan", "--model", "photos", "--cells", "fp", "--out", out, check=False)
    assert proc.returncode == 2 and "holds runs of the digits model" in proc.stderr
