"""evaluate.py: FID/IS/precision/recall through clean-fid, offline, with clear errors."""
import json
import sys
from collections import OrderedDict

import numpy as np
import pytest
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


class StandInMixed6(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 12, 1)  # the branch whose first 7 channels ADM's sFID reads
        self.tower = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x)], 1)


class StandInInception(nn.Module):
    """The interface of clean-fid's inception-2015-12-05.pt TorchScript file, with random weights:
    `layers` named after the TF graph (with mixed_6.conv) taking normalised 299x299 input to
    [B, 2048, 1, 1]; forward(img in 0..255, return_features, no_output_bias) resizing to 299x299
    inside (bilinear, as the TF graph), returning pool features or class probabilities."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(3, 8, 3, stride=8), pool0=nn.AvgPool2d(7), mixed_6=StandInMixed6(),  # mixed_6 at 5x5
            pool=nn.AdaptiveAvgPool2d(1),
            proj=nn.Conv2d(16, 2048, 1), act=nn.Tanh()))
        self.output = nn.Linear(2048, 1008)
        with torch.no_grad():  # confident classes, so that the IS is far from 1 (a second softmax would flatten it)
            self.output.weight.mul_(40)
            self.output.bias.mul_(40)

    def forward(self, img, return_features: bool = False, no_output_bias: bool = False):
        x = img.to(torch.float32)
        if x.shape[2] != 299 or x.shape[3] != 299:
            x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128).reshape(-1, 2048)
        if return_features:
            return features
        logits = self.output(features)
        if no_output_bias:
            logits = logits - self.output.bias
        return torch.softmax(logits, dim=1)  # the real file returns class probabilities


def image_folder(path, n, noise, seed):
    """n 20x20 RGB images (digits, enlarged, with noise) as PNGs; returns the folder and the array."""
    rng = np.random.default_rng(seed)
    digits = load_digits()[0][:n, 0].numpy()
    images = np.stack([np.array(Image.fromarray(d).resize((20, 20), Image.NEAREST)) for d in digits])
    images = np.clip(images[..., None] + noise * rng.standard_normal((n, 20, 20, 3)), 0, 255).astype(np.uint8)
    path.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(path / f"{i:04d}.png")
    return path, images


def test_inception_figures_equal_clean_fids_own_pipeline_and_a_direct_is(tmp_path):
    """With a stand-in of the real weights file: FID equals clean-fid's compute_fid with the same
    file through clean-fid's own wrapper (InceptionV3W, as for the real weights) in both modes; IS
    equals a direct computation from the file's probabilities (no second softmax, no output bias,
    10 splits); sFID is read from mixed_6/conv; the JSON names the mode and the weights' sha256."""
    import hashlib
    from cleanfid import fid
    from cleanfid.inception_torchscript import InceptionV3W

    torch.manual_seed(0)
    weights = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(StandInInception()).save(str(weights))
    fake_dir, fake = image_folder(tmp_path / "fake", 60, 40.0, 1)
    real_dir, real = image_folder(tmp_path / "real", 50, 10.0, 2)
    fids = {}
    for mode in ("legacy_tensorflow", "clean"):
        out = tmp_path / f"{mode}.json"
        evaluate(fake_dir, "--ref", real_dir, "--features", "inception", "--mode", mode, "--inception", weights,
                 "--out", out)
        r = json.loads(out.read_text())
        theirs = fid.compute_fid(str(fake_dir), str(real_dir), mode=mode, num_workers=0, batch_size=16,
                                 device=torch.device("cpu"), verbose=False, use_dataparallel=False,
                                 custom_feat_extractor=InceptionV3W(str(tmp_path), download=False,
                                                                    resize_inside=mode == "legacy_tensorflow"))
        assert abs(r["fid"] - theirs) <= 1e-4 * theirs, (mode, r["fid"], theirs)
        assert r["mode"] == mode and r["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert r["sfid"] is not None and r["sfid"] > 0
        fids[mode] = r["fid"]
    assert fids["clean"] != fids["legacy_tensorflow"]  # the two pipelines resize differently

    net = torch.jit.load(str(weights))
    with torch.no_grad():
        probs = net(torch.from_numpy(fake).permute(0, 3, 1, 2).float(), no_output_bias=True).double().numpy()
    scores = []
    for part in np.array_split(probs, 10):
        p_y = part.mean(0)
        scores.append(np.exp(np.mean([np.sum(p * (np.log(p) - np.log(p_y))) for p in part])))
    r = json.loads((tmp_path / "legacy_tensorflow.json").read_text())
    assert r["is_splits"] == 10
    assert abs(r["is"] - np.mean(scores)) < 1e-5 and abs(r["is_std"] - np.std(scores)) < 1e-5
    assert abs(r["is"] - 1.0) > 1e-3  # a second softmax would flatten the probabilities to IS ~ 1

    # sFID: ADM's slice, the first 7 channels of mixed_6/conv in HWC order, of the network's own
    # normalised 299 x 299 input (legacy mode resizes inside the network), against scipy's Frechet distance
    def mixed_6_conv_slice(images):
        x = nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=(299, 299),
                                      mode="bilinear", align_corners=False)
        with torch.no_grad():
            h = net.layers.pool0(net.layers.conv((x - 128) / 128))
            return net.layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).flatten(1).double().numpy()

    from scipy import linalg
    a, b = mixed_6_conv_slice(fake), mixed_6_conv_slice(real)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert r["sfid"] == pytest.approx(want, rel=1e-3)


def test_reference_batch_saved_from_a_folder_scores_like_the_folder(tmp_path):
    """--save-ref writes ADM's layout (mu, sigma, mu_s, sigma_s, arr_0); evaluating against it gives
    the figures that evaluating against the folder itself gives."""
    torch.manual_seed(0)
    weights = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(StandInInception()).save(str(weights))
    real_dir, real = image_folder(tmp_path / "real", 50, 10.0, 2)
    fake_dir, _ = image_folder(tmp_path / "fake", 40, 30.0, 3)
    inc = ["--features", "inception", "--inception", weights]
    evaluate(real_dir, "--save-ref", tmp_path / "ref.npz", *inc)
    ref = np.load(tmp_path / "ref.npz")
    assert {"mu", "sigma", "mu_s", "sigma_s", "arr_0", "meta"} <= set(ref.files)
    assert np.array_equal(ref["arr_0"], real) and ref["mu"].shape == (2048,)
    a, b = tmp_path / "folder.json", tmp_path / "batch.json"
    evaluate(fake_dir, "--ref", real_dir, *inc, "--out", a)
    evaluate(fake_dir, "--ref", tmp_path / "ref.npz", *inc, "--out", b)
    a, b = json.loads(a.read_text()), json.loads(b.read_text())
    for key in ("fid", "sfid"):
        assert abs(a[key] - b[key]) <= 1e-9 * abs(a[key]), key
    assert (a["precision"], a["recall"]) == (b["precision"], b["recall"])
    # made with one pipeline, refused for another
    proc = evaluate(fake_dir, "--ref", tmp_path / "ref.npz", *inc, "--mode", "clean", check=False)
    assert proc.returncode == 1 and "would not be comparable" in proc.stderr


def test_missing_inception_is_fetched_with_clean_fid_or_fails_fast_with_advice(tmp_path):
    """A missing file named with --inception is an error; a folder without the weights makes
    clean-fid's downloader fetch them, and offline that fails at once with one line naming the URL,
    the place and --inception, leaving no partial file."""
    import subprocess

    path = digits_npz(tmp_path / "s.npz", n=10, rgb=True)
    proc = evaluate(path, "--features", "inception", "--inception", tmp_path / "none.pt", check=False)
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr
    cache = tmp_path / "cache"
    cache.mkdir()
    proc = subprocess.run([sys.executable, "-c", OFFLINE, str(path), "--features", "inception", "--inception",
                           str(cache)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "could not be downloaded" in proc.stderr and "nvlabs-fi-cdn" in proc.stderr
    assert str(cache / "inception-2015-12-05.pt") in proc.stderr and "--inception PATH" in proc.stderr
    assert list(cache.iterdir()) == []


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
