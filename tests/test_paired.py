"""evaluate.py --against: paired fidelity of one sample set to another made from the same noise, checked
against a hand computation; its bootstrap intervals; the pairing check."""
import json

import numpy as np
import torch

from models.classifier import load_classifier
from models.digits import DEFAULT_CLASSIFIER, load_digits
from models.npz import NpzArray
from models.paired import interval, resolved
from tests.conftest import run_script


def sample_set(folder, images, seed=0, classes=None):
    """A folder as sample.py leaves it: samples.npz and the samples.json record of its seed and count."""
    folder.mkdir()
    np.savez(folder / "samples.npz", arr_0=images, labels=np.arange(len(images)) % 10)
    (folder / "samples.json").write_text(json.dumps(dict(seed=seed, n_images=len(images), classes=classes)))
    return folder / "samples.npz"


def digits_pair(n=300, noise=25.0):
    """(FP stand-in: real digits, 'quantized' stand-in: the same digits with noise; image 0 identical)."""
    fp = load_digits()[0].permute(0, 2, 3, 1).numpy()[:n]
    rng = np.random.default_rng(0)
    q = np.clip(fp + noise * rng.standard_normal(fp.shape), 0, 255).round().astype(np.uint8)
    q[0] = fp[0]
    return fp, q


def test_paired_fidelity_equals_a_hand_computation(tmp_path):
    fp, q = digits_pair()
    fp_npz, q_npz = sample_set(tmp_path / "fp", fp), sample_set(tmp_path / "q", q)
    out = run_script("evaluate.py", q_npz, "--against", fp_npz)
    paired = json.loads(q_npz.with_suffix(".eval.json").read_text())["paired"]
    # PSNR by hand; the identical image 0 scores as half a grey level's error over one of its 64 pixels
    mse = ((q.astype(np.float64) - fp) ** 2).reshape(len(q), -1).mean(1)
    mse[0] = 0.5 / 64
    want_psnr = 10 * np.log10(255.0 ** 2 / mse)
    # feature distance by hand: the shipped classifier's penultimate features of each image
    clf = load_classifier(DEFAULT_CLASSIFIER)
    with torch.no_grad():
        feats = [clf(torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1, return_features=True)[1].double()
                 for a in (q, fp)]
    want_dist = (feats[0] - feats[1]).norm(dim=1).numpy()
    got = {k: NpzArray(q_npz.with_name("samples.eval.paired.npz"), k).read() for k in ("psnr", "feature_distance")}
    assert np.array_equal(got["psnr"], want_psnr)  # the same float64 arithmetic on the same integers
    # float32 features of the same images in another batch size: kernels may round differently, by
    # float32 rounding through four layers, far below this relative bound
    assert np.allclose(got["feature_distance"], want_dist, rtol=1e-4, atol=1e-4 * want_dist.max())
    assert got["feature_distance"][0] <= 1e-4 * want_dist.max() < want_dist[1:].min()  # the identical pair
    # float64 means of the same positive values summed in another order: n * 2^-53 relative at most
    assert abs(paired["psnr"]["mean"] - want_psnr.mean()) <= len(q) * 2.0 ** -53 * want_psnr.mean()
    assert paired["n_images"] == len(q)
    assert paired["psnr"] == interval([want_psnr])  # deterministic: the same interval from the same values
    # the percentile bootstrap of a mean of 300 values is close to the normal interval mean +- 1.96 se
    half = (paired["psnr"]["hi"] - paired["psnr"]["lo"]) / 2
    se = want_psnr.std(ddof=1) / len(want_psnr) ** 0.5
    assert abs(half - 1.96 * se) <= 0.15 * 1.96 * se, (half, se)
    assert "paired with" in out.stdout and "PSNR" in out.stdout


def test_pairs_of_other_seeds_counts_or_classes_are_refused(tmp_path):
    fp, q = digits_pair(n=100)
    fp_npz = sample_set(tmp_path / "fp", fp, seed=0)
    for name, images, seed, classes, message in (
            ("seed", q, 1, None, "sampled with seed 0, 100 images, classes all; the samples with seed 1"),
            ("count", q[:60], 0, None, "--against holds 100 images"),
            ("classes", q, 0, [3], "classes all; the samples with seed 0, 100 images, classes [3]")):
        q_npz = sample_set(tmp_path / name, images, seed=seed, classes=classes)
        proc = run_script("evaluate.py", q_npz, "--against", fp_npz, check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-500:]
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not q_npz.with_suffix(".eval.json").exists()


def test_interval_over_seeds_widens_with_the_seed_spread():
    """The hierarchical bootstrap resamples seeds as well as images: three seeds whose means differ
    give a wider interval than three seeds with the same images, and a difference whose interval
    holds zero is not resolved."""
    rng = np.random.default_rng(1)
    images = rng.standard_normal(500) + 5
    same = interval([images, images, images])
    spread = interval([images - 1, images, images + 1])
    for ci in (same, spread):  # float64 means of 1,500 positive values in another order: 1500 * 2^-53 relative
        assert abs(ci["mean"] - images.mean()) <= 1500 * 2.0 ** -53 * images.mean()
    assert spread["hi"] - spread["lo"] > 3 * (same["hi"] - same["lo"])
    assert same["n_seeds"] == 3 and same["n_images"] == 500
    assert not resolved(interval([images - 5])) and resolved(interval([images]))
