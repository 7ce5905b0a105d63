"""Where distillation's memory goes on the full-size LDM-4 ImageNet UNet (cin256-v2, random weights):
one update of distill.py's loop (FP teacher forward, fake-quantized weights, student forward with
LoRA, backward, AdamW step), with the memory held after each phase.

    python bench/distill_memory.py                       # CPU: batch 1 and 2 (x2 with guidance), rank 32
    python bench/distill_memory.py --device cuda --batches 1,2,4

Modes: 'stored' keeps the weight fake-quantization's autograd intermediates (the code before it was
recomputed in backward, emulated here), 'default' is distill.py, 'recompute' is distill.py
--recompute. Memory: on CUDA, torch.cuda.memory_allocated (exact); on the CPU, the process's RSS
after malloc_trim (freed heap returned first) and its peak RSS, which also counts memory the
allocator kept.
"""
import argparse
import ctypes
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models.core.quant  # noqa: E402
from models.qmodel import build_quant_model  # noqa: E402
from models.ldm import LDM_CONFIGS, DiffusionModel  # noqa: E402
from models.core.quant import WeightRefresher, quant_layers, set_step  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cin256-v2", choices=list(LDM_CONFIGS))
    parser.add_argument("--batches", default="1,2", help="trajectories per update (the UNet sees twice as many)")
    parser.add_argument("--modes", default="stored,default,recompute")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: MODE,BATCH in this process
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    libc = ctypes.CDLL("libc.so.6") if not cuda else None
    checkpoint = models.core.quant.checkpoint

    def held():
        """GiB held now."""
        if cuda:
            torch.cuda.synchronize(device)
            return torch.cuda.memory_allocated(device) / 2 ** 30
        libc.malloc_trim(0)
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 30

    def peak():
        if cuda:
            return torch.cuda.max_memory_allocated(device) / 2 ** 30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20

    cfg = {**LDM_CONFIGS[args.config], "first_stage": None}  # the UNet is what is measured

    def measure(mode, b):
        """One update in this process; the memory held after each phase, in GiB."""
        models.core.quant.checkpoint = (lambda f, *a, **k: f(*a)) if mode == "stored" else checkpoint
        base = held()
        torch.manual_seed(0)
        fp = DiffusionModel(cfg).to(device).eval().requires_grad_(False)
        m_teacher = held()
        q = build_quant_model(fp, dict(wbits=2, abits=4, steps=20, quantize_all=False, eta=0.0)).requires_grad_(False)
        layers = [m for m in quant_layers(q.unet).values() if m.mode != "fp"]
        g = torch.Generator().manual_seed(0)
        for m in layers:
            m.add_lora(args.lora_rank, g)
            m.recompute = mode == "recompute"
        params = [p for m in layers for p in (m.lora_A, m.lora_B, m.w_scale, m.a_scale, m.a_zero)]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-6)
        m_student = held()
        u = cfg["unet"]
        x = torch.randn(2 * b, u["in_channels"], u["image_size"], u["image_size"], device=device)
        t = torch.full((2 * b,), 500, device=device)
        c = torch.randn(2 * b, 1, u["context_dim"], device=device) if u.get("context_dim") else None
        t0 = time.time()
        with torch.no_grad():
            out_fp = fp.unet(x, t, c)
        WeightRefresher(q.unet)()  # as distill.py: the small layers in one call, the large ones recomputed in backward
        m_wq = held()
        set_step(q.unet, 0)
        loss = F.mse_loss(q.unet(x, t, c), out_fp)
        m_fwd = held()
        opt.zero_grad()
        loss.backward()
        opt.step()
        seconds = time.time() - t0
        return dict(mode=mode, batch=b, teacher=m_teacher - base, student=m_student - m_teacher, wq=m_wq - m_student,
                    act=m_fwd - m_wq, kept=held() - m_student, peak=peak(), seconds=seconds)

    if args.one:
        mode, b = args.one.split(",")
        print(json.dumps(measure(mode, int(b))))
        raise SystemExit(0)

    rows = []
    for mode in args.modes.split(","):
        for b in map(int, args.batches.split(",")):  # each in a fresh process: its own peak
            proc = subprocess.run([sys.executable, __file__, "--config", args.config, "--lora-rank", str(args.lora_rank),
                                   "--device", args.device, "--one", f"{mode},{b}"], capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{mode} batch {b} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{mode} batch {b}: {rows[-1]['seconds']:.1f} s, peak {rows[-1]['peak']:.2f} GiB", flush=True)

    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.config} UNet, LoRA rank {args.lora_rank}, {name}; GiB "
          + ("allocated (CUDA)" if cuda else "of RSS after malloc_trim; peak: the process's peak RSS"))
    print("| mode | batch (UNet batch) | FP teacher | student + LoRA | fake-quantized weights (+ graph) "
          "| student activations (+ graph) | kept after the step | peak | s per update |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['batch']} ({2 * r['batch']}) | {r['teacher']:.2f} | {r['student']:.2f} | {r['wq']:.2f} | "
              f"{r['act']:.2f} | {r['kept']:.2f} | {r['peak']:.2f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
