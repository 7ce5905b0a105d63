"""Bad input never costs work or data: a sweep of careless commands across the scripts, each with the
exit code and the one-line message it must end with. No case may end in a traceback.

The cases run in one helper process (the scripts are run as __main__ with runpy, torch imported
once), so the sweep takes seconds; Ctrl-C is tested on a real process."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.conftest import QUICK, ROOT, kill_when

HELPER = r"""
import contextlib, io, json, os, runpy, sys, traceback, warnings
root, cases_path, results_path = sys.argv[1:4]
sys.path.insert(0, root)
results = []
for case in json.load(open(cases_path)):
    out, err = io.StringIO(), io.StringIO()
    rc, tb = 0, None
    os.chdir(case.get("cwd") or root)
    sys.argv = [case["script"], *case["args"]]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("always")
            runpy.run_path(os.path.join(root, case["script"]), run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, str):
            rc = 1
            err.write(e.code)
        else:
            rc = e.code or 0
    except BaseException:
        rc, tb = "traceback", traceback.format_exc()
    results.append(dict(rc=rc, stdout=out.getvalue()[-3000:], stderr=err.getvalue()[-3000:], traceback=tb))
json.dump(results, open(results_path, "w"))
"""

QUICK_DISTILL = ["--iters", 2, "--batch-size", 2, "--eval-samples", 2, "--lora-rank", 2]


def killed_distill_state(qckpt, out):
    """A distill.py run killed after its first resumable checkpoint: its state file, no output."""
    state = out.with_name(out.name + ".state.pt")
    proc = subprocess.Popen([sys.executable, "distill.py", "--qckpt", str(qckpt), "--out", str(out),
                             *map(str, QUICK_DISTILL), "--ckpt-every", "1"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, state.exists)
    assert state.exists() and not out.exists()
    return state


@pytest.fixture(scope="module")
def sweep(fp_ckpt, quant_ckpts, tmp_path_factory):
    """Runs every case; returns [(case, result)]."""
    tmp = tmp_path_factory.mktemp("bad")
    q = quant_ckpts["omq"]
    a_file = tmp / "a_file"
    a_file.write_text("not a folder")
    existing = tmp / "existing.pt"
    existing.write_bytes(b"keep me")
    # a distill state of one run, then its input replaced by another quantization
    resumed = tmp / "resumed.pt"
    killed_distill_state(q, resumed)
    q_copy = tmp / "q_copy.pt"
    q_copy.write_bytes(q.read_bytes())
    replaced_out = tmp / "replaced.pt"
    killed_distill_state(q_copy, replaced_out)
    q_copy.write_bytes(quant_ckpts["uniform"].read_bytes())
    # an earlier sampling run in a folder
    earlier = tmp / "earlier"
    (earlier / "images").mkdir(parents=True)
    for i in range(16):
        (earlier / "images" / f"{i:06d}.png").write_bytes(b"")
    # a quantized checkpoint with a NaN weight
    nan_ckpt = tmp / "nan.pt"
    ckpt = torch.load(q, weights_only=False)
    key = next(k for k in ckpt["unet_state_dict"] if k.endswith("layer.weight"))
    ckpt["unet_state_dict"][key] = ckpt["unet_state_dict"][key].clone().fill_(float("nan"))
    torch.save(ckpt, nan_ckpt)
    # a quantized checkpoint whose per-step parameters belong to another schedule (an older version's 7 steps)
    other_steps = tmp / "other_steps.pt"
    ckpt = torch.load(q, weights_only=False)
    key = next(k for k in ckpt["unet_state_dict"] if k.endswith("a_scale"))
    ckpt["unet_state_dict"][key] = torch.ones(7)
    torch.save(ckpt, other_steps)
    # evaluate inputs
    rng = np.random.default_rng(0)
    digits = lambda n: rng.integers(0, 255, (n, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp / "one.npz", arr_0=digits(1))
    np.savez(tmp / "three.npz", arr_0=digits(3))
    np.savez(tmp / "ok.npz", arr_0=digits(40))
    (tmp / "truncated.npz").write_bytes((tmp / "ok.npz").read_bytes()[:300])
    np.savez(tmp / "objects.npz", arr_0=np.array([digits(2), "x"], dtype=object))
    train_dir = tmp / "train"
    train_dir.mkdir()

    Q = ["quantize.py", "--ckpt", fp_ckpt, *QUICK]
    D = ["distill.py", "--qckpt", q, *QUICK_DISTILL]
    S = ["sample.py", "--ckpt", fp_ckpt, "--num-images", 2]
    E = ["evaluate.py", tmp / "ok.npz"]
    T = ["train.py", "--net", "classifier", "--run-dir", train_dir / "run"]
    out = lambda name: ["--out", tmp / name]
    cases = [
        # quantize.py
        (Q + ["--device", "tpu", *out("q1.pt")], 2, "--device"),
        (Q + ["--steps", 0, *out("q1.pt")], 2, "must be 1 or more"),
        (Q + ["--steps", 1000000, *out("q1.pt")], 2, "DDIM steps must be in 1..1000"),
        (Q + ["--steps", 3, *out("q1.pt")], 2, "past the last timestep"),
        (Q + ["--batch-size", 0, *out("q1.pt")], 2, "must be 1 or more"),
        (Q + ["--eval-samples", 0, *out("q1.pt")], 2, "must be 1 or more"),
        (Q + ["--calib-mem-gb", -1, *out("q1.pt")], 2, "must be positive"),
        (Q + ["--group-frac", 0, *out("q1.pt")], 2, "must be positive"),
        (Q + ["--group-frac", 0.7, *out("q1.pt")], 2, "--group-frac must be in (0, 0.5]"),
        (Q + ["--wbits", 1, *out("q1.pt")], 2, "n = 1 would leave 0 bits"),
        (Q + ["--abits", 9, *out("q1.pt")], 2, "--abits must be 2..8"),
        (Q + ["--method", "kurtosis", *out("q1.pt")], 2, "unknown --method 'kurtosis'"),
        (Q + ["--guidance", "nan", *out("q1.pt")], 2, "not a finite number"),
        (Q + ["--eta", "nan", *out("q1.pt")], 2, "not a finite number"),
        (Q + ["--config", "lsun_beds256", *out("q1.pt")], 2, "drop --config"),
        (Q + ["--config", "nosuch", *out("q1.pt")], 2, "drop --config"),
        (Q + ["--out", existing], 2, "exists; pass --force"),
        (Q + ["--out", a_file / "q.pt"], 2, "cannot create the folder"),
        (Q + ["--out", fp_ckpt], 2, "is also an input"),
        (["quantize.py", "--ckpt", tmp / "none.pt", *out("q1.pt")], 2, "no checkpoint at"),
        (["quantize.py", "--ckpt", a_file, *out("q1.pt")], 2, "not a readable torch checkpoint"),
        # distill.py
        (D + ["--temperature", 0, *out("d.pt")], 2, "must be positive"),
        (D + ["--guidance", "nan", *out("d.pt")], 2, "not a finite number"),
        (D + ["--lam", "abc", *out("d.pt")], 2, "not a number"),
        (D + ["--trd-every", "epoch", *out("d.pt")], 2, "invalid choice: 'epoch'"),
        (D + ["--mse-target", "cond", *out("d.pt")], 2, "invalid choice: 'cond'"),
        (D + ["--lr-lora", "abc", *out("d.pt")], 2, "not a number"),
        (D + ["--feature-block", 99, *out("d.pt")], 2, "output blocks"),
        (D + ["--eval-samples", 0, *out("d.pt")], 2, "must be 1 or more"),
        (D + ["--ckpt-every", 0, *out("d.pt")], 2, "must be 1 or more"),
        (D + ["--device", "cuda:7", *out("d.pt")], 2, "--device"),
        (D + ["--out", q], 2, "is also an input"),
        (D + ["--out", existing], 2, "exists; pass --force"),
        (D + ["--resume", *out("d.pt")], 2, "no training state"),
        (["distill.py", "--qckpt", tmp / "none.pt", *out("d.pt")], 2, "run quantize.py first"),
        (["distill.py", "--qckpt", fp_ckpt, *out("d.pt")], 2, "expected mpq-dm/quantized"),
        (D + ["--seed", 1, "--out", resumed, "--resume"], 2, "--seed 0 (now 1)"),
        (D + ["--lr-act", 1e-3, "--out", resumed, "--resume"], 2, "--lr-act"),
        (D + ["--batch-size", 3, "--out", resumed, "--resume"], 2, "--batch-size 2 (now 3)"),
        (D + ["--iters", 5, "--out", resumed, "--resume"], 2, "--iters 2 (now 5)"),
        (D + ["--lora-rank", 4, "--out", resumed, "--resume"], 2, "--lora-rank 2 (now 4)"),
        (["distill.py", "--qckpt", q_copy, *QUICK_DISTILL, "--out", replaced_out, "--resume"], 2,
         "the --qckpt file (it changed since)"),
        (["distill.py", "--qckpt", nan_ckpt, *QUICK_DISTILL, *out("blown.pt")], 1, "the loss is nan at iteration 1, step 1"),
        # sample.py
        (S + ["--guidance", "nan", *out("s")], 2, "not a finite number"),
        (S + ["--eta", "nan", *out("s")], 2, "not a finite number"),
        (S + ["--classes", "a,b", *out("s")], 2, "comma-separated list of whole numbers"),
        (S + ["--classes", "3,99", *out("s")], 2, "--classes must be in 0..9"),
        (S + ["--steps", 0, *out("s")], 2, "must be 1 or more"),
        (S + ["--num-images", 0, *out("s")], 2, "must be 1 or more"),
        (S + ["--device", "tpu", *out("s")], 2, "--device"),
        (S + ["--config", "lsun_beds256", *out("s")], 2, "drop --config"),
        (["sample.py", "--ckpt", q, "--config", "cin256-v2", *out("s")], 2, "drop --config"),
        (["sample.py", "--ckpt", q, "--steps", 10, *out("s")], 2, "calibrated for 4 DDIM steps"),
        (S + ["--out", earlier], 2, "holds the images of an earlier run"),
        (S + ["--out", a_file / "s"], 2, "cannot create the folder"),
        (["sample.py", "--ckpt", nan_ckpt, "--num-images", 2, *out("nan")], 1, "NaN or Inf"),
        (["sample.py", "--ckpt", other_steps, *out("s")], 2, "rerun quantize.py to make it again"),
        # evaluate.py
        (["evaluate.py", tmp / "none.npz"], 2, "does not exist"),
        (["evaluate.py", tmp / "truncated.npz"], 1, "not a readable .npz"),
        (["evaluate.py", tmp / "objects.npz"], 1, "not a readable .npz"),
        (["evaluate.py", tmp / "one.npz"], 1, "FID needs at least 2"),
        (E + ["--k", -1], 2, "must be 1 or more"),
        (E + ["--k", 0], 2, "must be 1 or more"),
        (E + ["--batch-size", 0], 2, "must be 1 or more"),
        (E + ["--device", "tpu"], 2, "--device"),
        (E + ["--classifier", fp_ckpt], 1, "not a digit classifier"),
        (E + ["--classifier", tmp / "none.pt"], 1, "no checkpoint at"),
        (E + ["--out", a_file / "e.json"], 2, "cannot create the folder"),
        (["evaluate.py", tmp / "three.npz", "--out", tmp / "new" / "three.json"], 0, "is noisy"),
        # train.py
        (T + ["--steps", 0], 2, "must be 1 or more"),
        (T + ["--batch-size", 0], 2, "must be 1 or more"),
        (T + ["--ckpt-every", 0], 2, "must be 1 or more"),
        (T + ["--holdout", 5000], 2, "--holdout must leave training images"),
        (T + ["--resume"], 2, "no training state"),
        (T + ["--out", ROOT / "checkpoints" / "digits_classifier.pt"], 2, "exists; pass --force"),
        (T + ["--steps", 3, "--holdout", 50], 0, "wrote runs/train/digits_classifier.pt"),  # not checkpoints/
    ]
    if not torch.cuda.is_available():
        cases += [(Q + ["--device", "cuda", *out("q1.pt")], 2, "no CUDA GPU is visible here"),
                  (S + ["--device", "cuda", *out("s")], 2, "no CUDA GPU is visible here")]
    # train.py runs in a scratch folder: its default output (runs/train/) is relative
    spec = [dict(script=c[0], args=[str(a) for a in c[1:]], cwd=str(tmp) if c[0] == "train.py" else None)
            for c, _, _ in cases]
    (tmp / "cases.json").write_text(json.dumps(spec))
    shipped = {p: p.read_bytes() for p in (ROOT / "checkpoints").glob("*.pt")}
    proc = subprocess.run([sys.executable, "-c", HELPER, str(ROOT), str(tmp / "cases.json"), str(tmp / "results.json")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(p.read_bytes() == b for p, b in shipped.items()), "a shipped checkpoint changed"
    results = json.loads((tmp / "results.json").read_text())
    return tmp, list(zip(cases, results)), dict(existing=existing, resumed=resumed)


def test_every_bad_input_ends_with_its_message_and_no_traceback(sweep):
    tmp, runs, _ = sweep
    failures = []
    for (cmd, rc, fragment), r in runs:
        text = r["stdout"] + r["stderr"]
        if r["rc"] != rc or fragment not in text or "Traceback" in text or r["traceback"]:
            failures.append(f"{' '.join(map(str, cmd))}: rc {r['rc']} (want {rc}), want {fragment!r}\n"
                            f"{r['traceback'] or text[-600:]}")
    assert not failures, f"{len(failures)} of {len(runs)} cases:\n" + "\n\n".join(failures)


def test_refused_runs_write_nothing_and_destroy_nothing(sweep, quant_ckpts):
    tmp, _, files = sweep
    assert files["existing"].read_bytes() == b"keep me"
    for name in ("q1.pt", "q1.json", "d.pt", "blown.pt", "blown.json"):
        assert not (tmp / name).exists(), name
    for folder in ("nan", "s"):  # made before the work (a bad --out fails early), left empty
        assert not (tmp / folder).exists() or not any((tmp / folder).rglob("*")), folder
    assert files["resumed"].with_name(files["resumed"].name + ".state.pt").exists()  # kept for a correct resume
    assert (tmp / "earlier" / "images").is_dir() and len(list((tmp / "earlier" / "images").iterdir())) == 16
    assert (tmp / "new" / "three.json").is_file()  # evaluate.py made the missing folder
    assert (tmp / "runs" / "train" / "digits_classifier.pt").is_file()  # train.py's default output


def test_an_interrupted_save_never_leaves_a_new_report_beside_an_old_checkpoint(tmp_path, monkeypatch):
    """save_with_report: the old report goes before the checkpoint is replaced, the new one after."""
    import models.files as ck

    path = tmp_path / "q.pt"
    ck.save_with_report({"run": 1}, path, {"run": 1})
    monkeypatch.setattr(ck, "save_atomic", lambda obj, p: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed while writing the new checkpoint
        ck.save_with_report({"run": 2}, path, {"run": 2})
    assert torch.load(path, weights_only=False) == {"run": 1} and not path.with_suffix(".json").exists()
    monkeypatch.undo()
    ck.save_with_report({"run": 2}, path, {"run": 2})
    assert json.loads(path.with_suffix(".json").read_text()) == {"run": 2}


def test_sample_force_replaces_an_earlier_run(fp_ckpt, tmp_path):
    from tests.conftest import run_script

    run_script("sample.py", "--ckpt", fp_ckpt, "--num-images", 5, "--out", tmp_path)
    run_script("sample.py", "--ckpt", fp_ckpt, "--num-images", 2, "--out", tmp_path, "--force")
    assert len(list((tmp_path / "images").glob("*.png"))) == 2
    assert len(np.load(tmp_path / "samples.npz")["arr_0"]) == 2


def test_ctrl_c_ends_with_one_line_and_code_130(fp_ckpt, tmp_path):
    out = tmp_path / "q.pt"
    proc = subprocess.Popen([sys.executable, "quantize.py", "--ckpt", str(fp_ckpt), "--out", str(out),
                             "--calib-samples", "64", "--batch-size", "8"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    buf = ""
    while "calibration trajectories" not in buf and time.time() < deadline:  # tqdm's bar: the work has begun
        buf += proc.stderr.read(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert sum("interrupted: quantize.py stopped" in line for line in err.splitlines()) == 1
    assert not out.exists() and not out.with_suffix(".json").exists()
