"""evaluate.py's figures on two different sets against references computed here independently: FID
and sFID from the feature statistics (scipy), IS from the class probabilities over --is-splits,
precision/recall from brute-force k-NN manifolds (scipy cdist) at --k; and the forms of reference
batch users pass (with arr_0, statistics only, without a record of how they were made)."""
import json

import numpy as np
import pytest
import torch
from scipy import linalg
from scipy.spatial.distance import cdist

from models.classifier import load_classifier
from models.digits import DEFAULT_CLASSIFIER, load_digits
from tests.conftest import run_script


def digit_sets():
    """Two different sets of 8x8 digits (uint8 [N, 8, 8, 1]): 150 real ones, and 120 others with noise."""
    images = load_digits()[0].permute(0, 2, 3, 1).numpy()
    rng = np.random.default_rng(0)
    noisy = images[200:320].astype(np.float64) + rng.normal(0, 40, (120, 8, 8, 1))
    return images[:150], np.clip(noisy, 0, 255).astype(np.uint8)


def features(images):
    """The in-domain network's penultimate features, probabilities and sFID slice (the first 8
    channels of the last conv map), computed here from the classifier itself."""
    clf = load_classifier(DEFAULT_CLASSIFIER)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        logits, feats, spatial = clf(x / 127.5 - 1, return_features=True)
    return feats.double().numpy(), torch.softmax(logits, 1).double().numpy(), spatial[:, :8].flatten(1).double().numpy()


def frechet(a, b):
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def knn_coverage(manifold, queries, k):
    """Share of queries within the k-th-neighbour radius (the point itself not counted) of some manifold point."""
    d = cdist(manifold, manifold)
    radius = np.sort(d, axis=1)[:, k]
    return float((cdist(queries, manifold) <= radius[None]).any(1).mean())


def inception_score(p, splits):
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part + 1e-12) - np.log(py + 1e-12)), 1))))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    real, fake = digit_sets()
    np.savez(tmp / "real.npz", arr_0=real)
    np.savez(tmp / "fake.npz", arr_0=fake)
    return tmp, real, fake


@pytest.mark.parametrize("k", [2, 5])
def test_two_different_sets_against_independent_references(sets, k):
    tmp, real, fake = sets
    out = tmp / f"k{k}.json"
    run_script("evaluate.py", tmp / "fake.npz", "--ref", tmp / "real.npz", "--k", k, "--is-splits", 4, "--block", 50,
               "--out", out)
    got = json.loads(out.read_text())
    (rf, _, rs), (ff, fp, fs) = features(real), features(fake)
    precision, recall = knn_coverage(rf, ff, k), knn_coverage(ff, rf, k)
    assert 0 < precision < 1 and 0 < recall < 1 and precision != recall  # not a degenerate case
    # float32 distances in evaluate.py against float64 here: at most one point on the border may differ
    assert abs(got["precision"] - precision) <= 1 / len(fake) and abs(got["recall"] - recall) <= 1 / len(real)
    assert got["k"] == k
    assert got["fid"] == pytest.approx(frechet(ff, rf), rel=1e-4)
    assert got["sfid"] == pytest.approx(frechet(fs, rs), rel=1e-4)
    assert (got["is"], got["is_std"]) == pytest.approx(inception_score(fp, 4), rel=1e-4)
    assert got["is_splits"] == 4


def test_reference_batch_forms(sets):
    """A reference batch with arr_0 gives every figure; the same statistics without arr_0 give the
    same FID and sFID and no precision/recall; statistics with no record of their pipeline are taken
    as ADM's TensorFlow Inception, so the in-domain network refuses them."""
    tmp, real, fake = sets
    run_script("evaluate.py", tmp / "real.npz", "--save-ref", tmp / "ref.npz")
    full = dict(np.load(tmp / "ref.npz"))
    np.savez(tmp / "stats_only.npz", **{k: v for k, v in full.items() if k != "arr_0"})
    np.savez(tmp / "no_meta.npz", **{k: v for k, v in full.items() if k not in ("arr_0", "meta")})
    res = {}
    for name in ("ref", "stats_only"):
        run_script("evaluate.py", tmp / "fake.npz", "--ref", tmp / f"{name}.npz", "--out", tmp / f"{name}.json")
        res[name] = json.loads((tmp / f"{name}.json").read_text())
    assert res["ref"]["fid"] == pytest.approx(res["stats_only"]["fid"], rel=1e-9)
    assert res["ref"]["sfid"] == pytest.approx(res["stats_only"]["sfid"], rel=1e-9)
    assert "precision" in res["ref"] and "precision" not in res["stats_only"]
    (rf, _, _), (ff, _, _) = features(real), features(fake)
    assert res["ref"]["fid"] == pytest.approx(frechet(ff, rf), rel=1e-4)
    proc = run_script("evaluate.py", tmp / "fake.npz", "--ref", tmp / "no_meta.npz", check=False)
    assert proc.returncode != 0 and "without a record of how they were made" in proc.stderr
    assert "Traceback" not in proc.stderr
