"""The noise schedule and DDIM sampling (with eta and classifier-free guidance) of latent diffusion.

Determinism: every sample owns a torch.Generator seeded from (seed, sample index), and all of its
noise (the starting x_T and, with eta > 0, each step's noise) comes from that generator. The images
for a given seed are therefore the same whatever the batch size or the number of processes.
"""
import numpy as np
import torch

from models.core.quant import set_step
from models.seeds import generator_seeds


def linear_alphas_cumprod(timesteps=1000, linear_start=0.0015, linear_end=0.0195):
    """LDM's 'linear' schedule: linear in sqrt(beta), computed in float64 and stored as float32."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas.numpy(), axis=0)
    return torch.tensor(alphas_cumprod, dtype=torch.float32)


def ddim_timesteps(steps, train_timesteps=1000):
    """LDM's 'uniform' DDIM discretisation (make_ddim_timesteps): every c = T // steps-th timestep
    from 0, shifted by one (t = 1, 51, ..., 951 for 20 of 1000). Where c does not divide T this
    gives more than `steps` timesteps, as the official sampler runs them (7 steps: 8, up to t = 995);
    where the last one would pass T - 1 (3 or 300 steps of 1000) the official code fails, and so
    does this, with a message."""
    if not 1 <= steps <= train_timesteps:
        raise ValueError(f"DDIM steps must be in 1..{train_timesteps}, got {steps}")
    c = train_timesteps // steps
    ts = np.arange(0, train_timesteps, c) + 1
    if ts[-1] >= train_timesteps:
        raise ValueError(f"{steps} DDIM steps: the official uniform schedule (every {c}th of {train_timesteps} "
                         f"timesteps, shifted by one) would end at t = {ts[-1]}, past the last timestep "
                         f"{train_timesteps - 1}; choose another count (e.g. 10, 20, 25, 50, 100, 200, 250)")
    return ts


class DDIM:
    """The DDIM update of LDM's DDIMSampler. Step i (0-based, in sampling order) uses timestep
    `timesteps[i]`, running from the noisiest to the cleanest. `steps` is the number of steps run,
    which is the requested count except where it does not divide the training steps (see
    ddim_timesteps); `requested` keeps the count asked for."""

    def __init__(self, alphas_cumprod, steps=20, eta=0.0):
        ts = ddim_timesteps(steps, len(alphas_cumprod))
        ac = alphas_cumprod.double()
        a = ac[ts]
        a_prev = torch.cat([ac[:1], ac[ts[:-1]]])
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        # sampling order: noisiest first
        self.timesteps = torch.tensor(ts[::-1].copy())
        self.alpha, self.alpha_prev, self.sigma = (v.flip(0).float() for v in (a, a_prev, sigma))
        self.steps, self.requested, self.eta = len(ts), steps, eta

    def step(self, x, eps, i, noise=None):
        """x_t -> x_{t-1} given the model's eps; returns (x_prev, pred_x0)."""
        a, a_prev, sigma = self.alpha[i], self.alpha_prev[i], self.sigma[i]
        pred_x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x_prev = a_prev.sqrt() * pred_x0 + (1 - a_prev - sigma ** 2).sqrt() * eps
        if self.eta > 0:
            x_prev = x_prev + sigma * noise
        return x_prev, pred_x0


def to_uint8(x):
    """Images in [-1, 1] ([B, C, H, W]) -> uint8 [B, H, W, C] as the official sampling scripts make
    them: 255 * clamp((x + 1) / 2, 0, 1), truncated (not rounded) by the cast, so that FID is
    computed on the same pixels as the published figures."""
    return (255.0 * torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0)).to(torch.uint8).permute(0, 2, 3, 1)


def sample_generators(seed, indices):
    """One generator per sample, seeded from the global seed and the sample's global index."""
    return [torch.Generator().manual_seed(s) for s in generator_seeds(seed, indices)]


def randn_per_sample(generators, shape):
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def guidance_batch(x, t, context, uncond_context):
    """The one UNet batch of classifier-free guidance: [unconditional; conditional] halves."""
    return torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond_context, context])


def combine_guidance(out, guidance):
    """The guided eps from a UNet output on guidance_batch(): eps_u + s * (eps_c - eps_u)."""
    eps_u, eps_c = out.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def is_guided(context, uncond_context, guidance):
    return context is not None and uncond_context is not None and guidance != 1.0


def guided_eps(unet, x, t, context, uncond_context, guidance):
    """Classifier-free guidance, with both halves in one batch (the unguided output where there is
    no guidance)."""
    if not is_guided(context, uncond_context, guidance):
        return unet(x, t, context)
    return combine_guidance(unet(*guidance_batch(x, t, context, uncond_context)), guidance)


@torch.no_grad()
def ddim_sample(unet, ddim, x_T, context=None, uncond_context=None, guidance=1.0, generators=None):
    """Runs the DDIM chain from x_T. A quantized UNet keeps its activation parameters per sampling
    step: it is told the step before each call (set_step does nothing to a full-precision one)."""
    x = x_T
    for i in range(ddim.steps):
        set_step(unet, i)
        t = torch.full((x.shape[0],), int(ddim.timesteps[i]), device=x.device, dtype=torch.long)
        eps = guided_eps(unet, x, t, context, uncond_context, guidance)
        noise = None
        if ddim.eta > 0:
            noise = randn_per_sample(generators, x.shape[1:]).to(x.device, x.dtype)
        x, _ = ddim.step(x, eps, i, noise)
    return x
