"""Sampling speed of a quantized model against its full-precision model, and checkpoint sizes.

    python bench/sampling.py                 # embedded default + LDM-4 ImageNet-sized UNet (a few steps on CPU)
    python bench/sampling.py --device cuda   # on a GPU

The quantized models are built with the quantizers' default parameters (speed does not depend on
their values): W2A4 layers, per-step activation quantization, weights fake-quantized once before
timing. The LDM-4 ImageNet-sized UNet is the cin256-v2 architecture with random weights.
"""
import argparse
import io
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.checkpoint import load_fp_model, packed_checkpoint, quant_checkpoint  # noqa: E402
from models.diffusion import DDIM, ddim_sample, randn_per_sample, sample_generators  # noqa: E402
from models.digits import DEFAULT_CHECKPOINT  # noqa: E402
from models.ldm import LDM_CONFIGS, DiffusionModel  # noqa: E402
from models.pack import fp32_bytes  # noqa: E402
from models.qmodel import build_quant_model  # noqa: E402
from models.quant import refresh_weights  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (the fastest is kept)")
parser.add_argument("--skip-ldm", action="store_true")
args = parser.parse_args()
device = torch.device(args.device)
on_gpu = device.type == "cuda"


def file_size(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def timed_sampling(models, n, steps, guidance):
    """Seconds per DDIM step of each model, fastest of `repeats` runs. The models take turns, so
    that a slow spell of a shared machine slows both rather than biasing the ratio."""
    ddim = DDIM(models[0].alphas_cumprod, steps=steps)
    gens = sample_generators(0, range(n))
    x_T = randn_per_sample(gens, models[0].latent_shape).to(device)
    ctx, uctx = models[0].context(torch.arange(n, device=device) % max(models[0].num_classes, 1))
    best = [float("inf")] * len(models)
    for r in range(args.repeats + 1):  # the first round warms up
        for i, model in enumerate(models):
            if on_gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            ddim_sample(model.unet, ddim, x_T, ctx, uctx, guidance)
            if on_gpu:
                torch.cuda.synchronize()
            if r > 0:
                best[i] = min(best[i], time.perf_counter() - t0)
    return [b / steps for b in best]


def quantized(model, steps):
    settings = dict(wbits=2, abits=4, steps=steps, quantize_all=False, quantize_conv1d=False, eta=0.0)
    q = build_quant_model(model, settings).to(device).eval()
    with torch.no_grad():
        refresh_weights(q.unet)
    return q


rows = []


def bench(name, model, n, steps, guidance):
    model = model.to(device).eval()
    q = quantized(model, steps)
    t_fp, t_q = timed_sampling([model, q], n, steps, guidance)
    cpu_q = q.to("cpu")
    fp_size = fp32_bytes(model)
    q_size = file_size(quant_checkpoint(cpu_q, dict(config=model.config)))
    packed_size = file_size(packed_checkpoint(cpu_q))
    rows.append((name, n, steps, t_fp, t_q, fp_size, q_size, packed_size))


fp = load_fp_model(DEFAULT_CHECKPOINT)
bench("embedded default (digits, 8x8)", fp, n=256, steps=20, guidance=2.0)
if not args.skip_ldm:
    torch.manual_seed(0)
    ldm = DiffusionModel({**LDM_CONFIGS["cin256-v2"], "first_stage": None})  # the UNet is what is timed
    bench("LDM-4 ImageNet UNet (random, 64x64x3)", ldm, n=8 if on_gpu else 1, steps=20 if on_gpu else 2, guidance=3.0)

print(f"device: {device} ({torch.cuda.get_device_name(device) if on_gpu else f'{torch.get_num_threads()} CPU threads'})")
print("| model | images | DDIM steps | FP s/step | W2A4 s/step | quantized / FP | FP32 weights | quantized ckpt | packed ckpt |")
print("|---|---|---|---|---|---|---|---|---|")
for name, n, steps, t_fp, t_q, fp_size, q_size, packed_size in rows:
    print(f"| {name} | {n} | {steps} | {t_fp:.4f} | {t_q:.4f} | {t_q / t_fp:.2f}x | {fp_size / 1e6:.1f} MB | "
          f"{q_size / 1e6:.1f} MB | {packed_size / 1e6:.2f} MB ({100 * packed_size / fp_size:.1f}%) |")
