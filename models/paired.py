"""Paired fidelity: how far each image of a quantized model lies from the full-precision model's image
made from the same noise (same seed, same index, same class), and 95 % bootstrap intervals.

FID compares two distributions, so sample noise alone moves it by more than quantization does on
1,000 images, and a quantized model can score below the model it copies. A paired measure compares
image i with image i: the noise that made both is shared, so what is left is what quantization
changed. evaluate.py --against computes the per-image figures; bench/reproduce.py pools them over
training seeds.

Intervals are percentile bootstraps with a fixed generator (the same input gives the same interval).
Over seeds they are hierarchical: resample the seeds, then the images within each chosen seed, so
that both the seed-to-seed spread and the image-to-image spread widen the interval; with three
seeds the seed level is coarse, and the interval says so by being wide.
"""
import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def psnr(images, reference):
    """Per-image PSNR (dB) of uint8 images [N, H, W, C] against the reference images of the same
    indices. Identical images have no finite PSNR; their squared error is taken as half the smallest
    non-zero one an image of this size can have (one pixel value off by one), so they score just
    above the closest non-identical pair instead of infinity."""
    diff = images.astype(np.float64) - reference.astype(np.float64)
    mse = (diff ** 2).reshape(len(diff), -1).mean(1)
    floor = 0.5 / diff[0].size
    return 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, floor))


def feature_distance(features, reference):
    """Per-image Euclidean distance between two images' feature vectors [N, D] (the evaluation
    network's pool features: the digit classifier's for the embedded default, Inception's otherwise)."""
    return np.linalg.norm(features.astype(np.float64) - reference.astype(np.float64), axis=1)


def interval(per_seed, n_boot=N_BOOT, seed=0, level=LEVEL):
    """Mean and percentile-bootstrap interval of the mean of per-image values. per_seed: one array of
    per-image values per training seed (one array: the images of one run), all the same length.
    Returns dict(mean, lo, hi, n_seeds, n_images)."""
    d = np.stack([np.asarray(v, dtype=np.float64) for v in per_seed])
    n_seeds, n_images = d.shape
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, n_boot, 100):  # 100 resamples at a time: memory stays at 100 x seeds x images indices
        b = min(100, n_boot - start)
        seeds = rng.integers(n_seeds, size=(b, n_seeds)) if n_seeds > 1 else np.zeros((b, 1), dtype=np.int64)
        images = rng.integers(n_images, size=(b, n_seeds, n_images))
        means.append(d[seeds[..., None], images].mean(axis=(1, 2)))
    lo, hi = np.quantile(np.concatenate(means), [(1 - level) / 2, (1 + level) / 2])
    return dict(mean=float(d.mean()), lo=float(lo), hi=float(hi), n_seeds=n_seeds, n_images=n_images)


def resolved(ci):
    """Whether an interval of a difference excludes zero."""
    return ci["lo"] > 0 or ci["hi"] < 0


def format_interval(ci, f=".2f"):
    return f"{ci['mean']:{f}} [{ci['lo']:{f}}, {ci['hi']:{f}}]"
