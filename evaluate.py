"""Scores generated images against real ones: FID through clean-fid, plus IS, precision/recall and
(where spatial features exist) sFID. Every figure is reported with its sample counts and the
feature network that produced it.

    python evaluate.py runs/samples/samples.npz                      # embedded default vs. the real digits
    python evaluate.py samples/ --ref ref_batch.npz --features inception --device cuda

Feature networks:
  digits     the in-domain digit classifier that train.py trains and the repo ships (offline).
             Figures are labelled 'in-domain' (FID_digits etc.): never compare them with Inception FID.
  inception  clean-fid's standard Inception (mode 'clean'), from clean-fid's cached weights file or
             --inception PATH. It is never downloaded here: when absent, this fails at once.
  auto       (default) digits for 8x8 images, inception otherwise.

References (--ref): 'digits' (the shipped real data, default), a folder of images, an .npz of uint8
images (arr_0, NHWC), or an .npz of precomputed statistics (mu, sigma: FID only).
"""
import argparse
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.checkpoint import load_classifier
from models.cli import check_device, check_output, exit_on_interrupt, positive_int
from models.digits import DEFAULT_CLASSIFIER, load_digits

INCEPTION_FILE = "inception-2015-12-05.pt"  # clean-fid's weights file name
INCEPTION_CACHE = Path("/tmp") / INCEPTION_FILE  # where clean-fid itself keeps it (Linux/macOS)
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".npy")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("samples", type=Path, help="folder of images or .npz of uint8 images (sample.py's samples.npz)")
parser.add_argument("--ref", default="digits", help="'digits', a folder, an images .npz or a stats .npz")
parser.add_argument("--features", choices=["auto", "digits", "inception"], default="auto")
parser.add_argument("--inception", type=Path, default=None, help=f"path of {INCEPTION_FILE} (default: clean-fid's cache)")
parser.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER, help="in-domain feature network")
parser.add_argument("--k", type=positive_int, default=3, help="neighbours for the precision/recall manifolds")
parser.add_argument("--batch-size", type=positive_int, default=256)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--out", type=Path, default=None,
                    help="JSON of all figures (default: beside the samples; an earlier report there is replaced)")
args = parser.parse_args()
device = check_device(parser, args.device)
if not args.samples.exists():
    parser.error(f"samples: {args.samples} does not exist")
out = args.out or (args.samples.with_suffix(".eval.json") if args.samples.suffix == ".npz"
                   else args.samples / "eval.json")
check_output(parser, out, inputs=[args.samples], force=True)
exit_on_interrupt("evaluate.py")


# ---- images
def read_npz(path, what):
    """Every array of an .npz, read now: a truncated file or an object array is a clear error here."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise SystemExit(f"error: {what} {path} is not a readable .npz of arrays ({e})")


def load_images(path, what):
    """uint8 [N, H, W, C] from a folder of images or an .npz (arr_0); checks sizes agree."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXT)
        if not files:
            raise SystemExit(f"error: {what} folder {path} holds no images ({', '.join(IMAGE_EXT)})")
        try:
            arrays = [np.load(f, allow_pickle=False) if f.suffix == ".npy" else np.array(Image.open(f)) for f in files]
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {what}: an image in {path} cannot be read ({e})")
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise SystemExit(f"error: {what} images have mixed sizes {sorted(shapes)[:4]}; resize them to one size first")
        images = np.stack(arrays)
    elif path.suffix == ".npz" and path.is_file():
        data = read_npz(path, what)
        if "arr_0" not in data:
            raise SystemExit(f"error: {path} has no 'arr_0' images (keys: {list(data.keys())})")
        images = data["arr_0"]
    elif not path.exists():
        raise SystemExit(f"error: {what} {path} does not exist")
    else:
        raise SystemExit(f"error: {what} must be a folder of images or an .npz, got {path}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise SystemExit(f"error: {what} must be uint8 images [N, H, W, 1|3], got {images.dtype} {list(images.shape)}")
    if len(images) < 2:
        raise SystemExit(f"error: {what} holds {len(images)} image(s); FID needs at least 2 (thousands to mean much)")
    return images


samples = load_images(args.samples, "samples")
ref_stats = None
if args.ref == "digits":
    ref = load_digits()[0].permute(0, 2, 3, 1).numpy()
    ref_name = "digits (1797 real images)"
elif args.ref.endswith(".npz") and Path(args.ref).is_file() and "mu" in (stats := read_npz(args.ref, "reference")):
    if "sigma" not in stats:
        raise SystemExit(f"error: reference {args.ref} has 'mu' but no 'sigma'")
    ref, ref_stats, ref_name = None, stats, args.ref
else:
    ref, ref_name = load_images(args.ref, "reference"), args.ref
notes = []
if ref is not None:
    if ref.shape[1:3] != samples.shape[1:3]:
        raise SystemExit(f"error: samples are {samples.shape[1]}x{samples.shape[2]} but the reference is "
                         f"{ref.shape[1]}x{ref.shape[2]}")
    if ref.shape[-1] != samples.shape[-1]:
        notes.append("grayscale images were converted to RGB (channel copies) to match the other set")
        samples, ref = (np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in (samples, ref))

# ---- the feature network, called through clean-fid's feature pipeline
features = args.features
if features == "auto":
    features = "digits" if samples.shape[1:3] == (8, 8) else "inception"

if features == "inception":
    inception_path = args.inception or INCEPTION_CACHE
    if not Path(inception_path).is_file():
        raise SystemExit(f"error: the Inception weights are not at {inception_path} and nothing is downloaded here. "
                         f"Put clean-fid's {INCEPTION_FILE} there (or pass --inception PATH), or use --features digits "
                         f"for the in-domain figures of the embedded default.")
    from cleanfid.inception_torchscript import InceptionV3W

    inception = InceptionV3W(str(Path(inception_path).parent), download=False).to(device).eval()

    def extractor(x):
        """[B, 3, 299, 299] in 0..255 -> pool3 features (2048) | class probabilities (for IS)."""
        feats = inception(x)  # clean-fid's own call for FID features
        probs = inception.base(x, return_features=False).float()  # the file returns probabilities already
        return torch.cat([feats, probs], dim=1)

    resize = None  # clean-fid's own 'clean' resize to 299x299
    split = (2048, None)  # the rest are class probabilities; no spatial features
    label = "Inception"
else:
    try:
        clf = load_classifier(args.classifier).to(device)
    except FileNotFoundError as e:
        raise SystemExit(f"error: --classifier: {e}")
    except ValueError as e:
        raise SystemExit(f"error: --classifier {args.classifier} is not a digit classifier checkpoint ({e}); "
                         f"train.py --net classifier writes one, the shipped one is {DEFAULT_CLASSIFIER}")
    if samples.shape[1:3] != (8, 8):
        raise SystemExit(f"error: the in-domain digit network takes 8x8 images, got {samples.shape[1]}x{samples.shape[2]}")
    if samples.shape[-1] == 3 and not (samples[..., :1] == samples).all():
        notes.append("RGB samples were converted to grayscale (channel mean) for the digit network")

    def extractor(x):
        """[B, 3, 8, 8] in 0..255 -> penultimate features | class probabilities | spatial map."""
        logits, feats, spatial = clf(x.mean(1, keepdim=True) / 127.5 - 1, return_features=True)
        # spatial features for sFID: the first 8 channels of the last conv map (8 x 4 x 4), as ADM's
        # sFID keeps the first 7 channels of Inception's mixed_6/conv
        return torch.cat([feats, torch.softmax(logits, 1), spatial[:, :8].flatten(1)], dim=1)

    resize = lambda a: a  # keep 8x8: no 299x299 resize for the in-domain network
    split = (clf.head.in_features, clf.head.out_features)
    label = "digits"


def clean_fid_features(images, desc):
    """Runs the extractor over the images with clean-fid's loader (files -> RGB -> resize -> 0..255)."""
    from cleanfid import fid

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, im in enumerate(images):
            files.append(os.path.join(tmp, f"{i:06d}.png"))
            Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(files[-1])
        with torch.no_grad():
            out = fid.get_files_features(files, model=extractor, num_workers=0, batch_size=args.batch_size,
                                         device=device, mode="clean", custom_fn_resize=resize, description=desc)
    n_feat, n_cls = split
    n_cls = n_cls or out.shape[1] - n_feat
    return out[:, :n_feat].astype(np.float64), out[:, n_feat:n_feat + n_cls], out[:, n_feat + n_cls:]


# ---- metrics
def inception_score(probs, eps=1e-12):
    p_y = probs.mean(0, keepdims=True)
    return float(np.exp((probs * (np.log(probs + eps) - np.log(p_y + eps))).sum(1).mean()))


def precision_recall(real, fake, k):
    """Kynkaanniemi et al. 2019: a sample is inside a manifold if it lies within the k-NN radius of
    one of the manifold's points."""
    real, fake = torch.from_numpy(real).float(), torch.from_numpy(fake).float()

    def radii(x):
        d = torch.cdist(x, x)
        return d.kthvalue(min(k + 1, len(x)), dim=1).values  # the 0th neighbour is the point itself

    def coverage(manifold, r, queries):
        return (torch.cdist(queries, manifold) <= r[None]).any(1).float().mean().item()

    return coverage(real, radii(real), fake), coverage(fake, radii(fake), real)


def frechet(a, b):
    from cleanfid import fid

    return float(fid.fid_from_feats(a, b))


fake_f, fake_p, fake_s = clean_fid_features(samples, f"{label} features: samples")
results = dict(feature_network=label, n_samples=len(samples), reference=ref_name, notes=notes)
if ref_stats is not None:
    from cleanfid import fid

    mu, sigma = np.mean(fake_f, axis=0), np.cov(fake_f, rowvar=False)
    results["fid"] = float(fid.frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"]))
    results["n_reference"] = None
else:
    real_f, real_p, real_s = clean_fid_features(ref, f"{label} features: reference")
    results["n_reference"] = len(ref)
    results["fid"] = frechet(fake_f, real_f)
    results["precision"], results["recall"] = precision_recall(real_f, fake_f, args.k)
    results["sfid"] = frechet(fake_s, real_s) if fake_s.shape[1] else None
    results["is_reference"] = inception_score(real_p)
results["is"] = inception_score(fake_p)
n_feat = fake_f.shape[1]
if min(len(samples), results["n_reference"] or 10**9) < max(n_feat, 1000):
    warnings.warn(f"FID from {len(samples)} samples and {results['n_reference'] or 'precomputed'} reference images "
                  f"is noisy" + (f" and biased high: fewer than {n_feat} images give a rank-deficient {n_feat}x{n_feat} "
                                 f"covariance" if len(samples) < n_feat else "")
                  + "; it is not comparable with figures from other sample counts")
if results.get("sfid") is None and label == "Inception":
    results["sfid_note"] = "sFID needs spatial Inception features (mixed_6/conv), which clean-fid's model does not expose"
results["k"] = args.k

prefix = "" if label == "Inception" else "in-domain "
summary = (f"{prefix}FID_{label} {results['fid']:.3f} | IS {results['is']:.3f} | "
           + (f"precision {results['precision']:.3f} | recall {results['recall']:.3f} | " if "precision" in results else "")
           + (f"sFID {results['sfid']:.3f} | " if results.get("sfid") is not None else "")
           + f"{len(samples)} samples vs {results['n_reference'] or 'precomputed'} reference ({ref_name}), "
           + f"features: {label}")
for n in notes:
    print(f"note: {n}")
print(summary)
out.write_text(json.dumps(results, indent=1))
if device.type == "cuda":
    print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")
