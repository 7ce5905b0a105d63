"""How far the int8 path's samples are from the float path's, next to what a float-rounding-sized
change does to the float path itself: the same quantized checkpoint sampled three ways from the same
x_T (float; int8; float with x_T * (1 + 1e-6 noise)), and one UNet forward compared layer by layer.

    python bench/int8_agreement.py --ckpt runs/int8/w2a4.pt

Prints the share of equal uint8 pixels and the mean absolute pixel difference against the float
path, and, for one forward at the first step, the first layer whose int8 output differs from the
float one by more than 1e-4 of its largest value (where a flipped activation code shows up), with
its input's difference.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.checkpoint import load_sampling_model  # noqa: E402
from models.diffusion import DDIM, ddim_sample, randn_per_sample, sample_generators, to_uint8  # noqa: E402
from models.int8 import Int8Layer, convert_to_int8  # noqa: E402
from models.core.quant import QuantLayer, set_step  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="a quantized or packed checkpoint")
    parser.add_argument("--num-images", type=int, default=64)
    args = parser.parse_args(argv)

    fake, _ = load_sampling_model(args.ckpt)
    int8, _ = load_sampling_model(args.ckpt)
    convert_to_int8(int8)
    s, n = fake.quant_settings, args.num_images
    ddim = DDIM(fake.alphas_cumprod, steps=s["steps"], eta=s["eta"])
    x_T = randn_per_sample(sample_generators(0, range(n)), fake.latent_shape)
    ctx, uctx = fake.context(torch.arange(n) % fake.num_classes) if fake.num_classes else (None, None)
    guidance = s.get("guidance", 2.0)

    @torch.no_grad()
    def images(model, x):
        z = ddim_sample(model.unet, ddim, x, ctx, uctx, guidance, sample_generators(0, range(n)))
        return to_uint8(fake.decode(z.contiguous())).float()

    ref = images(fake, x_T)
    noise = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(1))
    print(f"{args.ckpt}: {n} images, {s['steps']} steps")
    print("| against the float path | equal pixels | mean abs difference (grey levels) |\n|---|---|---|")
    for name, model, x in (("int8 path", int8, x_T), ("float path, x_T * (1 + 1e-6 noise)", fake, x_T * (1 + 1e-6 * noise))):
        other = images(model, x)
        print(f"| {name} | {100 * (other == ref).float().mean().item():.1f}% | {(other - ref).abs().mean().item():.2f} |")

    # one forward at the first step, layer by layer in call order
    records = {"fake": [], "int8": []}
    for key, model in (("fake", fake), ("int8", int8)):
        for name, m in model.unet.named_modules():
            if isinstance(m, (QuantLayer, Int8Layer)):
                m.register_forward_hook(lambda mod, i, o, key=key, name=name: records[key].append((name, i[0].clone(), o.clone())))
    t = torch.full((n,), int(ddim.timesteps[0]))  # the first sampling step
    with torch.no_grad():
        for model in (fake, int8):
            set_step(model.unet, 0)
            model.unet(x_T, t, ctx)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
    for (name, i_f, o_f), (_, i_8, o_8) in zip(records["fake"], records["int8"]):
        if rel(o_8, o_f) > 1e-4:
            print(f"one forward: the first layer off by more than 1e-4 is {name}: output off by {rel(o_8, o_f):.1e} "
                  f"of its largest value, its input by {rel(i_8, i_f):.1e}")
            break
    else:
        print("one forward: every layer within 1e-4 of the float path")


if __name__ == "__main__":
    main()
