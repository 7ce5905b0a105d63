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
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from models.checkpoint import load_sampling_model
from models.cli import (check_device, check_finite, check_folder, check_steps, exit_on_interrupt, finite_float,
                        int_list, nonneg_float, positive_int)
from models.diffusion import DDIM, ddim_sample, randn_per_sample, sample_generators, to_uint8
from models.digits import DEFAULT_CHECKPOINT

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ckpt", type=Path, default=DEFAULT_CHECKPOINT, help="default: the embedded digits model")
parser.add_argument("--config", default=None, help="official LDM checkpoints: cin256-v2, lsun_beds256, "
                    "lsun_churches256 or a YAML path (guessed from the weights when omitted)")
parser.add_argument("--num-images", type=positive_int, default=64)
parser.add_argument("--batch-size", type=positive_int, default=64)
parser.add_argument("--steps", type=positive_int, default=None, help="DDIM steps (default: 20, or the quantized model's)")
parser.add_argument("--eta", type=nonneg_float, default=None, help="default: 0, or the quantized model's")
parser.add_argument("--guidance", type=finite_float, default=2.0, help="classifier-free guidance scale (1 = none)")
parser.add_argument("--classes", type=int_list, default=None, help="comma-separated class ids to cycle through")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--out", type=Path, default=Path("runs/samples"))
parser.add_argument("--force", action="store_true", help="replace the images of an earlier run in --out")
args = parser.parse_args()
world = int(os.environ.get("WORLD_SIZE", "1"))
if args.num_images < world:
    parser.error("--num-images must be at least the number of processes")
if args.steps is not None:
    check_steps(parser, args.steps)
device = check_device(parser, args.device)
# an earlier run's images would be mixed with (or scored as) this run's
earlier = [p for p in (args.out / "samples.npz", args.out / "grid.png") if p.exists()]
if (args.out / "images").is_dir():
    earlier += sorted((args.out / "images").glob("*.png"))
if earlier and not args.force:
    parser.error(f"--out {args.out} holds the images of an earlier run ({len(earlier)} files); pass --force to "
                 f"replace them, or choose another --out")
check_folder(parser, args.out)
exit_on_interrupt("sample.py")

# ---- distributed: one process per device under torchrun, else a single process
rank = 0
if world > 1:
    if device.type == "cuda":  # each rank its own GPU, before NCCL binds to the current one
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()

# ---- load
try:
    model, kind = load_sampling_model(args.ckpt, args.config)
except (FileNotFoundError, ValueError) as e:
    parser.error(str(e))
model.to(device)
steps, eta = args.steps or 20, args.eta or 0.0
if model.quant_settings is not None:  # activation parameters exist per step of one DDIM schedule
    settings = model.quant_settings
    steps, eta = args.steps or settings["steps"], settings["eta"] if args.eta is None else args.eta
    if steps != settings["steps"]:
        parser.error(f"this {kind} model was calibrated for {settings['steps']} DDIM steps, not {steps}")
ddim = DDIM(model.alphas_cumprod, steps=steps, eta=eta)
if model.num_classes:
    classes = args.classes or list(range(model.num_classes))
    if not all(0 <= c < model.num_classes for c in classes):
        parser.error(f"--classes must be in 0..{model.num_classes - 1}")
    labels = [classes[i % len(classes)] for i in range(args.num_images)]
else:
    labels = [-1] * args.num_images

# ---- sample: this rank's images, in batches
mine = list(range(rank, args.num_images, world))
images = []
t_sample = time.time()
for start in tqdm(range(0, len(mine), args.batch_size), desc=f"sample ({kind})", disable=rank != 0):
    ids = mine[start:start + args.batch_size]
    gens = sample_generators(args.seed, ids)
    x_T = randn_per_sample(gens, model.latent_shape).to(device)
    context, uncond = model.context(torch.tensor([labels[i] for i in ids], device=device)) if model.num_classes else (None, None)
    z = ddim_sample(model.unet, ddim, x_T, context, uncond, args.guidance, gens)
    check_finite(f"the model's output (images {ids[0]}..{ids[-1]})", z)
    x = model.decode(z)
    images.append(to_uint8(x).cpu())
images = torch.cat(images).numpy() if images else np.zeros((0,), np.uint8)
seconds_sampling = time.time() - t_sample
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
for p in earlier:  # --force: the earlier run's files go
    p.unlink()
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
                                                    "n_images": len(images), "seconds_sampling": seconds_sampling},
                                                   indent=1))
print(f"wrote {len(images)} images from the {kind} model to {args.out} (grid.png, samples.npz)")
if device.type == "cuda":
    print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")
