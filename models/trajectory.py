"""The full-precision DDIM trajectory that calibration (quantize.py), data-free distillation
(distill.py) and the eps-MSE check run along.

A batch of trajectories is fixed by (seed, sample indices): sample i draws its x_T and its class from
its own generator, so any subset of trajectories can be regenerated exactly (resume needs no RNG
state). With guidance, the UNet sees one batch holding both halves, [unconditional; conditional],
as at sampling time.
"""
import hashlib
import os
from pathlib import Path

import torch

from models.diffusion import combine_guidance, guidance_batch, is_guided, randn_per_sample, sample_generators
from models.core.quant import set_step


def fp_trajectory(model, ddim, ids, seed, guidance, device):
    """Runs the FP model along the DDIM trajectories of samples `ids` (one batch). Yields, for every
    step i, (i, UNet inputs (x, t, context), the FP UNet output on them); when the caller asks for
    the next step, the batch advances with that FP output."""
    gens = sample_generators(seed, ids)
    x = randn_per_sample(gens, model.latent_shape).to(device)
    context = uncond = None
    if model.num_classes:
        y = torch.stack([torch.randint(model.num_classes, (), generator=g) for g in gens]).to(device)
        context, uncond = model.context(y)
    guided = is_guided(context, uncond, guidance)
    for i in range(ddim.steps):
        t = torch.full((len(x),), int(ddim.timesteps[i]), device=x.device, dtype=torch.long)
        inputs = guidance_batch(x, t, context, uncond) if guided else (x, t, context)
        with torch.no_grad():
            out = model.unet(*inputs)
        yield i, inputs, out
        eps = combine_guidance(out, guidance) if guided else out
        noise = randn_per_sample(gens, x.shape[1:]).to(x) if ddim.eta > 0 else None
        x, _ = ddim.step(x, eps, i, noise)


class TeacherCache:
    """The FP teacher's side of distill.py kept on disk: for one batch of trajectories, every step's
    UNet inputs, UNet output and feature-block output. Every distillation run of a training seed (each
    arm, each multiplier of a search: the quantized model does not enter the teacher) walks the same
    trajectories, so the first run of a batch computes and writes it and the later ones read it back,
    the same tensors bit for bit, without the teacher's forward pass (about a sixth of an update on the
    embedded default). A file's name holds everything that fixes those tensors: the training seed and
    the batch's sample indices (which draw each trajectory's x_T and class), and a key of the other
    settings (the FP model, guidance, schedule, feature block, device and thread count); a run of
    another seed or with other settings writes files of its own and never reads these. Two runs
    computing the same batch at once both write it, one atomic rename after the other, with equal
    contents."""

    VERSION = 2  # 1: the file name left out the seed, so runs of different seeds read each other's batches

    def __init__(self, directory, **key):
        self.dir = Path(directory)
        self.key = hashlib.sha256(repr(sorted(dict(key, version=self.VERSION, torch=torch.__version__).items()))
                                  .encode()).hexdigest()[:16]
        self.hits = self.misses = 0

    def steps(self, model, ddim, ids, seed, guidance, device, features):
        """fp_trajectory(model, ddim, ids, ...), with features["f"] (what the caller's hook on the
        feature block stores) set to that step's feature before each step is yielded."""
        path = self.dir / f"seed{seed}_{self.key}_{ids.start}-{ids.stop}.pt"
        if path.is_file():
            self.hits += 1
            for i, (inputs, out, feature) in enumerate(torch.load(path, map_location=device, weights_only=True)):
                features["f"] = feature
                yield i, inputs, out
            return
        self.misses += 1
        kept = []
        for i, inputs, out in fp_trajectory(model, ddim, ids, seed, guidance, device):
            kept.append((inputs, out, features["f"]))  # fresh tensors every step: nothing writes into them later
            yield i, inputs, out
        # only a batch whose every step ran is written (a caller that stopped early never gets here)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(kept, tmp)
        os.replace(tmp, path)


def fp_trajectories(model, ddim, n, batch_size, seed, guidance, device):
    """fp_trajectory over samples 0..n-1, batch by batch."""
    for start in range(0, n, batch_size):
        yield from fp_trajectory(model, ddim, range(start, min(start + batch_size, n)), seed, guidance, device)


@torch.no_grad()
def eps_mse(fp_model, q_model, ddim, n, batch_size, seed, guidance, device, parts=False):
    """One-step error of the quantized model: mean squared difference of its UNet output from the
    FP model's on the FP trajectory's inputs, averaged over all steps and both guidance halves.
    parts: a dict instead, with that mean ('both') and, for a guided model, the mean over each half
    ('uncond', 'cond') and over the guided eps ('guided', what distill.py trains on by default)."""
    guided = bool(fp_model.num_classes) and guidance != 1.0
    sums = dict(both=0.0, uncond=0.0, cond=0.0, guided=0.0)
    count = 0
    for i, inputs, out in fp_trajectories(fp_model, ddim, n, batch_size, seed, guidance, device):
        set_step(q_model.unet, i)
        q_out = q_model.unet(*inputs)
        sums["both"] += (q_out - out).pow(2).sum().item()
        count += out.numel()
        if parts and guided:
            for key, a, b in zip(("uncond", "cond"), q_out.chunk(2), out.chunk(2)):
                sums[key] += (a - b).pow(2).sum().item()
            sums["guided"] += (combine_guidance(q_out, guidance) - combine_guidance(out, guidance)).pow(2).sum().item()
    if not parts:
        return sums["both"] / count
    return {k: v / (count if k == "both" else count / 2) for k, v in sums.items() if k == "both" or guided}
