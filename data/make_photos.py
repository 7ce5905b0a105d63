"""Makes data/photos.npz, the photograph model's data, from the sample photographs that the
scikit-image and scikit-learn wheels carry. Neither package is needed afterwards: the prepared file is
shipped, and train.py reads only it.

    pip download --no-deps scikit-image==0.26.0 scikit-learn==1.9.1 -d /tmp/wheels
    python data/make_photos.py --source /tmp/wheels/scikit_image-*.whl /tmp/wheels/scikit_learn-*.whl

`--source` takes wheel files or installed package folders (site-packages/skimage, .../sklearn).
Every photograph is converted to RGB (the grayscale one by copying its channel) and resized with
PIL's Lanczos filter so that its shorter side is --short-side pixels. Class i is photograph i of
PHOTOS. The last HELDOUT_FRACTION of every photograph's columns is the held-out region: no training
run sees it (models/photos.py crops training patches left of it), and the evaluation classifier's
test patches come from it.
"""
import argparse
import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

# (name, file inside the package, package, licence as the package's own docstring or README states it)
PHOTOS = [
    ("astronaut", "skimage/data/astronaut.png", "scikit-image",
     "NASA, Eileen Collins; no known copyright restrictions, public domain"),
    ("coffee", "skimage/data/coffee.png", "scikit-image", "CC0, Rachel Michetti (Pikolo Espresso Bar)"),
    ("chelsea", "skimage/data/chelsea.png", "scikit-image", "CC0, Stefan van der Walt"),
    ("rocket", "skimage/data/rocket.jpg", "scikit-image", "SpaceX, DSCOVR launch; public domain"),
    ("hubble_deep_field", "skimage/data/hubble_deep_field.jpg", "scikit-image", "NASA; public domain"),
    ("retina", "skimage/data/retina.jpg", "scikit-image", "CC0 1.0, Mikael Haggstrom (Wikimedia Commons)"),
    ("ihc", "skimage/data/ihc.png", "scikit-image", "CMMI immunohistochemistry; no known copyright restrictions"),
    ("camera", "skimage/data/camera.png", "scikit-image", "CC0, Lav Varshney (grayscale)"),
    ("china", "sklearn/datasets/images/china.jpg", "scikit-learn", "CC BY 2.0, danielbuechele (Flickr)"),
    ("flower", "sklearn/datasets/images/flower.jpg", "scikit-learn", "CC BY 2.0, vultilion (Flickr)"),
]
HELDOUT_FRACTION = 0.25


def read_member(sources, member):
    """The bytes of `member` (a path inside a package) from the first source that has it."""
    for src in sources:
        if src.suffix == ".whl":
            with zipfile.ZipFile(src) as z:
                if member in z.namelist():
                    return z.read(member)
        else:  # an installed package folder: site-packages/skimage -> member relative to its parent
            path = src.parent / member
            if path.is_file():
                return path.read_bytes()
    raise SystemExit(f"error: none of --source holds {member}; give the scikit-image and scikit-learn wheels")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, nargs="+", required=True, help="wheels or installed package folders")
    parser.add_argument("--short-side", type=int, default=160)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "photos.npz")
    args = parser.parse_args(argv)
    for s in args.source:
        if not s.exists():
            parser.error(f"--source {s} does not exist")
    arrays, meta = {}, []
    for i, (name, member, package, licence) in enumerate(PHOTOS):
        im = Image.open(io.BytesIO(read_member(args.source, member))).convert("RGB")
        scale = args.short_side / min(im.size)
        size = (round(im.size[0] * scale), round(im.size[1] * scale))
        arrays[f"photo_{i}"] = np.asarray(im.resize(size, Image.LANCZOS), dtype=np.uint8)
        meta.append(dict(cls=i, name=name, file=member, package=package, licence=licence,
                         original_size=list(Image.open(io.BytesIO(read_member(args.source, member))).size),
                         stored_size=list(size)))
        print(f"{i}: {name:18s} {size[0]}x{size[1]}  ({package}: {member})")
    meta = dict(photos=meta, heldout_fraction=HELDOUT_FRACTION, short_side=args.short_side,
                made_by="python data/make_photos.py --source <scikit-image 0.26.0 wheel> <scikit-learn 1.9.1 wheel>")
    np.savez_compressed(args.out, meta=np.array(json.dumps(meta)), **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
