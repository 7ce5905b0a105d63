"""Generates images with DDIM (and classifier-free guidance for class-conditional models) from any
checkpoint: full precision (the embedded default, an official LDM model.ckpt), quantized
(quantize.py, distill.py) or packed. A quantized model samples with per-step activation
quantization and weights dequantized once at load.

Writes <out>/images/<index>.png, <out>/grid.png and <out>/samples.npz (arr_0: uint8 [N, H, W, C],
the layout FID tools and the ADM evaluator read; labels: the class of each image, -1 if none).

    python sample.py                                   # the embedded default, 64 digits
    python sample.py --ckpt runs/quant/w2a4_omq_trd.pt --num-images 1000
    python sample.py --ckpt model.ckpt --config cin256-v2 --num-images 50 --guidance 3.0
    torchrun --nproc_per_node 8 sample.py --ckpt ... --num-images 50000   # each rank samples its share

Image i is generated from a generator seeded by (seed, i) and has class i mod num_classes (unless
--classes is given), so a seed fixes the set of images whatever the batch size or number of ranks;
under torchrun, rank r samples images r, r + world, ... and rank 0 gathers and writes them all.
"""
import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from models.checkpoint import load_sampling_model
from models.diffusion import DDIM, ddim_sample, randn_per_sample, sample_generators
from models.digits import DEFAULT_CHECKPOINT

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ckpt", type=Path, default=DEFAULT_CHECKPOINT, help="default: the embedded digits model")
parser.add_argument("--config", default=None, help="official LDM checkpoints: cin256-v2, lsun_beds256, "
                    "lsun_churches256 or a YAML path (guessed from the weights when omitted)")
parser.add_argument("--num-images", type=int, default=64)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 20, or the quantized model's)")
parser.add_argument("--eta", type=float, default=None, help="default: 0, or the quantized model's")
parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale (1 = none)")
parser.add_argument("--classes", type=str, default=None, help="comma-separated class ids to cycle through")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--out", type=Path, default=Path("runs/samples"))
args = parser.parse_args()
if args.num_images < 1 or args.batch_size < 1:
    parser.error("--num-images and --batch-size must be positive")
if args.num_images < int(os.environ.get("WORLD_SIZE", "1")):
    parser.error("--num-images must be at least the number of processes")

# ---- distributed: one process per device under torchrun, else a single process
world = int(os.environ.get("WORLD_SIZE", "1"))
rank = 0
if world > 1:
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = dist.get_rank()
    if args.device == "cuda":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
device = torch.device(args.device)

# ---- load
try:
    model, kind = load_sampling_model(args.ckpt, args.config)
except (FileNotFoundError, ValueError) as e:
    parser.error(str(e))
model.to(device)
steps, eta = args.steps or 20, args.eta or 0.0
if kind != "full precision":  # activation parameters exist per step of one DDIM schedule
    settings = model.unet.settings
    steps, eta = args.steps or settings["steps"], settings["eta"] if args.eta is None else args.eta
    if steps != settings["steps"]:
        parser.error(f"this {kind} model was calibrated for {settings['steps']} DDIM steps, not {steps}")
ddim = DDIM(model.alphas_cumprod, steps=steps, eta=eta)
if model.num_classes:
    classes = [int(c) for c in args.classes.split(",")] if args.classes else list(range(model.num_classes))
    if not all(0 <= c < model.num_classes for c in classes):
        parser.error(f"--classes must be in 0..{model.num_classes - 1}")
    labels = [classes[i % len(classes)] for i in range(args.num_images)]
else:
    labels = [-1] * args.num_images

# ---- sample: this rank's images, in batches
mine = list(range(rank, args.num_images, world))
images = []
for start in tqdm(range(0, len(mine), args.batch_size), desc=f"sample ({kind})", disable=rank != 0):
    ids = mine[start:start + args.batch_size]
    gens = sample_generators(args.seed, ids)
    x_T = randn_per_sample(gens, model.latent_shape).to(device)
    context, uncond = model.context(torch.tensor([labels[i] for i in ids], device=device)) if model.num_classes else (None, None)
    z = ddim_sample(model.unet, ddim, x_T, context, uncond, args.guidance, gens)
    x = model.decode(z)
    images.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
images = torch.cat(images).numpy() if images else np.zeros((0,), np.uint8)
if world > 1:  # rank 0 puts every rank's images back in index order
    parts = [None] * world if rank == 0 else None
    dist.gather_object(images, parts, dst=0)
    if rank == 0:
        images = np.zeros((args.num_images, *parts[0].shape[1:]), dtype=np.uint8)
        for r, part in enumerate(parts):
            images[r::world] = part
    dist.destroy_process_group()
    if rank != 0:
        raise SystemExit(0)

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
                                                    "model": kind, "steps": steps, "eta": eta, "world_size": world,
                                                    "n_images": len(images)}, indent=1))
print(f"wrote {len(images)} images from the {kind} model to {args.out} (grid.png, samples.npz)")
