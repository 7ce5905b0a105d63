"""Scores generated images against real ones: FID through clean-fid's feature pipeline, plus IS,
precision/recall and sFID. Every figure is reported with its sample counts, the feature network and
the pipeline that produced it.

    python evaluate.py runs/samples/samples.npz                      # embedded default vs. the real digits
    python evaluate.py runs/samples/photo/samples.npz                # photograph model vs. real patches
    python evaluate.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz --device cuda   # the papers' protocol
    python evaluate.py real_images/ --save-ref ref.npz               # a reference batch of your own (LSUN)
    python evaluate.py runs/samples/mpqdm/samples.npz --against runs/samples/fp/samples.npz   # paired fidelity

Feature networks:
  digits     the in-domain digit classifier that train.py trains and the repo ships (offline).
             Figures are labelled 'in-domain' (FID_digits etc.): never compare them with Inception FID.
  photos     the photograph model's in-domain patch classifier (32x32 RGB; shipped, offline;
             FID_photos etc.).
  inception  clean-fid's Inception (inception-2015-12-05.pt, the TensorFlow graph's weights), in
             --mode legacy_tensorflow (default: the TF pipeline, resizing inside the network, which
             the published LDM/ADM figures use) or clean (clean-fid's PIL bicubic resize). The
             weights are looked for in --inception (a file, or a folder; default clean-fid's cache
             /tmp) and, when absent from a folder, fetched there with clean-fid's own downloader.
  auto       (default) digits for 8x8 images, photos for 32x32 RGB images, inception otherwise.

References (--ref): 'auto' (default: the embedded default's real data when the features are in-domain:
'digits', the 1797 shipped digits; 'photos', PHOTO_REF_COUNT patches cropped from the training columns
of the shipped photographs with a fixed seed), a folder of images, an .npz of uint8
images (arr_0, NHWC), or a reference batch in ADM's layout: an .npz with mu/sigma (FID), optionally
mu_s/sigma_s (sFID) and arr_0 images (precision/recall), as OpenAI's VIRTUAL_*.npz files and
--save-ref write them.

Metrics: FID = Frechet distance of pool features; IS = exp E[KL(p(y|x) || p(y))] from the
network's class probabilities (Inception: the file's softmax without the output bias, as
StyleGAN2-ADA computes it), mean and std over --is-splits splits (10, as ADM and torch-fidelity);
precision/recall = Kynkaanniemi et al. 2019 with k-NN manifolds (k = --k), computed --block rows at
a time (memory: a few block x N x 4-byte distance blocks, 51 MB each for 256 x 50,000); sFID = Frechet distance of spatial
features (Inception: the first 7 channels of mixed_6/conv, 7 x 17 x 17, as ADM's evaluator).
Paired fidelity (--against FP_SAMPLES): the samples and FP_SAMPLES must be the same images of the same
seed (sample.py: image i from the generator of (seed, i), class i mod classes), one made by the
quantized model, one by the full-precision model. Per image: PSNR in pixels (decoded images for latent
models) and the Euclidean distance of the two images' pool features in the feature network; the mean
of each with a 95 % percentile-bootstrap interval over images (models/paired.py). Per-image values go to
<out stem>.paired.npz for pooling over runs (bench/reproduce.py). A pair whose sample.py records
(samples.json beside each .npz) show other seeds, counts or classes is refused.

Images are read a batch at a time (an .npz member is streamed, a folder is read file by file), so
memory grows with N only by the features.
"""
import argparse
import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.classifier import load_classifier
from models.classifier import CLASSIFIERS
from models.cli import add_trust_flag, check_device, check_output, exit_on_interrupt, positive_int
from models.digits import DEFAULT_CLASSIFIER, load_digits
from models.diffusion import to_uint8
from models.photos import PHOTO_CLASSIFIER, load_photos, sample_patches
from models.npz import NpzArray, npz_members, write_npz
from models.paired import feature_distance, format_interval, interval, psnr
from models.safe_load import UnsafeCheckpointError, allow_pickle

INCEPTION_FILE = "inception-2015-12-05.pt"  # clean-fid's weights file name
INCEPTION_CACHE = Path("/tmp")  # the folder where clean-fid itself keeps it (Linux/macOS)
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".npy")
PHOTO_REF_COUNT, PHOTO_REF_SEED = 2000, 4321  # the photograph model's reference patches
IN_DOMAIN = {"digits": DEFAULT_CLASSIFIER, "photos": PHOTO_CLASSIFIER}  # in-domain network -> shipped classifier


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", type=Path, help="folder of images or .npz of uint8 images (sample.py's samples.npz); "
                        "with --save-ref: the real images")
    parser.add_argument("--ref", default="auto",
                        help="'auto', 'digits', 'photos', a folder, an images .npz or a reference batch .npz")
    parser.add_argument("--features", choices=["auto", "digits", "photos", "inception"], default="auto")
    parser.add_argument("--mode", choices=["legacy_tensorflow", "clean"], default="legacy_tensorflow",
                        help="Inception pipeline (clean-fid's modes); the digit network needs no resize")
    parser.add_argument("--inception", type=Path, default=INCEPTION_CACHE,
                        help=f"{INCEPTION_FILE}, or the folder that holds it (fetched there when absent)")
    parser.add_argument("--classifier", type=Path, default=None,
                        help="in-domain feature network (default: the shipped one of --features)")
    parser.add_argument("--k", type=positive_int, default=3, help="neighbours for the precision/recall manifolds")
    parser.add_argument("--is-splits", type=positive_int, default=10, help="splits for the Inception Score's mean and std")
    parser.add_argument("--block", type=positive_int, default=256, help="distance-matrix rows held at once (precision/recall)")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--against", type=Path, default=None,
                        help="the full-precision model's samples of the same seed and count: per-image paired fidelity")
    parser.add_argument("--save-ref", type=Path, default=None,
                        help="write a reference batch (ADM's layout) from the images instead of evaluating them")
    parser.add_argument("--ref-images", type=positive_int, default=10_000,
                        help="with --save-ref: images kept in arr_0 for precision/recall (ADM's batches keep 10,000)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON of all figures (default: beside the samples; an earlier report there is replaced)")
    add_trust_flag(parser)
    args = parser.parse_args(argv)
    allow_pickle(args.trust_checkpoint)
    device = check_device(parser, args.device)
    if not args.samples.exists():
        parser.error(f"samples: {args.samples} does not exist")
    if args.save_ref is not None:
        if args.save_ref.suffix != ".npz":
            parser.error(f"--save-ref {args.save_ref}: the reference batch is an .npz file; name it <something>.npz")
        check_output(parser, args.save_ref, inputs=[args.samples], flag="--save-ref")
    else:
        out = args.out or (args.samples.with_suffix(".eval.json") if args.samples.suffix == ".npz"
                           else args.samples / "eval.json")
        check_output(parser, out, inputs=[args.samples], force=True)
    exit_on_interrupt("evaluate.py")

    # ---- images, read a batch at a time
    class Images:
        """uint8 images [N, H, W, C] from a folder of images, an .npz (arr_0), or an array in memory:
        .shape, len(), .batches(n, stop=None). Sizes are checked before any image is decoded."""

        def __init__(self, source, what):
            self.what, self.files, self.array = what, None, None
            path = Path(source) if not isinstance(source, np.ndarray) else None
            if path is None:
                self.array, shape = source, source.shape
            elif path.is_dir():
                self.files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXT)
                if not self.files:
                    raise SystemExit(f"error: {what} folder {path} holds no images ({', '.join(IMAGE_EXT)})")
                try:
                    shapes = {self._shape(f) for f in self.files}
                except (OSError, ValueError) as e:
                    raise SystemExit(f"error: {what}: an image in {path} cannot be read ({e})")
                if len(shapes) > 1:
                    raise SystemExit(f"error: {what} images have mixed sizes {sorted(shapes)[:4]}; resize them to one size first")
                shape = (len(self.files), *shapes.pop())
            elif path.suffix == ".npz" and path.is_file():
                members = from_npz(what, path, lambda: npz_members(path))
                if "arr_0" not in members:
                    raise SystemExit(f"error: {path} has no 'arr_0' images (keys: {members})")
                self.array = from_npz(what, path, lambda: NpzArray(path, "arr_0"))
                shape = self.array.shape
            elif not path.exists():
                raise SystemExit(f"error: {what} {path} does not exist")
            else:
                raise SystemExit(f"error: {what} must be a folder of images or an .npz, got {path}")
            shape = tuple(shape) + ((1,) if len(shape) == 3 else ())
            dtype = np.uint8 if self.files else self.array.dtype
            if len(shape) != 4 or shape[-1] not in (1, 3) or dtype != np.uint8:
                raise SystemExit(f"error: {what} must be uint8 images [N, H, W, 1|3], got {dtype} {list(shape)}")
            if shape[0] < 2:
                raise SystemExit(f"error: {what} holds {shape[0]} image(s); FID needs at least 2 (thousands to mean much)")
            self.shape = shape

        @staticmethod
        def _shape(f):
            if f.suffix == ".npy":
                a = np.load(f, mmap_mode="r", allow_pickle=False)
                return a.shape if a.ndim == 3 else (*a.shape, 1)
            with Image.open(f) as im:
                return (im.height, im.width, 1 if im.mode == "L" else 3)

        @staticmethod
        def _read(f):
            if f.suffix == ".npy":
                return np.load(f, allow_pickle=False)
            with Image.open(f) as im:
                return np.array(im if im.mode in ("L", "RGB") else im.convert("RGB"))

        def __len__(self):
            return self.shape[0]

        def batches(self, batch_size, stop=None):
            stop = len(self) if stop is None else min(stop, len(self))
            if self.files is not None:
                for i in range(0, stop, batch_size):
                    try:
                        yield np.stack([self._read(f) for f in self.files[i:min(i + batch_size, stop)]]).reshape(-1, *self.shape[1:])
                    except (OSError, ValueError) as e:
                        raise SystemExit(f"error: {self.what}: an image in {self.files[i].parent} cannot be read ({e})")
            elif isinstance(self.array, np.ndarray):
                for i in range(0, stop, batch_size):
                    yield self.array[i:min(i + batch_size, stop)].reshape(-1, *self.shape[1:])
            else:  # streamed from the archive: a file truncated further on is an error line there
                batches = self.array.batches(batch_size, stop=stop)
                while (b := from_npz(self.what, self.array.path, lambda: next(batches, None))) is not None:
                    yield b.reshape(-1, *self.shape[1:])

    def from_npz(what, path, read):
        """read(): a look-up in an .npz; a truncated or foreign file becomes one error line."""
        try:
            return read()
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise SystemExit(f"error: {what} {path} is not a readable .npz of arrays ({e})")

    def sampling_record(path):
        """How sample.py made an .npz, from the samples.json it writes beside it: 'seed s, N images, classes
        C', which fixes image i's noise and class; None where there is no such record."""
        record = Path(path).parent / "samples.json"
        if Path(path).suffix != ".npz" or not record.is_file():
            return None
        r = json.loads(record.read_text())
        return f"seed {r['seed']}, {r['n_images']} images, classes {r.get('classes') or 'all'}"

    notes = []
    samples = Images(args.samples, "samples" if args.save_ref is None else "images")
    against = None
    if args.against is not None:  # the pairing is checked before any image goes through the network
        if args.save_ref is not None:
            parser.error("--against scores samples against another model's; it does not go with --save-ref")
        against = Images(args.against, "--against")
        if against.shape != samples.shape:
            raise SystemExit(f"error: --against holds {len(against)} images of {list(against.shape[1:])}, the samples "
                             f"{len(samples)} of {list(samples.shape[1:])}: a paired comparison needs the same images, "
                             f"made from the same seed and count")
        mine, theirs = sampling_record(args.samples), sampling_record(args.against)
        if mine is None or theirs is None:
            notes.append("no sample.py record (samples.json) beside one of the paired sets: their seeds were not checked")
        elif mine != theirs:
            raise SystemExit(f"error: --against was sampled with {theirs}; the samples with {mine}: image i of one is not "
                             f"image i of the other, so they cannot be paired")
    # an embedded default's image size: its in-domain network and its real data are the defaults
    embedded = next((name for name, (_, shape) in CLASSIFIERS.items() if tuple(samples.shape[1:3]) == shape[1:]), None)
    features = args.features if args.features != "auto" else (embedded or "inception")
    ref_kind = args.ref
    if ref_kind == "auto" and args.save_ref is None:
        if embedded is None:
            parser.error("--ref: these images are not an embedded default's size; give the reference (a folder, an "
                         "images .npz or a reference batch .npz)")
        ref_kind = embedded
    ref, ref_stats, ref_meta, ref_name = None, None, None, None
    if args.save_ref is not None:
        pass
    elif ref_kind == "digits":
        ref, ref_name = Images(load_digits()[0].permute(0, 2, 3, 1).numpy(), "reference"), "digits (1797 real images)"
    elif ref_kind == "photos":
        photo_list, photo_meta = load_photos()
        patches = sample_patches(photo_list, photo_meta, PHOTO_REF_COUNT, torch.Generator().manual_seed(PHOTO_REF_SEED))[0]
        ref = Images(to_uint8(patches).numpy(), "reference")
        ref_name = f"photos ({PHOTO_REF_COUNT} real patches of the training columns, seed {PHOTO_REF_SEED})"
    elif args.ref.endswith(".npz") and Path(args.ref).is_file() and "mu" in (members := from_npz("reference", args.ref, lambda: npz_members(args.ref))):
        if "sigma" not in members:
            raise SystemExit(f"error: reference {args.ref} has 'mu' but no 'sigma'")
        ref_stats = {k: from_npz("reference", args.ref, lambda k=k: NpzArray(args.ref, k).read())
                     for k in ("mu", "sigma", "mu_s", "sigma_s") if k in members}
        ref_meta = (json.loads(str(from_npz("reference", args.ref, lambda: NpzArray(args.ref, "meta").read())))
                    if "meta" in members else None)
        ref = Images(args.ref, "reference") if "arr_0" in members else None
        ref_name = args.ref
    else:
        ref, ref_name = Images(args.ref, "reference"), args.ref
    if ref is not None:
        if ref.shape[1:3] != samples.shape[1:3]:
            raise SystemExit(f"error: samples are {samples.shape[1]}x{samples.shape[2]} but the reference is "
                             f"{ref.shape[1]}x{ref.shape[2]}")
        if ref.shape[-1] != samples.shape[-1]:
            notes.append("grayscale images were converted to RGB (channel copies) to match the other set")

    # ---- the feature network; images reach it through clean-fid's own per-image pipeline

    def inception_weights(where):
        """The weights file: `where` itself, or INCEPTION_FILE in the folder `where`, fetched there with
        clean-fid's downloader when absent (into a temporary name first: a broken download leaves nothing)."""
        if not where.is_dir():
            if where.is_file():
                return where
            parser.error(f"--inception {where}: no such file or folder (give {INCEPTION_FILE} or its folder)")
        path = where / INCEPTION_FILE
        if path.is_file():
            return path
        from cleanfid.downloads_helper import check_download_inception, inception_url

        print(f"fetching the Inception weights to {path} with clean-fid's downloader ({inception_url})")
        try:
            with tempfile.TemporaryDirectory(dir=where) as tmp:
                os.replace(check_download_inception(fpath=tmp), path)
        except Exception as e:  # offline: URLError at once
            raise SystemExit(f"error: the Inception weights are not at {path} and could not be downloaded "
                             f"({type(e).__name__}: {e}). Download {inception_url} there (or anywhere, then pass "
                             f"--inception PATH), or use --features digits for the in-domain figures of the embedded "
                             f"default.")
        return path

    def mixed_6_conv(inception, x299):
        """ADM's sFID features: the first 7 channels of mixed_6/conv (17 x 17), flattened in TF's HWC
        order, from normalised 299x299 input. clean-fid's TorchScript file names its layers after the TF
        graph, so mixed_6's 'conv' is the branch ADM reads."""
        h = x299
        for name, layer in inception.layers.named_children():
            if name == "mixed_6":
                return layer.conv(h)[:, :7].permute(0, 2, 3, 1).flatten(1)
            h = layer(h)
        raise ValueError("this Inception file has no layer mixed_6")

    if features == "inception":
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        weights = inception_weights(args.inception)
        if weights.name != INCEPTION_FILE:
            raise SystemExit(f"error: --inception {weights}: clean-fid loads the weights by the name {INCEPTION_FILE}; "
                             f"rename the file or give its folder")
        sha = hashlib.sha256(weights.read_bytes()).hexdigest()
        legacy = args.mode == "legacy_tensorflow"
        inception = InceptionV3W(str(weights.parent), download=False, resize_inside=legacy).to(device).eval()
        # sFID reads mixed_6/conv, where the file has it and our 299x299 input reproduces the network's own
        # (checked on the first batch)
        spatial_ok = [None if any(n == "mixed_6" for n, _ in inception.layers.named_children()) else False]

        def extractor(x):
            """[B, 3, H, W] in 0..255 (299x299 in clean mode) -> pool features, class probabilities, spatial."""
            pool = inception(x)  # clean-fid's own call for FID features
            probs = inception.base(x, return_features=False, no_output_bias=True).float()  # probabilities already
            x299 = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) if legacy else x
            x299 = (x299 - 128) / 128
            if spatial_ok[0] is None:  # the TF graph resizes inside; our spatial path must see what it sees
                again = inception.layers(x299).reshape(len(x), -1)
                spatial_ok[0] = bool(torch.allclose(again, pool, rtol=1e-4, atol=1e-4))
            spatial = mixed_6_conv(inception, x299) if spatial_ok[0] else torch.zeros(len(x), 0, device=x.device)
            return pool, probs, spatial

        fn_resize = build_resizer(args.mode)
        network = dict(feature_network="Inception", mode=args.mode, weights=INCEPTION_FILE, weights_sha256=sha)
        label = "Inception"
    else:
        classifier = args.classifier or IN_DOMAIN[features]
        try:
            clf, arch = load_classifier(classifier, with_arch=True)
            clf = clf.to(device)
        except (FileNotFoundError, UnsafeCheckpointError) as e:
            raise SystemExit(f"error: --classifier: {e}")
        except ValueError as e:
            raise SystemExit(f"error: --classifier {classifier} is not a {features.rstrip('s')} classifier checkpoint ({e}); "
                             f"train.py --data {features} --net classifier writes one, the shipped one is {IN_DOMAIN[features]}")
        if arch != features:
            raise SystemExit(f"error: --classifier {classifier} is the {arch} network, not the {features} one")
        channels, size = CLASSIFIERS[features][1][0], CLASSIFIERS[features][1][1:]
        if tuple(samples.shape[1:3]) != size:
            raise SystemExit(f"error: the in-domain {features} network takes {size[0]}x{size[1]} images, "
                             f"got {samples.shape[1]}x{samples.shape[2]}")

        def extractor(x):
            """[B, 3, H, W] in 0..255 -> penultimate features, class probabilities, spatial map."""
            if channels == 1:
                gray = x.mean(1, keepdim=True)
                if not torch.equal(gray.expand_as(x), x) and not any("grayscale" in n for n in notes):
                    notes.append("RGB samples were converted to grayscale (channel mean) for the digit network")
                x = gray
            logits, feats, spatial = clf(x / 127.5 - 1, return_features=True)
            # spatial features for sFID: the first 8 channels of the last conv map (8 x 4 x 4), as ADM's
            # sFID keeps the first 7 channels of Inception's mixed_6/conv
            return feats, torch.softmax(logits, 1), spatial[:, :8].flatten(1)

        fn_resize = lambda a: a  # keep the size: no 299x299 resize for an in-domain network
        network = dict(feature_network=features, mode=None, weights=str(classifier),
                       weights_sha256=hashlib.sha256(Path(classifier).read_bytes()).hexdigest())
        label = features

    def network_features(images, desc):
        """(pool float64 [N, D], probabilities [N, K], spatial float64 [N, S]) of every image, a batch at
        a time, each image through clean-fid's own loader steps (RGB, resize, ToTensor * 255)."""
        from cleanfid.utils import ResizeDataset
        from tqdm import tqdm

        to_tensor = ResizeDataset([], mode="clean").transforms  # clean-fid's ToTensor
        parts = [[], [], []]
        with tqdm(total=len(images), desc=desc) as bar:
            for batch in images.batches(args.batch_size):
                if batch.shape[-1] == 1:
                    batch = np.repeat(batch, 3, axis=-1)  # what clean-fid's .convert('RGB') does to grayscale
                resized = [fn_resize(im) for im in batch]
                x = torch.stack([to_tensor(np.array(r)) * 255 if r.dtype == np.uint8 else to_tensor(r) for r in resized])
                with torch.no_grad():
                    for part, value in zip(parts, extractor(x.to(device))):
                        part.append(value.cpu().numpy())
                bar.update(len(batch))
        pool, probs, spatial = (np.concatenate(p) for p in parts)
        return pool.astype(np.float64), probs, spatial.astype(np.float64)

    # ---- metrics
    def stats(f):
        return np.mean(f, axis=0), np.cov(f, rowvar=False)

    def frechet(a, b):
        from cleanfid import fid

        return float(fid.frechet_distance(*a, *b))

    def inception_score(probs, splits, eps=1e-12):
        """Mean and std over `splits` equal parts (the last part takes the remainder), each
        exp(mean KL(p(y|x) || p(y))) with p(y) that part's mean."""
        scores = []
        for part in np.array_split(probs.astype(np.float64), min(splits, len(probs))):
            p_y = part.mean(0, keepdims=True)
            scores.append(float(np.exp((part * (np.log(part + eps) - np.log(p_y + eps))).sum(1).mean())))
        return float(np.mean(scores)), float(np.std(scores))

    def precision_recall(real, fake, k, block):
        """Kynkaanniemi et al. 2019: a sample is inside a manifold if it lies within the k-NN radius of
        one of the manifold's points. Distances are computed `block` rows at a time."""
        real, fake = torch.from_numpy(real).float(), torch.from_numpy(fake).float()

        def radii(x):
            return torch.cat([torch.cdist(x[i:i + block], x).kthvalue(min(k + 1, len(x)), dim=1).values
                              for i in range(0, len(x), block)])  # the 0th neighbour is the point itself

        def coverage(manifold, r, queries):
            inside = [(torch.cdist(queries[i:i + block], manifold) <= r[None]).any(1) for i in range(0, len(queries), block)]
            return torch.cat(inside).float().mean().item()

        return coverage(real, radii(real), fake), coverage(fake, radii(fake), real)

    fake_f, fake_p, fake_s = network_features(samples, f"{label} features: " + ("images" if args.save_ref else "samples"))

    # ---- --save-ref: a reference batch in ADM's layout, and nothing else
    if args.save_ref is not None:
        keep = min(len(samples), args.ref_images)
        members = dict(mu=stats(fake_f)[0], sigma=stats(fake_f)[1])
        if fake_s.shape[1]:
            members["mu_s"], members["sigma_s"] = stats(fake_s)
        meta = dict(network, n_images=len(samples), n_kept=keep, source=str(args.samples))
        write_npz(args.save_ref, {**{k: (v.dtype, v.shape, [v]) for k, v in members.items()},
                                  "arr_0": (np.uint8, (keep, *samples.shape[1:]), samples.batches(args.batch_size, stop=keep)),
                                  "meta": (np.dtype(f"<U{len(json.dumps(meta))}"), (), [np.array(json.dumps(meta))])})
        print(f"wrote {args.save_ref}: statistics of {len(samples)} images ({label} features"
              + (f", {args.mode}" if args.mode and label == "Inception" else "") + f"), {keep} images kept in arr_0")
        raise SystemExit(0)

    results = dict(network, n_samples=len(samples), reference=ref_name, notes=notes)
    if ref_stats is not None:
        if ref_meta is not None and (ref_meta["feature_network"], ref_meta["mode"], ref_meta["weights_sha256"]) != \
                (network["feature_network"], network["mode"], network["weights_sha256"]):
            raise SystemExit(f"error: reference {ref_name} was made with {ref_meta['feature_network']} features "
                             f"(mode {ref_meta['mode']}, weights sha256 {ref_meta['weights_sha256'][:12]}...), these "
                             f"samples with {label} (mode {network['mode']}, {network['weights_sha256'][:12]}...): "
                             f"their figures would not be comparable")
        if ref_meta is None:
            if label != "Inception" or args.mode != "legacy_tensorflow":
                raise SystemExit(f"error: reference {ref_name} holds statistics without a record of how they were made; "
                                 f"they are taken as ADM's (TensorFlow Inception), which only --features inception "
                                 f"--mode legacy_tensorflow reproduces: anything else would mix two pipelines")
            notes.append("reference statistics without a record of their pipeline: taken as ADM's TensorFlow Inception")
        if ref_stats["mu"].shape != (fake_f.shape[1],):
            raise SystemExit(f"error: reference {ref_name} has {ref_stats['mu'].shape[0]}-dimensional statistics, "
                             f"the {label} features {fake_f.shape[1]}")
        results["fid"] = frechet(stats(fake_f), (ref_stats["mu"], ref_stats["sigma"]))
        results["n_reference"] = int(ref_meta["n_images"]) if ref_meta else None
        results["sfid"] = (frechet(stats(fake_s), (ref_stats["mu_s"], ref_stats["sigma_s"]))
                           if "mu_s" in ref_stats and fake_s.shape[1] == ref_stats["mu_s"].shape[0] else None)
    if ref is not None:
        real_f, real_p, real_s = network_features(ref, f"{label} features: reference")
        if ref_stats is None:
            results["n_reference"] = len(ref)
            results["fid"] = frechet(stats(fake_f), stats(real_f))
            results["sfid"] = frechet(stats(fake_s), stats(real_s)) if fake_s.shape[1] else None
        results["precision"], results["recall"] = precision_recall(real_f, fake_f, args.k, args.block)
        results["n_reference_pr"] = len(ref)
        results["is_reference"], results["is_reference_std"] = inception_score(real_p, args.is_splits)
    results["is"], results["is_std"] = inception_score(fake_p, args.is_splits)
    results["is_splits"] = min(args.is_splits, len(samples))
    n_feat = fake_f.shape[1]
    if min(len(samples), results["n_reference"] or 10**9) < max(n_feat, 1000):
        warnings.warn(f"FID from {len(samples)} samples and {results['n_reference'] or 'precomputed'} reference images "
                      f"is noisy" + (f" and biased high: fewer than {n_feat} images give a rank-deficient {n_feat}x{n_feat} "
                                     f"covariance" if len(samples) < n_feat else "")
                      + "; it is not comparable with figures from other sample counts")
    if results.get("sfid") is None and label == "Inception":
        results["sfid_note"] = ("the reference has no spatial statistics (mu_s, sigma_s)" if spatial_ok[0] else
                                "this Inception file has no layer mixed_6, or our 299x299 input did not reproduce the "
                                "network's own pool features: mixed_6/conv was not read")
    results["k"] = args.k
    if against is not None:
        against_f = network_features(against, f"{label} features: --against")[0]
        per_image = dict(psnr=np.concatenate([psnr(a, b) for a, b in zip(samples.batches(args.batch_size),
                                                                          against.batches(args.batch_size))]),
                         feature_distance=feature_distance(fake_f, against_f))
        results["paired"] = dict(against=str(args.against), n_images=len(samples),
                                 **{k: interval([v]) for k, v in per_image.items()})
        paired_path = out.with_name(out.name.removesuffix(".json") + ".paired.npz")
        write_npz(paired_path, {k: (np.float64, v.shape, [v]) for k, v in per_image.items()})

    prefix = "" if label == "Inception" else "in-domain "
    summary = (f"{prefix}FID_{label} {results['fid']:.3f} | IS {results['is']:.3f} +- {results['is_std']:.3f} | "
               + (f"precision {results['precision']:.3f} | recall {results['recall']:.3f} | " if "precision" in results else "")
               + (f"sFID {results['sfid']:.3f} | " if results.get("sfid") is not None else "")
               + f"{len(samples)} samples vs {results['n_reference'] or 'precomputed'} reference ({ref_name}), "
               + f"features: {label}" + (f" ({args.mode})" if label == "Inception" else ""))
    for n in notes:
        print(f"note: {n}")
    print(summary)
    if against is not None:
        p = results["paired"]
        print(f"paired with {args.against} (image i against image i): PSNR {format_interval(p['psnr'])} dB | "
              f"{label} feature distance {format_interval(p['feature_distance'], '.4f')} (mean [95 % bootstrap interval over "
              f"{len(samples)} images]); per image: {paired_path}")
    out.write_text(json.dumps(results, indent=1))
    if device.type == "cuda":
        print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")


if __name__ == "__main__":
    main()
