"""evaluate.py: FID/IS/precision/recall through clean-fid, offline, with clear errors."""
import json
import sys

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from models.digits import load_digits
from tests.conftest import ROOT, run_script


def digits_npz(path, noise=0.0, n=600, seed=0, rgb=False):
    images = load_digits()[0].permute(0, 2, 3, 1).numpy()[:n].astype(np.float64)
    rng = np.random.default_rng(seed)
    images = np.clip(images + noise * rng.standard_normal(images.shape), 0, 255).round().astype(np.uint8)
    if rgb:
        images = np.repeat(images, 3, axis=-1)
    np.savez(path, arr_0=images)
    return path


def evaluate(*args, check=True):
    proc = run_script("evaluate.py", *args, check=check)
    return proc


def results(npz):
    return json.loads(npz.with_suffix(".eval.json").read_text())


def test_identical_sets_score_zero_fid_and_full_precision_recall(tmp_path):
    ref = digits_npz(tmp_path / "ref.npz", n=1797)
    same = digits_npz(tmp_path / "same.npz", n=1797)
    out = evaluate(same, "--ref", ref)
    r = results(same)
    assert abs(r["fid"]) < 1e-3 and abs(r["sfid"]) < 1e-3
    assert r["precision"] == 1.0 and r["recall"] == 1.0
    assert r["feature_network"] == "digits" and r["n_samples"] == 1797
    assert "in-domain FID_digits" in out.stdout  # never labelled as Inception FID
    assert r["is"] > 5  # ten well-separated classes


def test_fid_grows_with_noise(tmp_path):
    fids = []
    for noise in (0.0, 20.0, 50.0, 100.0):
        path = digits_npz(tmp_path / f"n{noise}.npz", noise=noise, seed=1)
        evaluate(path)
        fids.append(results(path)["fid"])
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


OFFLINE = """
import socket, sys, runpy
def refuse(*a, **k):
    raise OSError("network access attempted")
socket.socket.connect = refuse
socket.create_connection = refuse
sys.argv = ["evaluate.py"] + sys.argv[1:]
runpy.run_path("evaluate.py", run_name="__main__")
"""


def test_default_path_runs_with_no_network(tmp_path):
    import subprocess

    path = digits_npz(tmp_path / "s.npz", noise=10.0, n=200)
    proc = subprocess.run([sys.executable, "-c", OFFLINE, str(path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert results(path)["fid"] > 0


class StandInLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 23 * 23, 2048)

    def forward(self, x):
        return torch.tanh(self.proj(nn.functional.avg_pool2d(x, 13).flatten(1)))[:, :, None, None]


class StandInInception(nn.Module):
    """The interface of clean-fid's inception-2015-12-05.pt TorchScript file, with random weights."""

    def __init__(self):
        super().__init__()
        self.layers = StandInLayers()
        self.output = nn.Linear(2048, 1008)

    def forward(self, img, return_features: bool = False):
        features = self.layers((img - 128) / 128).view(-1, 2048)
        if return_features:
            return features
        return torch.softmax(self.output(features), dim=1)  # the real file returns class probabilities


def test_inception_path_goes_through_clean_fid_with_a_stand_in(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(StandInInception()).save(str(weights))
    ref = digits_npz(tmp_path / "ref.npz", n=64, rgb=True)
    same = digits_npz(tmp_path / "same.npz", n=64, rgb=True)
    proc = evaluate(same, "--ref", ref, "--features", "inception", "--inception", weights)
    r = results(same)
    assert r["feature_network"] == "Inception" and abs(r["fid"]) < 1e-2 and r["sfid"] is None
    assert "fewer than 2048" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("FID_Inception")
    noisy = digits_npz(tmp_path / "noisy.npz", n=64, noise=80.0, rgb=True)
    evaluate(noisy, "--ref", ref, "--features", "inception", "--inception", weights)
    assert results(noisy)["fid"] > results(same)["fid"] + 1e-3


def test_missing_inception_fails_fast_with_advice(tmp_path):
    path = digits_npz(tmp_path / "s.npz", n=10, rgb=True)
    proc = evaluate(path, "--features", "inception", "--inception", tmp_path / "none.pt", check=False)
    assert proc.returncode != 0
    assert "nothing is downloaded here" in proc.stderr and "--features digits" in proc.stderr


def test_bad_inputs_are_refused_clearly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = evaluate(empty, check=False)
    assert proc.returncode != 0 and "holds no images" in proc.stderr
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(mixed / "b.png")
    proc = evaluate(mixed, check=False)
    assert proc.returncode != 0 and "mixed sizes" in proc.stderr


def test_grayscale_against_rgb_is_converted_and_said(tmp_path):
    gray = digits_npz(tmp_path / "g.npz", n=300)
    rgb = digits_npz(tmp_path / "rgb.npz", n=300, rgb=True)
    proc = evaluate(gray, "--ref", rgb)
    assert "converted to RGB" in proc.stdout
    assert abs(results(gray)["fid"]) < 1e-3
