"""Sampling speed and weight memory of a W2A4 model against its full-precision model: FP32 (NCHW and
channels-last, the faster one is the reference), fake-quant (the float path) and int8 (the CPU's
integer kernels, models/int8.py), with checkpoint sizes, the int8 path's agreement with the float
path and where the int8 model's time goes.

    python bench/sampling.py                 # embedded default + LDM-4 ImageNet-sized UNet (2 steps on CPU)
    python bench/sampling.py --device cuda   # on a GPU (no int8 column: the kernels are CPU ones; instead
                                             # a table of what int8 matmul PyTorch has there, torch._int_mm)

The quantized models are W2A4 with min/max quantizers set from one full-precision forward (speed does
not depend on their values; the agreement check needs live ones): per-step activation quantization,
weights fake-quantized once before timing. The LDM-4 ImageNet-sized UNet is the cin256-v2
architecture with random weights. Models take turns, each timed `--repeats` times after a warm-up
round, and the fastest run counts.
"""
import argparse
import copy
import io
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.checkpoint import load_fp_model, packed_checkpoint, quant_checkpoint  # noqa: E402
from models.diffusion import DDIM, ddim_sample, randn_per_sample, sample_generators, to_uint8  # noqa: E402
from models.digits import DEFAULT_CHECKPOINT  # noqa: E402
from models.int8 import convert_to_int8, int8_unavailable, weight_bytes  # noqa: E402
from models.ldm import LDM_CONFIGS, DiffusionModel  # noqa: E402
from models.pack import fp32_bytes  # noqa: E402
from models.qmodel import build_quant_model  # noqa: E402
from models.core.quant import quant_layers, refresh_weights, set_step  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (the fastest is kept)")
    parser.add_argument("--skip-ldm", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    no_int8 = int8_unavailable(device)

    def file_size(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.tell()

    def timed_sampling(runs, n, steps, guidance, model):
        """Seconds per DDIM step of each run (name -> (unet, layout)), and each run's final latents."""
        ddim = DDIM(model.alphas_cumprod, steps=steps)
        x_T = randn_per_sample(sample_generators(0, range(n)), model.latent_shape).to(device)
        ctx, uctx = model.context(torch.arange(n, device=device) % max(model.num_classes, 1))
        best, final = {k: float("inf") for k in runs}, {}
        for r in range(args.repeats + 1):  # the first round warms up
            for name, (unet, layout) in runs.items():
                x = x_T.contiguous(memory_format=layout)
                if on_gpu:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                final[name] = ddim_sample(unet, ddim, x, ctx, uctx, guidance)
                if on_gpu:
                    torch.cuda.synchronize()
                if r > 0:
                    best[name] = min(best[name], (time.perf_counter() - t0) / steps)
        return best, final

    @torch.no_grad()
    def minmax_quantizers(q, fp, n, guidance):
        """Weights: per-channel min/max at each channel's bits; activations: one full-precision forward's
        per-layer min/max, for every step."""
        inputs = {}
        hooks = [getattr(fp.unet.get_submodule(name), "register_forward_hook")(
            lambda m, i, o, name=name: inputs.__setitem__(name, (i[0].min().item(), i[0].max().item())))
            for name in quant_layers(q.unet)]
        x = randn_per_sample(sample_generators(0, range(n)), fp.latent_shape).to(device)
        ctx, _ = fp.context(torch.arange(n, device=device) % max(fp.num_classes, 1))
        fp.unet(x, torch.full((n,), 500, device=device), ctx)
        for h in hooks:
            h.remove()
        for name, layer in quant_layers(q.unet).items():
            if layer.mode == "fp":
                continue
            w = layer.layer.weight.flatten(1)
            lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
            layer.w_scale.copy_(((hi - lo) / (2.0 ** layer.bits.float() - 1)).clamp(min=1e-8))
            layer.w_zero.copy_(-lo / layer.w_scale)
            a_lo, a_hi = min(inputs[name][0], 0.0), max(inputs[name][1], 0.0)
            scale = max((a_hi - a_lo) / (2 ** layer.abits - 1), 1e-8)
            layer.a_scale.fill_(scale)
            layer.a_zero.fill_(round(-a_lo / scale))
        refresh_weights(q.unet)

    def agreement(model, a, b):
        """How the int8 path's final samples compare with the fake-quant path's: share of equal uint8
        pixels (after decoding) and relative L2 difference of the latents."""
        pa, pb = to_uint8(model.decode(a.contiguous())), to_uint8(model.decode(b.contiguous()))
        return (pa == pb).float().mean().item(), ((a - b).norm() / a.norm()).item()

    KINDS = {  # the int8 model's profiled ops, by kind
        "int8 conv kernels": ("onednn::qconv2d_pointwise",),
        "int8 linear kernels": ("onednn::qlinear_pointwise",),
        "input quantization, zero-point correction": ("aten::div", "aten::add_", "aten::clamp_", "aten::copy_", "aten::addcmul_"),
        "float convolutions (full-precision and W8A8 layers)": ("aten::mkldnn_convolution", "aten::convolution"),
        "float linear (W8A8 time embedding)": ("aten::addmm", "aten::mm"),
        "attention matmuls and softmax": ("aten::bmm", "aten::_softmax"),
        "norms and activations": ("aten::native_group_norm", "aten::native_layer_norm", "aten::silu", "aten::gelu"),
    }

    def breakdown(unet, model, n, guidance):
        """Self CPU time of one DDIM step of the int8 model, by kind of op."""
        from torch.profiler import profile
        x = randn_per_sample(sample_generators(0, range(n)), model.latent_shape).to(device)
        ctx, uctx = model.context(torch.arange(n, device=device) % max(model.num_classes, 1))
        ddim = DDIM(model.alphas_cumprod, steps=1)
        with profile() as prof:
            ddim_sample(unet, ddim, x, ctx, uctx, guidance)
        times = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
        total = sum(times.values())
        out = {kind: sum(times.get(op, 0.0) for op in ops) for kind, ops in KINDS.items()}
        out["everything else"] = total - sum(out.values())
        return out, total

    def gpu_int8_matmul():
        """What a GPU integer path could gain: torch._int_mm (int8 x int8 -> int32, the one int8 GEMM
        PyTorch exposes on CUDA) against FP32 and bf16 matmul, at the cin256-v2 spatial transformers'
        linear shapes for 8 images with guidance (16 rows x tokens). The matmul alone: no quantization of
        the input, no dequantization of the output. Milliseconds per product, median of 50 after 10."""
        shapes = [(16 * 1024, 384, 384), (16 * 1024, 384, 3072), (16 * 1024, 1536, 384), (16 * 256, 576, 4608),
                  (16 * 64, 960, 7680)]
        out = []
        for m, k, n in shapes:
            a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
            kinds = {"FP32": (a, b, torch.mm), "bf16": (a.bfloat16(), b.bfloat16(), torch.mm),
                     "int8 (_int_mm)": (a.clamp(-127, 127).to(torch.int8), b.clamp(-127, 127).to(torch.int8), torch._int_mm)}
            ms = {}
            for kind, (x, y, mm) in kinds.items():
                times = []
                for i in range(60):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    mm(x, y)
                    end.record()
                    torch.cuda.synchronize()
                    if i >= 10:
                        times.append(start.elapsed_time(end))
                ms[kind] = sorted(times)[len(times) // 2]
            out.append(((m, k, n), ms))
        return out

    rows, breakdowns = [], []

    @torch.no_grad()
    def bench(name, model, n, steps, guidance):
        model = model.to(device).eval()
        settings = dict(wbits=2, abits=4, steps=steps, quantize_all=False, quantize_conv1d=False, eta=0.0)
        q = build_quant_model(model, settings).to(device).eval()
        minmax_quantizers(q, model, n, guidance)
        set_step(q.unet, 0)
        fp_cl = copy.deepcopy(model.unet).to(memory_format=torch.channels_last)
        runs = {"FP32 NCHW": (model.unet, torch.contiguous_format), "FP32 channels-last": (fp_cl, torch.channels_last),
                "W2A4 fake-quant": (q.unet, torch.contiguous_format)}
        mem = {"FP32": weight_bytes(model.unet), "W2A4 fake-quant": weight_bytes(q.unet)}
        cpu_q = copy.deepcopy(q).to("cpu")
        q_size = file_size(quant_checkpoint(cpu_q, dict(config=model.config)))
        packed_size = file_size(packed_checkpoint(cpu_q))
        del cpu_q
        if not no_int8:
            q8 = copy.deepcopy(q)
            counts = convert_to_int8(q8)
            runs["W2A4 int8"] = (q8.unet, torch.channels_last)
            mem["W2A4 int8"] = weight_bytes(q8.unet)
        t, final = timed_sampling(runs, n, steps, guidance, model)
        fp_layout = min(("FP32 NCHW", "FP32 channels-last"), key=t.get)
        row = dict(name=name, n=n, steps=steps, t=t, fp_layout=fp_layout, mem=mem, fp_bytes=fp32_bytes(model),
                   q_size=q_size, packed_size=packed_size)
        if not no_int8:
            row.update(counts=counts, agree=agreement(model, final["W2A4 fake-quant"], final["W2A4 int8"]))
            breakdowns.append((name, *breakdown(q8.unet, model, n, guidance)))
        rows.append(row)

    fp = load_fp_model(DEFAULT_CHECKPOINT)
    bench("embedded default (digits, 8x8)", fp, n=256, steps=20, guidance=2.0)
    if not args.skip_ldm:
        torch.manual_seed(0)
        ldm = DiffusionModel({**LDM_CONFIGS["cin256-v2"], "first_stage": None})  # the UNet is what is timed
        bench("LDM-4 ImageNet UNet (cin256-v2, random, 64x64x3)", ldm, n=8 if on_gpu else 1, steps=20 if on_gpu else 2, guidance=3.0)

    print(f"device: {device} ({torch.cuda.get_device_name(device) if on_gpu else f'{torch.get_num_threads()} CPU threads'})"
          + (f"; no int8 column: {no_int8}" if no_int8 else ""))
    print("\nSeconds per DDIM step (images in a batch, with guidance twice that many UNet rows); FP32 = the faster layout.\n")
    cols = ["FP32 NCHW", "FP32 channels-last", "W2A4 fake-quant"] + ([] if no_int8 else ["W2A4 int8"])
    print("| model | images | steps | " + " | ".join(cols) + " | fake-quant vs FP32 |" + ("" if no_int8 else " int8 vs FP32 |"))
    print("|---|---|---|" + "---|" * len(cols) + "---|" + ("" if no_int8 else "---|"))
    for r in rows:
        t, ref = r["t"], r["t"][r["fp_layout"]]
        cells = " | ".join(f"{t[c]:.4f}" for c in cols)
        speed = lambda c: f"{ref / t[c]:.2f}x faster" if t[c] < ref else f"{t[c] / ref:.2f}x slower"
        print(f"| {r['name']} | {r['n']} | {r['steps']} | {cells} | {speed('W2A4 fake-quant')} |"
              + ("" if no_int8 else f" {speed('W2A4 int8')} |"))
    print("\nWeights held in memory (the UNet; fake-quant keeps FP32 weights and their fake-quantized copy) and on disk.\n")
    print("| model | FP32 | fake-quant | " + ("" if no_int8 else "int8 | int8 / FP32 | ") + "quantized ckpt | packed ckpt |")
    print("|---|---|---|" + ("" if no_int8 else "---|---|") + "---|---|")
    for r in rows:
        m = r["mem"]
        int8 = "" if no_int8 else f"{m['W2A4 int8'] / 1e6:.1f} MB | {100 * m['W2A4 int8'] / m['FP32']:.1f}% | "
        print(f"| {r['name']} | {m['FP32'] / 1e6:.1f} MB | {m['W2A4 fake-quant'] / 1e6:.1f} MB | {int8}"
              f"{r['q_size'] / 1e6:.1f} MB | {r['packed_size'] / 1e6:.2f} MB ({100 * r['packed_size'] / r['fp_bytes']:.1f}%) |")
    if not no_int8:
        print("\nThe int8 path against the fake-quant path, same x_T, whole chain (uint8 pixels after decoding; the "
              "LDM row has no decoder, so its 'pixels' are the latents mapped to uint8).\n")
        print("| model | layers on int8 | in float (codes do not fit) | FP by design | equal pixels | latent rel. L2 diff |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            c, (eq, rel) = r["counts"], r["agree"]
            print(f"| {r['name']} | {c['int8']} | {c['float_not_fitting']} | {c['full_precision']} | {100 * eq:.2f}% | {rel:.2e} |")
        for name, parts, total in breakdowns:
            print(f"\nint8 model, one DDIM step, self CPU time by kind ({name}; total {total:.3f} s under the profiler):\n")
            print("| kind | seconds | share |\n|---|---|---|")
            for kind, sec in parts.items():
                print(f"| {kind} | {sec:.4f} | {100 * sec / total:.1f}% |")
    if on_gpu:
        print("\nint8 matmul on this GPU (torch._int_mm, the matmul alone) against FP32 (TF32 "
              f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}) and bf16; ms per product, median of 50.\n")
        print("| M x K x N | FP32 | bf16 | int8 | int8 vs FP32 | int8 vs bf16 |\n|---|---|---|---|---|---|")
        for (m, k, n), ms in gpu_int8_matmul():  # last: the tables above are printed whatever happens here
            i8 = ms["int8 (_int_mm)"]
            print(f"| {m} x {k} x {n} | {ms['FP32']:.3f} | {ms['bf16']:.3f} | {i8:.3f} | {ms['FP32'] / i8:.2f}x | "
                  f"{ms['bf16'] / i8:.2f}x |")


if __name__ == "__main__":
    main()
