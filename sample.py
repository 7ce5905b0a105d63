"""Generates images with DDIM (and classifier-free guidance for class-conditional models).

Writes <out>/images/<index>.png, <out>/grid.png and <out>/samples.npz (arr_0: uint8 [N, H, W, C],
the layout FID tools and the ADM evaluator read; labels: the class of each image, -1 if none).

    python sample.py                                   # the embedded default, 64 digits
    python sample.py --ckpt model.ckpt --config cin256-v2 --n 50 --guidance 3.0

Image i is generated from a generator seeded by (seed, i) and has class i mod num_classes (unless
--classes is given), so a seed fixes the set of images whatever the batch size.
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from models.checkpoint import load_fp_model
from models.diffusion import DDIM, ddim_sample, randn_per_sample, sample_generators
from models.digits import DEFAULT_CHECKPOINT

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ckpt", type=Path, default=DEFAULT_CHECKPOINT, help="default: the embedded digits model")
parser.add_argument("--config", default=None, help="official LDM checkpoints: cin256-v2, lsun_beds256, "
                    "lsun_churches256 or a YAML path (guessed from the weights when omitted)")
parser.add_argument("--n", type=int, default=64, help="number of images")
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
parser.add_argument("--eta", type=float, default=0.0)
parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale (1 = none)")
parser.add_argument("--classes", type=str, default=None, help="comma-separated class ids to cycle through")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--out", type=Path, default=Path("runs/samples"))
args = parser.parse_args()
if args.n < 1 or args.batch_size < 1:
    parser.error("--n and --batch-size must be positive")
device = torch.device(args.device)

# ---- load
try:
    model = load_fp_model(args.ckpt, args.config).to(device)
except (FileNotFoundError, ValueError) as e:
    parser.error(str(e))
ddim = DDIM(model.alphas_cumprod, steps=args.steps, eta=args.eta)
if model.num_classes:
    classes = [int(c) for c in args.classes.split(",")] if args.classes else list(range(model.num_classes))
    if not all(0 <= c < model.num_classes for c in classes):
        parser.error(f"--classes must be in 0..{model.num_classes - 1}")
    labels = [classes[i % len(classes)] for i in range(args.n)]
else:
    labels = [-1] * args.n

# ---- sample
images = []
for start in tqdm(range(0, args.n, args.batch_size), desc="sample"):
    ids = range(start, min(start + args.batch_size, args.n))
    gens = sample_generators(args.seed, ids)
    x_T = randn_per_sample(gens, model.latent_shape).to(device)
    context, uncond = model.context(torch.tensor([labels[i] for i in ids], device=device)) if model.num_classes else (None, None)
    z = ddim_sample(model.unet, ddim, x_T, context, uncond, args.guidance, gens)
    x = model.decode(z)
    images.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
images = torch.cat(images).numpy()

# ---- save
(args.out / "images").mkdir(parents=True, exist_ok=True)
to_pil = lambda a: Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
for i, im in enumerate(images):
    to_pil(im).save(args.out / "images" / f"{i:06d}.png")
cols = min(len(images), int(math.ceil(math.sqrt(len(images)))))
rows = int(math.ceil(len(images) / cols))
h, w, c = images.shape[1:]
grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
for i, im in enumerate(images):
    grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
zoom = max(1, 256 // max(rows * h, cols * w))  # tiny images are enlarged (nearest) for viewing
to_pil(grid).resize((cols * w * zoom, rows * h * zoom), Image.NEAREST).save(args.out / "grid.png")
np.savez(args.out / "samples.npz", arr_0=images, labels=np.array(labels, dtype=np.int64))
(args.out / "samples.json").write_text(json.dumps({**vars(args), "ckpt": str(args.ckpt), "out": str(args.out),
                                                    "n_images": len(images)}, indent=1))
print(f"wrote {len(images)} images to {args.out} (grid.png, samples.npz)")
