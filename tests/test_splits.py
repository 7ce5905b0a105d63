"""The splits every comparison rests on: the held-out eps-MSE check of quantize.py and distill.py draws
none of the trajectories that calibration or distillation of the same seed draw, its figure follows
the held-out seed, and bench/reproduce.py refuses seeds that would let training, selection, held-out
checks and evaluation images share draws."""
import runpy
import signal
import sys

import pytest
import torch

import models.trajectory
from models.checkpoint import load_quant_model
from models.diffusion import DDIM
from models.diffusion import sample_generators as real_generators
from models.seeds import generator_seeds
from models.trajectory import eps_mse as real_eps_mse
from tests.conftest import QUICK, ROOT, run_script
from tests.test_distill import QUICK_DISTILL


def run_recording_draws(monkeypatch, script, *args):
    """Runs a top-level script in this process and returns {"held-out": set, "training": set} of the
    generator seeds (models/seeds.py generator_seeds) of every FP trajectory it drew: those drawn
    inside eps_mse (the held-out check) and all others (calibration, distillation)."""
    draws, role = {"held-out": set(), "training": set()}, ["training"]

    def recording_generators(seed, indices):
        draws[role[0]].update(generator_seeds(seed, indices))
        return real_generators(seed, indices)

    def held_out_eps_mse(*a, **kw):
        role[0] = "held-out"
        try:
            return real_eps_mse(*a, **kw)
        finally:
            role[0] = "training"

    monkeypatch.setattr(models.trajectory, "sample_generators", recording_generators)
    monkeypatch.setattr(models.trajectory, "eps_mse", held_out_eps_mse)  # the scripts import it by name as they run
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    sigint = signal.getsignal(signal.SIGINT)
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        signal.signal(signal.SIGINT, sigint)
    return draws


def test_held_out_check_draws_no_calibration_or_distillation_trajectory(fp_ckpt, monkeypatch, tmp_path):
    """Seed 5 (not 0, so that a held-out seed fixed to a constant would show too): quantize.py's
    calibration and distill.py's training draw from one set of generators, the held-out checks of
    both from another, and the two share nothing."""
    q = run_recording_draws(monkeypatch, "quantize.py", "--ckpt", fp_ckpt, "--out", tmp_path / "q.pt", "--seed", 5, *QUICK)
    d = run_recording_draws(monkeypatch, "distill.py", "--qckpt", tmp_path / "q.pt", "--out", tmp_path / "d.pt",
                            "--seed", 5, *QUICK_DISTILL)
    training, held_out = q["training"] | d["training"], q["held-out"] | d["held-out"]
    assert len(q["training"]) == 8 and len(d["training"]) == 6  # calibration trajectories; iterations x batch
    assert len(q["held-out"]) == 4 and len(d["held-out"]) == 2  # --eval-samples of each
    assert not training & held_out, sorted(training & held_out)[:5]
    # each side is its own seed's: another training seed moves both
    d7 = run_recording_draws(monkeypatch, "distill.py", "--qckpt", tmp_path / "q.pt", "--out", tmp_path / "d7.pt",
                             "--seed", 7, *QUICK_DISTILL)
    assert not d7["training"] & d["training"] and not d7["held-out"] & d["held-out"]


def test_held_out_figure_follows_the_held_out_seed(quant_ckpts):
    """The eps-MSE check is a function of its seed's trajectories: the same seed gives the same
    figure, another seed another one."""
    fp_model, qmodel, ckpt = load_quant_model(quant_ckpts["omq"])
    ddim = DDIM(fp_model.alphas_cumprod, steps=ckpt["settings"]["steps"])
    figure = lambda seed: models.trajectory.eps_mse(fp_model, qmodel, ddim, 3, 3, seed, 2.0, torch.device("cpu"))  # noqa: E731
    a, b = figure(10_005), figure(10_006)
    assert a == figure(10_005) and a != b


@pytest.mark.parametrize("flags, roles", [
    (["--train-seeds", "0,1", "--sample-seed", "1"], "--sample-seed and training seed 1"),
    (["--train-seeds", "0", "--selection-seed", "10000"], "--selection-seed and the held-out check of training seed 0"),
    (["--train-seeds", "0", "--selection-seed", "1234"], "--sample-seed and --selection-seed"),
    (["--train-seeds", "0", "--sample-seed", "9999"], "--sample-seed + 1 (the fp2 cell) and the held-out check of training seed 0"),
    (["--train-seeds", "0,10000"], "the held-out check of training seed 0 and training seed 10000"),
])
def test_reproduce_refuses_seeds_whose_draws_overlap(flags, roles, tmp_path):
    proc = run_script("bench/reproduce.py", "--plan", "--bits", 2, "--cells", "baseline", "--out", tmp_path, *flags,
                      check=False)
    assert proc.returncode == 2 and f"{roles} would draw the same trajectories or images" in proc.stderr, proc.stderr[-500:]


def test_reproduce_default_seeds_are_apart(tmp_path):
    """The sweep's own seeds (training 0, 1, 2; selection 99; samples 1234 and 1235) pass the check."""
    proc = run_script("bench/reproduce.py", "--plan", "--bits", 2, "--cells", "baseline", "--train-seeds", "0,1,2",
                      "--out", tmp_path)
    assert "LoRA lr x" in proc.stdout
