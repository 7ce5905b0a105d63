"""The photograph model's samples beside real patches of the photograph each class asked for: one row
per class, --per-class real patches (cropped from the training columns, as training saw them) on the
left and the model's first --per-class samples of that class on the right, each patch enlarged
--zoom times (nearest neighbour).

    python sample.py --ckpt checkpoints/photo_unet.pt --num-images 100 --out runs/samples/photo_fp
    python bench/photo_grid.py runs/samples/photo_fp/samples.npz --out bench/results/photo_samples.png
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models.diffusion import to_uint8  # noqa: E402
from models.photos import load_photos, sample_patches  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", type=Path, help="sample.py's samples.npz of the photograph model")
    parser.add_argument("--per-class", type=int, default=6)
    parser.add_argument("--zoom", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7, help="the real patches' crops")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "photo_samples.png")
    args = parser.parse_args(argv)

    with np.load(args.samples) as d:
        images, labels = d["arr_0"], d["labels"]
    photos, meta = load_photos()
    gap, k, size = 8, args.per_class, images.shape[1]
    rows = []
    for c in range(len(photos)):
        mine = images[labels == c][:k]
        if len(mine) < k:
            raise SystemExit(f"error: {args.samples} holds {len(mine)} samples of class {c}; sample at least "
                             f"{k * len(photos)} images (class i mod {len(photos)})")
        real = to_uint8(sample_patches(photos, meta, k, torch.Generator().manual_seed(args.seed + c),
                                       labels=torch.full((k,), c))[0]).numpy()
        row = np.full((size, 2 * k * size + gap, 3), 255, dtype=np.uint8)
        row[:, :k * size] = np.concatenate(list(real), axis=1)
        row[:, k * size + gap:] = np.concatenate(list(mine), axis=1)
        rows.append(row)
        rows.append(np.full((2, row.shape[1], 3), 255, dtype=np.uint8))
    grid = np.concatenate(rows[:-1])
    img = Image.fromarray(grid).resize((grid.shape[1] * args.zoom, grid.shape[0] * args.zoom), Image.NEAREST)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"wrote {args.out}: {len(photos)} classes ({', '.join(p['name'] for p in meta['photos'])}), "
          f"{k} real patches | {k} samples each")


if __name__ == "__main__":
    main()
