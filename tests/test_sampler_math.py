"""The sampler's arithmetic against the formulas, written out here independently of models/diffusion.py:
the DDIM update (Song et al. 2021, eq. 12) with eta = 0 and eta > 0, and classifier-free guidance."""
import math

import pytest
import torch

from models.diffusion import DDIM, ddim_sample, guided_eps, linear_alphas_cumprod


def eq12(x, eps, a, a_prev, eta, z):
    """x_{t-1} = sqrt(a_prev) * (x - sqrt(1 - a) eps) / sqrt(a) + sqrt(1 - a_prev - sigma^2) eps + sigma z,
    sigma = eta * sqrt((1 - a_prev) / (1 - a)) * sqrt(1 - a / a_prev)."""
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps + sigma * z, x0


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_is_eq12(eta):
    ac = linear_alphas_cumprod().double()
    ddim = DDIM(ac.float(), steps=20, eta=eta)
    ts = list(range(1, 1000, 50))[::-1]  # 20 steps of 1000: t = 951, 901, ..., 1
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    for i, t in enumerate(ts):
        a, a_prev = ac[t].item(), ac[ts[i + 1]].item() if i + 1 < len(ts) else ac[0].item()  # the last step: alpha_0
        want_prev, want_x0 = eq12(x.double(), eps.double(), a, a_prev, eta, z.double())
        got_prev, got_x0 = ddim.step(x, eps, i, z if eta > 0 else None)
        assert int(ddim.timesteps[i]) == t
        assert torch.allclose(got_x0.double(), want_x0, rtol=1e-5, atol=1e-5), i
        assert torch.allclose(got_prev.double(), want_prev, rtol=1e-5, atol=1e-5), i
    if eta > 0:  # the noise enters: another z gives another x_prev
        assert not torch.allclose(ddim.step(x, eps, 5, z)[0], ddim.step(x, eps, 5, -z)[0])


class ClassDependentUNet(torch.nn.Module):
    """A stand-in UNet whose output depends on x, t and the context, differently for every sample."""

    def forward(self, x, t, context):
        return 0.5 * x + t.view(-1, 1, 1, 1) * 1e-3 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_guidance_is_eps_u_plus_s_times_eps_c_minus_eps_u():
    unet = ClassDependentUNet()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([10, 500, 990])
    cond, uncond = torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, 5, generator=g)
    eps_c, eps_u = unet(x, t, cond), unet(x, t, uncond)
    for s in (2.0, 3.0, 0.5):
        assert torch.allclose(guided_eps(unet, x, t, cond, uncond, s), eps_u + s * (eps_c - eps_u), atol=1e-6)
    assert torch.allclose(guided_eps(unet, x, t, cond, uncond, 1.0), eps_c)  # no guidance: the conditional output


def test_guided_ddim_chain_is_eq12_with_the_guided_eps():
    """Two steps of ddim_sample with guidance 3.0 and eta 0.5 against the formulas step by step, with
    the same per-sample noise."""
    ac = linear_alphas_cumprod().double()
    ddim = DDIM(ac.float(), steps=2, eta=0.5)
    unet = ClassDependentUNet()
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(2, 1, 4, 4, generator=g)
    cond, uncond = torch.randn(2, 2, 5, generator=g), torch.randn(2, 2, 5, generator=g)
    seeds = [7, 8]
    got = ddim_sample(unet, ddim, x_T, cond, uncond, 3.0, [torch.Generator().manual_seed(s) for s in seeds])
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = x_T.double()
    ts = [501, 1]
    for i, t in enumerate(ts):
        tt = torch.full((2,), t)
        eps_c, eps_u = unet(x.float(), tt, cond).double(), unet(x.float(), tt, uncond).double()
        z = torch.stack([torch.randn(1, 4, 4, generator=gen) for gen in gens]).double()
        a_prev = ac[ts[i + 1]].item() if i + 1 < len(ts) else ac[0].item()
        x, _ = eq12(x, eps_u + 3.0 * (eps_c - eps_u), ac[t].item(), a_prev, 0.5, z)
    assert torch.allclose(got.double(), x, rtol=1e-4, atol=1e-4)
