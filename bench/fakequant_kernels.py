"""The activation quantizers of one distillation update, forward and backward, three ways:
models/core/quant.py's FakeQuant as distill.py calls it; PyTorch's own fused learnable fake-quantizer
(torch._fake_quantize_learnable_per_tensor_affine, what torch.ao's LSQ module calls: one kernel
forward, one backward); and FakeQuant's expression compiled by torch.compile (Inductor's C++
kernels, dynamic shapes, so one compile serves every layer; its compile time is printed).

    python bench/fakequant_kernels.py            # 1 thread, the embedded default's shapes

The shapes are those of one update on the embedded default: the input of every quantized layer in
one student forward at distill.py's batch (16 trajectories, guided: 32 rows). Each variant runs
forward and backward (gradients to the input, the scale and the zero-point) over all of them; the
fastest of --repeats rounds counts. Run it with nothing else on the machine.

The learnable kernel is not the same gradient: it passes the full gradient where the code sits on a
bound (FakeQuant passes half, as torch.clamp with tensor bounds does) and multiplies by 1/scale
instead of dividing. It is timed here only to see whether it would pay.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.checkpoint import load_fp_model  # noqa: E402
from models.digits import DEFAULT_CHECKPOINT  # noqa: E402
from models.qmodel import wrap_unet  # noqa: E402
from models.core.quant import fake_quant  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=32, help="UNet rows per forward (distill.py: 16 trajectories x 2)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # ---- the shapes: every quantized layer's input in one forward
    fp = load_fp_model(DEFAULT_CHECKPOINT)
    layers = wrap_unet(fp.unet, 2, 4, n_steps=20)  # in place: the FP model is not needed here
    shapes = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: shapes.append(tuple(inp[0].shape)))
             for m in layers.values() if m.mode == "quant"]
    with torch.no_grad():
        y = torch.randint(fp.num_classes, (args.rows,))
        fp.unet(torch.randn(args.rows, *fp.latent_shape), torch.full((args.rows,), 500), fp.context(y)[0])
    for h in hooks:
        h.remove()
    inputs = [(torch.randn(s) * 2).requires_grad_() for s in shapes]
    grads = [torch.randn(s) for s in shapes]

    # ---- the variants: out = fake-quantized input; backward to x and the step's scale and zero-point
    STEP = 5  # an activation quantizer holds one (scale, zero-point) per DDIM step: vectors of 20

    def ours(x, scale, zero):  # as QuantLayer.quant_input calls it in training
        return fake_quant(x, scale[STEP].abs().clamp(min=1e-8), zero[STEP], 15.0, round_zero=True)

    def learnable(x, scale, zero):
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale[STEP:STEP + 1].abs().clamp(min=1e-8),
                                                                zero[STEP:STEP + 1], 0, 15, 1.0)

    def spelled_out(x, scale, zero):  # FakeQuant's expression in plain ops, for torch.compile to fuse
        s, z = scale[STEP].abs().clamp(min=1e-8), zero[STEP]
        z = (z.round() - z).detach() + z
        v = x / s + z
        r = (v.round() - v).detach() + v  # round with a straight-through gradient
        return (torch.clamp(r, torch.zeros_like(r), torch.full_like(r, 15.0)) - z) * s

    def one_update(fn):
        scale, zero = torch.full((20,), 0.3, requires_grad=True), torch.full((20,), 7.2, requires_grad=True)
        for x, g in zip(inputs, grads):
            fn(x, scale, zero).backward(g)

    t0 = time.perf_counter()
    compiled = torch.compile(spelled_out, dynamic=True)
    one_update(compiled)
    compile_s = time.perf_counter() - t0
    variants = {"FakeQuant (models/core/quant.py)": ours, "torch learnable fake-quant": learnable,
                "torch.compile (dynamic shapes)": compiled}
    times = {name: [] for name in variants}
    for name, fn in variants.items():  # a warm-up round
        one_update(fn)
    for _ in range(args.repeats):
        for name, fn in variants.items():  # in turns, so that the host's drift hits all alike
            t0 = time.perf_counter()
            one_update(fn)
            times[name].append(time.perf_counter() - t0)

    print(f"Activation quantizers of one distillation update, forward + backward: {len(shapes)} layer inputs of "
          f"{args.rows} rows, {args.threads} thread{'s' * (args.threads > 1)}, fastest of {args.repeats}:\n")
    print("| variant | ms per update | vs FakeQuant |\n|---|---|---|")
    base = min(times["FakeQuant (models/core/quant.py)"])
    for name, ts in times.items():
        print(f"| {name} | {1000 * min(ts):.1f} | {min(ts) / base:.2f}x the time |")
    print(f"\ntorch.compile's first call (compiling): {compile_s:.1f} s")


if __name__ == "__main__":
    main()
