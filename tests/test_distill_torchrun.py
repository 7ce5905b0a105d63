"""distill.py under torchrun (gloo on the CPU): two processes make the one-process updates, and a
killed multi-process run resumes to the uninterrupted one."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_script

TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone"]  # --standalone: a free port from the OS
FLAGS = ["--iters", 4, "--batch-size", 4, "--eval-samples", 2, "--lora-rank", 2, "--ckpt-every", 1]
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")  # each torchrun worker's thread count, and the reference's


def torchrun(*args, nproc=2, **kw):
    return subprocess.Popen([*TORCHRUN, "--nproc_per_node", str(nproc), "distill.py", *map(str, args)], cwd=ROOT,
                            env=ONE_THREAD, **kw)


def torchrun_finished(*args):
    """torchrun(...) to completion. Once in about eight runs here a gloo worker aborted (SIGABRT) with
    nothing in its own output; such a launch is run once more (the run is deterministic, so the
    result is the same), anything else fails at once."""
    proc = torchrun(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0 and b"SIGABRT" in out + err:
        proc = torchrun(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]


def one_and_two_processes(qckpt, tmp_path, *flags):
    """The same distillation in one process and under torchrun with two; their (state_dict, history)."""
    one = subprocess.run([sys.executable, "distill.py", "--qckpt", str(qckpt), "--out", str(tmp_path / "one.pt"),
                          *map(str, flags)], cwd=ROOT, env=ONE_THREAD, capture_output=True)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun_finished("--qckpt", qckpt, "--out", tmp_path / "two.pt", *flags)
    return trained(tmp_path / "one.pt"), trained(tmp_path / "two.pt")


def trained(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["unet_state_dict"], ckpt["history"]


def assert_history_close(h1, h2, rtol, keys=("mse", "trd")):
    assert [h["iter"] for h in h1] == [h["iter"] for h in h2]
    for a, b in zip(h1, h2):  # the logged losses are means over all trajectories, as one process logs them
        assert all(abs(a[k] - b[k]) <= rtol * a[k] for k in keys), (a, b)


@pytest.fixture(scope="module")
def default_rates(quant_ckpts, tmp_path_factory):
    """One process and two, every parameter training at the default rates: (folder, results)."""
    tmp = tmp_path_factory.mktemp("torchrun")
    return tmp, one_and_two_processes(quant_ckpts["omq"], tmp, *FLAGS)


def test_two_processes_make_the_one_process_lora_updates(quant_ckpts, tmp_path):
    """With the quantizer parameters fixed, the trained LoRA (merged into the weights) and the loss log
    equal one process's to float rounding: the shards are the one process's trajectories, and DDP
    averages their gradients. (The two halves' gradients are summed in another order, which is all
    that differs.)"""
    flags = [*FLAGS[2:], "--iters", 2, "--lr-act", 0, "--lr-wq", 0]
    (sd1, h1), (sd2, h2) = one_and_two_processes(quant_ckpts["omq"], tmp_path, *flags)
    base = torch.load(quant_ckpts["omq"], weights_only=True)["unet_state_dict"]
    moved = [k for k in sd1 if k.endswith("layer.weight") and not torch.equal(sd1[k], base[k])]
    assert len(moved) > 90
    for k in sd1:
        assert torch.allclose(sd1[k], sd2[k], rtol=0, atol=1e-7), (k, (sd1[k] - sd2[k]).abs().max())  # LoRA moved them ~1e-4
    assert_history_close(h1, h2, rtol=1e-5)


def test_two_processes_make_the_one_process_updates(quant_ckpts, default_rates):
    """Every parameter training (default rates): the activation scales' gradients are sums of many
    terms that nearly cancel, and AdamW's first steps follow their sign, so float rounding can move an
    entry by up to one step of its learning rate; everything else stays at rounding. The loss log is
    compared as the iteration's mean MSE over its steps and the relation loss: the MSE of its last
    step alone depends on that step's own activation scales, which such a step moves by several %
    (9 % at the fourth iteration here, where the mean moved 0.4 %)."""
    tmp, ((sd1, h1), (sd2, h2)) = default_rates
    base = torch.load(quant_ckpts["omq"], weights_only=True)["unet_state_dict"]
    steps = {"a_scale": 5e-4, "a_zero": 5e-4, "w_scale": 1e-6}  # distill.py's --lr-act, --lr-wq
    for k in sd1:
        kind = k.rsplit(".", 1)[-1]
        atol = steps.get(kind, 1e-5) if kind in steps or k.endswith("layer.weight") else 0
        assert torch.allclose(sd1[k], sd2[k], rtol=0, atol=atol), (k, (sd1[k] - sd2[k]).abs().max())
    assert sum(not torch.equal(sd1[k], base[k]) for k in sd1 if k.endswith("a_scale")) > 90  # they trained
    assert_history_close(h1, h2, rtol=1e-2, keys=("mse_mean", "trd"))
    assert not (tmp / "two.pt.state.pt").exists()


def descendants(pid):
    """Every live process below pid, from /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def test_killed_torchrun_run_resumes_to_the_uninterrupted_one(quant_ckpts, default_rates, tmp_path):
    straight = default_rates[0] / "two.pt"  # the same run under torchrun, never interrupted
    out, state = tmp_path / "resumed.pt", tmp_path / "resumed.pt.state.pt"
    proc = torchrun("--qckpt", quant_ckpts["omq"], "--out", out, *FLAGS,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:  # rank 0 wrote iteration 1's state
        time.sleep(0.05)
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun and its workers (which it starts in sessions of their own)
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert state.exists() and not out.exists(), "the run was not interrupted between checkpoints"
    done = torch.load(state, weights_only=True)["iter"]
    assert 1 <= done < 4
    # a different number of processes is refused: the state was made with 2
    proc = run_script("distill.py", "--qckpt", quant_ckpts["omq"], "--out", out, *FLAGS, "--resume", check=False)
    assert proc.returncode == 2 and "another number of processes" in proc.stderr
    torchrun_finished("--qckpt", quant_ckpts["omq"], "--out", out, *FLAGS, "--resume")
    (a, ha), (b, hb) = trained(straight), trained(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert ha == hb
    assert not state.exists()


def test_batch_not_divisible_by_the_processes_is_refused(quant_ckpts, tmp_path):
    proc = torchrun("--qckpt", quant_ckpts["omq"], "--out", tmp_path / "d.pt", "--batch-size", 3, "--iters", 1,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "--batch-size 3 must be divisible by the 2 processes" in err
    assert not (tmp_path / "d.pt").exists()
