"""The bits-per-weight frontier (bench/frontier.py) and starting a folder from committed results
(bench/reproduce.py --start-from), on small fixed results, without training."""
import json

import numpy as np
import pytest
from PIL import Image

from bench import frontier as F
from bench import runs as R
from tests.conftest import run_script

IMAGES = 50


def add_run(folder, results, cell, n, seed, mult, psnr, bits=None, count=2, eps_mse=0.1):
    """A scored run whose images all lie `psnr` dB from the FP ones, plus a little noise common to every run
    (so that a paired difference is exactly the difference of the offsets)."""
    noise = np.random.default_rng(seed).normal(0, 0.5, IMAGES)
    key = folder.key(cell, n, seed, mult, 40) if folder.cells[cell][1] else folder.key(cell, n, seed)
    f = folder.out / "paired" / (key.replace(" ", "_") + ".npz")
    f.parent.mkdir(parents=True, exist_ok=True)
    np.savez(f, psnr=psnr + noise, feature_distance=np.ones(IMAGES))
    run = dict(cell=cell, wbits=n, abits=4, train_seed=seed, lr_mult=mult, iters=40 if mult else None,
               paired_file=str(f.relative_to(folder.out)), eps_mse=eps_mse, bits_count=count)
    if count >= 2:
        run["bits_per_weight"] = bits
    results["runs"][key] = run


def frontier_folder(tmp_path):
    """Digits-like results: PTQ and the baseline at W2 and W3 (the baseline searched at x32 and x64, its
    search choosing x64), OMQ only at W2 counted before models/core/bits.py, and a budgeted branch at W2."""
    folder = R.RunFolder(tmp_path / "out")
    for c in ("omq", "baseline_bpw3.6"):
        folder.register(c)
    results = dict(format=R.RESULTS_FORMAT, runs={}, search={}, select_by="guided", model="digits")
    for m, g in ((32, 0.2), (64, 0.1)):
        results["search"][folder.key("baseline", 2, 99, m, 40)] = dict(cell="baseline", wbits=2, seed=99, lr_mult=m,
                                                                      iters=40, eps_mse=g, eps_mse_guided=g)
    for s in (0, 1, 2):
        add_run(folder, results, "ptq", 2, s, None, 17.0, bits=3.34)
        add_run(folder, results, "ptq", 3, s, None, 24.0, bits=4.29)
        add_run(folder, results, "baseline", 2, s, 64, 26.5, bits=3.34)
        add_run(folder, results, "baseline", 2, s, 32, 20.0, bits=3.34)  # not the search's choice: never shown
        add_run(folder, results, "baseline", 3, s, 128, 29.5, bits=4.29)
        add_run(folder, results, "omq", 2, s, 64, 26.6, count=1)
        add_run(folder, results, "baseline_bpw3.6", 2, s, 64, 28.0, bits=3.6)
    folder.save_results(results)
    return folder, results


def rows(stdout):
    return [line for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("| method")]


def test_frontier_puts_each_arm_at_its_choice_and_its_stored_bits(tmp_path):
    folder, results = frontier_folder(tmp_path)
    with pytest.raises(SystemExit, match="W2 omq: runs counted before models/core/bits.py; run with --recount"):
        F.main(["--results", str(folder.results_path)])
    (folder.out / "recount.json").write_text(json.dumps(
        {f"w2a4_omq_s{s}": dict(bits_per_weight=3.40 + s / 100) for s in (0, 1, 2)}))
    proc = run_script("bench/frontier.py", "--results", folder.results_path, "--plot", tmp_path / "f.png")
    table = rows(proc.stdout)
    baseline = [r for r in table if r.startswith("| EfficientDM-style baseline | ")]
    assert [r.split(" | ")[1:5] for r in baseline] == [["W2A4", "-", "3.34", "64"], ["W3A4", "-", "4.29", "128"]]
    assert abs(float(baseline[0].split(" | ")[6].split()[0]) - 26.5) < 0.3  # the x64 runs, not the x32 ones (20 dB)
    assert any(r.startswith("| OMQ only | W2A4 | - | 3.41 | 64 |") for r in table)  # the recount's mean over seeds
    budget = [r for r in table if "branches by budget on W2 codes (loftq)" in r]
    assert [r.split(" | ")[2:4] for r in budget] == [["-", "3.34"], ["budget 3.6", "3.60"]]  # from the baseline
    starred = {r.split(" | ")[0][2:] + " " + r.split(" | ")[1] + " " + r.split(" | ")[2] for r in table if r.endswith("★ |")}
    line = "EfficientDM-style baseline + branches by budget on W2 codes (loftq) W2A4"
    assert starred == {"EfficientDM-style baseline W2A4 -", "OMQ only W2A4 -", "EfficientDM-style baseline W3A4 -",
                       line + " -", line + " budget 3.6"}  # not PTQ: the baseline is closer at the same bits
    goal = [r for r in table if r.startswith("| W2A4 EfficientDM-style baseline + branches within 3.6")]
    assert len(goal) == 1  # within the W3A4 baseline's bits; 3.60 > 3.34 + 0.25, so not in the W2A4 row
    assert "W3A4 baseline (no more bits than) | 4.29 | -1.50 [-1.50, -1.50] |" in goal[0]  # 28.0 - 29.5, image by image
    assert Image.open(tmp_path / "f.png").size == (900, 520)


def test_frontier_refuses_what_is_not_a_results_file(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps(dict(runs={})))
    with pytest.raises(SystemExit):
        F.main(["--results", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        F.main(["--results", str(tmp_path / "missing.json")])


def test_recount_quantizes_each_old_run_once_with_its_flags_and_seed(tmp_path, monkeypatch, capsys):
    folder, results = frontier_folder(tmp_path)
    add_run(folder, results, "ptq", 4, 0, None, 27.0, count=1, eps_mse=0.05)
    add_run(folder, results, "baseline", 4, 0, 64, 30.0, count=1, eps_mse=0.01)  # the same quantized model, distilled
    calls = []

    def quantize(cmd, **kw):  # stands in for quantize.py: writes its report
        calls.append(cmd)
        out = cmd[cmd.index("--out") + 1]
        bits = 3.4 if "omq" in cmd else 5.25
        open(out[:-3] + ".json", "w").write(json.dumps(dict(bits_per_weight=bits, bits_count=2, eps_mse=0.05, seconds=1)))
        open(out, "w").write("")
        return type("P", (), dict(returncode=0, stderr=""))()

    monkeypatch.setattr(F.subprocess, "run", quantize)
    store = {}
    F.recount(folder, results, "digits", store)
    assert "recount w4a4_uniform_s0: eps MSE 0.05000 now, 0.05000 recorded" in capsys.readouterr().out
    assert sorted(store) == ["w2a4_omq_s0", "w2a4_omq_s1", "w2a4_omq_s2", "w4a4_uniform_s0"]
    omq1 = next(c for c in calls if "1" == c[c.index("--seed") + 1] and "omq" in c)
    assert omq1[omq1.index("--wbits") + 1] == "2" and omq1[omq1.index("--method") + 1] == "omq"
    assert omq1[omq1.index("--ckpt") + 1] == R.MODEL_CHECKPOINTS["digits"]
    assert json.loads((folder.out / "recount.json").read_text()) == store
    assert not list((folder.out / "recount").iterdir())  # the requantized models are not kept
    calls.clear()
    F.recount(folder, results, "digits", store)  # resumed: nothing left to run
    assert calls == []


def committed_like(tmp_path, name, runs, **extra):
    folder = R.RunFolder(tmp_path / name)
    results = dict(format=R.RESULTS_FORMAT, runs={}, search={}, select_by="guided", lowrank_init="loftq", **extra)
    for cell, n, s in runs:
        add_run(folder, results, cell, n, s, 64 if cell != "ptq" else None, 26.0, bits=3.34)
    folder.save_results(results)
    return folder.results_path


def test_start_from_copies_runs_and_their_per_image_files_and_refuses_a_mismatch(tmp_path):
    w2 = committed_like(tmp_path, "a", [("baseline", 2, 0), ("ptq", 2, 0)])
    w3 = committed_like(tmp_path, "b", [("baseline", 3, 0)])
    out = tmp_path / "out"
    run_script("bench/reproduce.py", "--start-from", f"{w2},{w3}", "--bits", 2, "--cells", "baseline",
               "--lr-mult", 64, "--plan", "--out", out)
    got = json.loads((out / "results.json").read_text())
    expected = {**json.loads(w2.read_text())["runs"], **json.loads(w3.read_text())["runs"]}
    assert got["runs"] == expected and got["select_by"] == "guided"
    folder = R.RunFolder(out)
    assert all(np.array_equal(folder.per_image(r, "psnr"), R.RunFolder(tmp_path / ("a" if r["wbits"] == 2 else "b"))
                              .per_image(r, "psnr")) for r in expected.values())
    refusals = {"already holds runs": [w2], "runs of the photos model": [committed_like(tmp_path, "p", [], model="photos")]}
    clash = committed_like(tmp_path, "c", [("baseline", 2, 0)])
    data = json.loads(clash.read_text())
    next(iter(data["runs"].values()))["psnr_vs_fp"] = 1.0
    clash.write_text(json.dumps(data))
    refusals["differ on W2A4 baseline seed0 x64 it40"] = [w2, clash]
    gone = committed_like(tmp_path, "g", [("ptq", 2, 1)])
    (tmp_path / "g" / "paired" / "W2A4_ptq_seed1.npz").unlink()
    refusals["is missing"] = [gone]
    for message, files in refusals.items():
        target = out if message == "already holds runs" else tmp_path / f"new_{len(message)}"
        proc = run_script("bench/reproduce.py", "--start-from", ",".join(map(str, files)), "--bits", 2,
                          "--cells", "baseline", "--lr-mult", 64, "--plan", "--out", target, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (message, proc.stderr)


def test_fp_samples_made_again_must_be_those_the_kept_runs_were_paired_with(tmp_path):
    """A folder started from results has no FP samples: reproduce.py makes them again, and stops if they are
    not the ones the kept runs were scored against (then new runs would pair with other images)."""
    first, again = tmp_path / "first", tmp_path / "again"
    run_script("bench/reproduce.py", "--bits", 2, "--cells", "fp", "--num-images", 4, "--out", first)
    again.mkdir()
    (again / "results.json").write_text((first / "results.json").read_text())
    run_script("bench/reproduce.py", "--bits", 2, "--cells", "fp", "--num-images", 4, "--out", again)  # the same images
    data = json.loads((first / "results.json").read_text())
    assert len(data["runs"]["fp"]["images_sha256"]) == 64  # kept beside the run: later checks are exact
    for name, change in (("digest", lambda fp: fp.update(images_sha256="0" * 64)),
                         ("fid", lambda fp: (fp.pop("images_sha256"), fp.update(fid=fp["fid"] * (1 + 1e-7))))):
        other = tmp_path / name
        other.mkdir()
        kept = json.loads(json.dumps(data))
        change(kept["runs"]["fp"])
        (other / "results.json").write_text(json.dumps(kept))
        proc = run_script("bench/reproduce.py", "--bits", 2, "--cells", "fp", "--num-images", 4, "--out", other, check=False)
        assert proc.returncode == 1 and "not those the kept runs were scored against" in proc.stderr, name
    again = run_script("bench/reproduce.py", "--bits", 2, "--cells", "fp", "--num-images", 4, "--out", other, check=False)
    assert again.returncode == 1  # a rerun checks again: the refused samples were not kept


def test_same_images_takes_digests_first_and_float_noise_in_fid_only_without_them():
    kept = dict(fid=28.30737545277225, sfid=0.9585905002925017)
    assert R.same_images(kept, dict(fid=28.30737545251941, sfid=0.9585905002947896))  # metric noise: 1e-11 relative
    assert not R.same_images(kept, dict(fid=28.30736982934468, sfid=0.9585912744950633))  # one pixel one step off
    assert not R.same_images(dict(kept, images_sha256="a"), dict(kept, images_sha256="b"))  # same FID, other digest
    assert R.same_images(dict(kept, images_sha256="a"), dict(fid=1.0, sfid=1.0, images_sha256="a"))


def test_export_writes_one_file_per_width_that_a_new_folder_starts_from(tmp_path):
    folder, results = frontier_folder(tmp_path)
    to = tmp_path / "committed"
    run_script("bench/export_results.py", "--out", folder.out, "--to", to)
    w2, w3 = (json.loads((to / f"w{n}a4_sweep.json").read_text()) for n in (2, 3))
    assert {r["wbits"] for r in w2["runs"].values()} == {2} and {r["wbits"] for r in w3["runs"].values()} == {3}
    assert len(w2["runs"]) + len(w3["runs"]) == len(results["runs"]) and len(w2["search"]) == 2 and not w3["search"]
    assert w2["model"] == "digits" and w2["select_by"] == "guided"
    committed = R.RunFolder(to)
    for k, r in results["runs"].items():
        mine = (w2 if r["wbits"] == 2 else w3)["runs"][k]
        assert mine["paired_file"].startswith("yardstick_paired/")
        assert np.array_equal(committed.per_image(mine, "psnr"), folder.per_image(r, "psnr"))
    proc = run_script("bench/export_results.py", "--out", folder.out, "--to", to, check=False)
    assert proc.returncode == 2 and "already committed" in proc.stderr
    (folder.out / "results.md").write_text("tables")
    (to / "yardstick.md").write_text("committed tables")
    run_script("bench/export_results.py", "--out", folder.out, "--to", to, "--force", "--no-tables")
    assert (to / "yardstick.md").read_text() == "committed tables"
    run_script("bench/export_results.py", "--out", folder.out, "--to", to, "--force")
    assert (to / "yardstick.md").read_text() == "tables"
    out = tmp_path / "again"
    run_script("bench/reproduce.py", "--start-from", f"{to / 'w2a4_sweep.json'},{to / 'w3a4_sweep.json'}", "--bits", 2,
               "--cells", "baseline", "--plan", "--out", out)
    assert json.loads((out / "results.json").read_text())["runs"].keys() == results["runs"].keys()
