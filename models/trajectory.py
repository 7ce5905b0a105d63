"""The full-precision DDIM trajectory that calibration (quantize.py), data-free distillation
(distill.py) and the eps-MSE check run along.

A batch of trajectories is fixed by (seed, sample indices): sample i draws its x_T and its class from
its own generator, so any subset of trajectories can be regenerated exactly (resume needs no RNG
state). With guidance, the UNet sees one batch holding both halves, [unconditional; conditional],
as at sampling time.
"""
import torch

from models.diffusion import randn_per_sample, sample_generators


class Trajectory:
    def __init__(self, model, ddim, ids, seed, guidance, device):
        self.model, self.ddim, self.guidance = model, ddim, guidance
        self.gens = sample_generators(seed, ids)
        self.x = randn_per_sample(self.gens, model.latent_shape).to(device)
        self.context = self.uncond = None
        if model.num_classes:
            y = torch.stack([torch.randint(model.num_classes, (), generator=g) for g in self.gens]).to(device)
            self.context, self.uncond = model.context(y)
        self.guided = self.context is not None and guidance != 1.0

    def unet_inputs(self, i):
        """(x, t, context) of the UNet call at step i."""
        x = self.x
        t = torch.full((len(x),), int(self.ddim.timesteps[i]), device=x.device, dtype=torch.long)
        if self.guided:
            return torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.uncond, self.context])
        return x, t, self.context

    def combine(self, out):
        """The guided eps from a UNet output on unet_inputs()."""
        if not self.guided:
            return out
        eps_u, eps_c = out.chunk(2)
        return eps_u + self.guidance * (eps_c - eps_u)

    def advance(self, i, unet_out):
        """x_t -> x_{t-1} with the (full-precision) UNet output of step i."""
        noise = randn_per_sample(self.gens, self.x.shape[1:]).to(self.x) if self.ddim.eta > 0 else None
        self.x, _ = self.ddim.step(self.x, self.combine(unet_out), i, noise)


def trajectories(model, ddim, n, batch_size, seed, guidance, device):
    """Yields (step, Trajectory) for every step of n trajectories, batch by batch. The caller may
    use traj.unet_inputs(step); the FP model then advances the batch."""
    for start in range(0, n, batch_size):
        traj = Trajectory(model, ddim, range(start, min(start + batch_size, n)), seed, guidance, device)
        for i in range(ddim.steps):
            yield i, traj
            with torch.no_grad():
                traj.advance(i, model.unet(*traj.unet_inputs(i)))


@torch.no_grad()
def eps_mse(fp_model, q_model, ddim, n, batch_size, seed, guidance, device):
    """One-step error of the quantized model: mean squared difference of its UNet output from the
    FP model's on the FP trajectory's inputs, averaged over all steps and both guidance halves."""
    err, count = 0.0, 0
    for start in range(0, n, batch_size):
        traj = Trajectory(fp_model, ddim, range(start, min(start + batch_size, n)), seed, guidance, device)
        for i in range(ddim.steps):
            inputs = traj.unet_inputs(i)
            q_model.unet.set_step(i)
            out = fp_model.unet(*inputs)
            err += (q_model.unet(*inputs) - out).pow(2).sum().item()
            count += out.numel()
            traj.advance(i, out)
    return err / count
