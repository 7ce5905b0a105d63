"""Generates images with DDIM (and classifier-free guidance for class-conditional models) from any
checkpoint: full precision (the embedded default, an official LDM model.ckpt), quantized
(quantize.py, distill.py) or packed. A quantized model samples with per-step activation
quantization and weights dequantized once at load.

Writes <out>/samples.npz (arr_0: uint8 [N, H, W, C], the layout FID tools and the ADM evaluator read;
labels: the class of each image, -1 if none), <out>/images/<index>.png (unless --no-png) and
<out>/grid.png (the first 64 images).

    python sample.py                                   # the embedded default, 64 digits
    python sample.py --ckpt runs/quant/w2a4_omq_trd.pt --num-images 1000
    python sample.py --ckpt model.ckpt --config cin256-v2 --num-images 50000 --guidance 3.0 --no-png
    torchrun --nproc_per_node 8 sample.py --ckpt ... --num-images 50000   # each rank samples its share
    python sample.py ... --resume                      # continue a killed run: finished shards are kept
    python sample.py --ckpt runs/quant/w2a4_omq_trd.pt --kernels int8   # integer kernels (CPU)

--kernels int8 runs every quantized conv/linear on the CPU's int8 kernels (models/int8.py): uint8
activation codes times int8 weight codes, the weights held only as prepacked int8. Each layer equals
its fake-quant float computation to float rounding; across a whole sampling chain those last-bit
differences flip a few activation codes at rounding boundaries, so images differ from the float path's
as they would under any float-rounding change (docs/int8.md).

Images are made in shards of --shard-size, each written to <out>/shards/ as soon as it is done, so
memory is bounded by a shard and a killed run loses at most the shard in progress; at the end the
shards are put together into samples.npz (byte-identical to an uninterrupted run's) and removed.
Image i is generated from a generator seeded by (seed, i) and has class i mod num_classes (unless
--classes is given), so a seed fixes the set of images whatever the batch size, shard size or number
of ranks; under torchrun, rank r samples images r, r + world, ... of each shard and rank 0 writes it.
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from models.checkpoint import load_sampling_model
from models.files import save_atomic, sha256_file
from models.cli import (add_trust_flag, check_device, check_finite, check_folder, check_steps, exit_on_interrupt,
                        finite_float, init_distributed, int_list, load_resume_state, nonneg_float, plain_args, positive_int)
from models.diffusion import DDIM, ddim_sample, randn_per_sample, sample_generators, to_uint8
from models.digits import DEFAULT_CHECKPOINT
from models.int8 import convert_to_int8
from models.npz import NpzArray, write_npz
from models.safe_load import allow_pickle


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=DEFAULT_CHECKPOINT, help="default: the embedded digits model")
    parser.add_argument("--config", default=None, help="official LDM checkpoints: cin256-v2, lsun_beds256, "
                        "lsun_churches256 or a YAML path (guessed from the weights when omitted)")
    parser.add_argument("--num-images", type=positive_int, default=64)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--steps", type=positive_int, default=None, help="DDIM steps (default: 20, or the quantized model's)")
    parser.add_argument("--eta", type=nonneg_float, default=None, help="default: 0, or the quantized model's")
    parser.add_argument("--guidance", type=finite_float, default=None,
                        help="classifier-free guidance scale, 1 = none (default: 2.0, or the one a quantized model was calibrated with)")
    parser.add_argument("--classes", type=int_list, default=None, help="comma-separated class ids to cycle through")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/samples"))
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="images per shard (written as it is done)")
    parser.add_argument("--no-png", action="store_true", help="write no per-image PNGs (samples.npz and grid.png only)")
    parser.add_argument("--kernels", choices=("float", "int8"), default="float",
                        help="quantized models: fake-quantized float layers, or the CPU's int8 kernels (models/int8.py)")
    parser.add_argument("--resume", action="store_true", help="continue a killed run in --out with the same settings")
    parser.add_argument("--force", action="store_true", help="replace the images of an earlier run in --out")
    add_trust_flag(parser)
    args = parser.parse_args(argv)
    allow_pickle(args.trust_checkpoint)
    if args.steps is not None:
        check_steps(parser, args.steps)
    device = check_device(parser, args.device)
    if args.resume and args.force:
        parser.error("--resume keeps an earlier run's shards and --force deletes them: give one of them")
    shard_dir, state_path = args.out / "shards", args.out / "shards" / "run.pt"
    if args.resume and not state_path.is_file():
        parser.error(f"--resume: no unfinished run in {args.out} ({state_path} is missing); run without --resume")
    # an earlier run's images would be mixed with (or scored as) this run's
    earlier = [p for p in (args.out / "samples.npz", args.out / "grid.png", args.out / "samples.json") if p.exists()]
    for folder in (args.out / "images", shard_dir):
        if folder.is_dir():
            earlier += sorted(p for p in folder.iterdir() if p.suffix in (".png", ".npz", ".pt", ".tmp"))
    if earlier and not (args.force or args.resume):
        parser.error(f"--out {args.out} holds the images of an earlier run ({len(earlier)} files); pass --force to "
                     f"replace them, --resume to continue an unfinished run, or choose another --out")
    check_folder(parser, args.out)
    exit_on_interrupt("sample.py (finished shards are kept: continue with --resume)")

    # ---- distributed: one process per device under torchrun, else a single process
    device, rank, world = init_distributed(device)

    # ---- load
    try:
        model, kind = load_sampling_model(args.ckpt, args.config)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    model.to(device)
    steps, eta, guidance = args.steps or 20, args.eta or 0.0, 2.0 if args.guidance is None else args.guidance
    if model.quant_settings is not None:  # activation parameters exist per step of one DDIM schedule
        settings = model.quant_settings
        steps, eta = args.steps or settings["steps"], settings["eta"] if args.eta is None else args.eta
        guidance = settings.get("guidance", 2.0) if args.guidance is None else args.guidance
        if steps != settings["steps"]:
            parser.error(f"this {kind} model was calibrated for {settings['steps']} DDIM steps, not {steps}")
    if args.kernels == "int8":
        if model.quant_settings is None:
            parser.error(f"--kernels int8 runs quantized layers; {args.ckpt} is a {kind} model")
        try:
            counts = convert_to_int8(model)
        except RuntimeError as e:  # no kernels on this device or build
            parser.error(f"--kernels int8: {e}")
        if rank == 0:
            print(f"int8 kernels: {counts['int8']} layers; in float: {counts['float_not_fitting']} whose codes do not fit "
                  f"the kernels, {counts['full_precision']} full-precision by design")
    ddim = DDIM(model.alphas_cumprod, steps=steps, eta=eta)
    if model.num_classes:
        classes = args.classes or list(range(model.num_classes))
        if not all(0 <= c < model.num_classes for c in classes):
            parser.error(f"--classes must be in 0..{model.num_classes - 1}")
        labels = np.array([classes[i % len(classes)] for i in range(args.num_images)], dtype=np.int64)
    else:
        labels = np.full(args.num_images, -1, dtype=np.int64)

    # ---- the run's settings: a resumed run must have the same (the shards it keeps were made with them)
    fingerprint = dict(ckpt_sha256=sha256_file(args.ckpt), config=args.config, kernels=args.kernels, num_images=args.num_images, steps=steps,
                       eta=eta, guidance=guidance, classes=args.classes, seed=args.seed, shard_size=args.shard_size)
    shards = [range(start, min(start + args.shard_size, args.num_images))
              for start in range(0, args.num_images, args.shard_size)]
    shard_path = lambda s: shard_dir / f"shard_{s:06d}.npz"
    if args.resume:
        load_resume_state(parser, state_path, fingerprint, {"ckpt_sha256": "the --ckpt file (it changed since)"},
                          missing={"kernels": "float"})
    todo = [s for s in range(len(shards)) if not (args.resume and shard_path(s).is_file())]
    if world > 1:
        dist.barrier()  # every rank has looked at --out before rank 0 changes it
    if rank == 0:
        for p in earlier if args.force else []:  # --force: the earlier run's files go
            p.unlink()
        if args.resume:
            print(f"resuming: {len(shards) - len(todo)} of {len(shards)} shards are done")
    to_pil = lambda a: Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)

    # ---- sample: shard by shard, this rank's images of each, in batches
    def sample_images(ids):
        """uint8 [len(ids), H, W, C] images of the given indices."""
        out = []
        for start in range(0, len(ids), args.batch_size):
            batch = ids[start:start + args.batch_size]
            gens = sample_generators(args.seed, batch)
            x_T = randn_per_sample(gens, model.latent_shape).to(device)
            context, uncond = model.context(torch.from_numpy(labels[batch]).to(device)) if model.num_classes else (None, None)
            z = ddim_sample(model.unet, ddim, x_T, context, uncond, guidance, gens)
            check_finite(f"the model's output (images {batch[0]}..{batch[-1]})", z)
            out.append(to_uint8(model.decode(z)).cpu().numpy())
            bar.update(len(batch))
        return np.concatenate(out) if out else None

    bar = tqdm(total=sum(len(range(rank, len(shards[s]), world)) for s in todo), position=rank,
               desc=f"sample ({kind})" + (f", rank {rank}/{world}" if world > 1 else ""))
    t_sample = time.time()
    for s in todo:
        ids = list(shards[s])
        mine = sample_images(ids[rank::world])
        if world > 1:  # rank 0 puts every rank's images back in index order
            parts = [None] * world if rank == 0 else None
            dist.gather_object(mine, parts, dst=0)
            if rank == 0:
                mine = np.zeros((len(ids), *parts[0].shape[1:]), dtype=np.uint8)
                for r, part in enumerate(parts):
                    if part is not None:
                        mine[r::world] = part
        if rank == 0:
            if not state_path.is_file():  # with the first finished shard: a run that made nothing leaves nothing
                save_atomic(dict(fingerprint=fingerprint), state_path)
            if not args.no_png:
                (args.out / "images").mkdir(exist_ok=True)
                for i, im in zip(ids, mine):
                    to_pil(im).save(args.out / "images" / f"{i:06d}.png")
            write_npz(shard_path(s), dict(arr_0=(np.uint8, mine.shape, [mine]),
                                          labels=(np.int64, (len(ids),), [labels[ids]])))
    bar.close()
    seconds_sampling = time.time() - t_sample
    if world > 1:
        dist.destroy_process_group()
        if rank != 0:
            raise SystemExit(0)

    # ---- put the shards together, a shard in memory at a time; grid of the first 64 images
    first = NpzArray(shard_path(0))
    shape = (args.num_images, *first.shape[1:])
    write_npz(args.out / "samples.npz", dict(arr_0=(np.uint8, shape, (NpzArray(shard_path(s)).read() for s in range(len(shards)))),
                                             labels=(np.int64, (args.num_images,), [labels])))
    head = np.concatenate(list(NpzArray(args.out / "samples.npz").batches(64, stop=64)))
    cols = min(len(head), int(math.ceil(math.sqrt(len(head)))))
    rows = int(math.ceil(len(head) / cols))
    h, w, c = head.shape[1:]
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, im in enumerate(head):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    zoom = max(1, 256 // max(rows * h, cols * w))  # tiny images are enlarged (nearest) for viewing
    to_pil(grid).resize((cols * w * zoom, rows * h * zoom), Image.NEAREST).save(args.out / "grid.png")
    (args.out / "samples.json").write_text(json.dumps({**plain_args(args),
                                                        "model": kind, "steps": steps, "eta": eta, "guidance": guidance, "world_size": world,
                                                        "n_images": args.num_images, "seconds_sampling": seconds_sampling},
                                                       indent=1))
    for p in shard_dir.iterdir():  # the shards, the run's settings, and any shard a kill left half-written
        p.unlink()
    shard_dir.rmdir()
    print(f"wrote {args.num_images} images from the {kind} model to {args.out} (grid.png, samples.npz)")
    if device.type == "cuda":
        print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")


if __name__ == "__main__":
    main()
