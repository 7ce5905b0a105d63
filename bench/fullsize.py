"""The full-size check: quantize -> distill -> sample -> evaluate on a full-size LDM checkpoint with
random weights and the official key names, each stage run as a user runs it (the top-level scripts,
in their own process). Prints per stage its wall time, its peak memory (CUDA: the largest
max_memory_allocated the script reports; CPU: the process's peak RSS, with glibc's mmap threshold
fixed at 1 MiB so that freed tensors leave the count), and the projected time of
the papers' protocol: 16,000 distillation updates (200 iterations of batch 4 x 20 steps) and
50,000 samples of 20 DDIM steps.

    python bench/fullsize.py --device cuda                        # cin256-v2, the paper's batch 4, rank 32
    python bench/fullsize.py --device cpu                         # distillation at batch 1 and 2, projected to 4
    python bench/fullsize.py --config smoke --device cpu          # a tiny model in seconds (the test runs this)

The checkpoint is this project's own model, randomly initialised (every weight, so that no layer
is zero), saved under the official names: tests/test_ldm.py checks that those names and shapes
are the official manifests'. Random weights give the real models' time and memory, not their
quality: no FID here means anything. Evaluation needs clean-fid's Inception weights
(--inception, or clean-fid's cache); without them it runs a stand-in network of the same
interface, and its time is not reported as Inception's.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models.ldm import LDM_CONFIGS, UNET_PREFIX, DiffusionModel  # noqa: E402

PAPER_UPDATES = 16_000  # 200 iterations x batch 4 x 20 DDIM steps
PAPER_SAMPLES, PAPER_STEPS = 50_000, 20
INCEPTION_CACHE = Path("/tmp") / "inception-2015-12-05.pt"

# a tiny class-conditional VQ model with cin256-v2's structure, for the smoke run
SMOKE_CONFIG = dict(
    unet=dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2],
              num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
              transformer_depth=1, context_dim=32),
    cond_stage=dict(n_classes=11, embed_dim=32),
    first_stage=dict(kind="vq", embed_dim=3, n_embed=64,
                     ddconfig=dict(double_z=False, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=32,
                                   ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[])),
    schedule=dict(timesteps=1000, linear_start=0.0015, linear_end=0.0195),
    scale_factor=1.0)


# ---- clean-fid's Inception with random weights, for a machine without the real file
class StandInLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 13 * 13, 2048)

    def forward(self, x):  # normalised 299x299 images -> [B, 2048, 1, 1], as the real `layers`
        return torch.tanh(self.proj(nn.functional.adaptive_avg_pool2d(x, 13).flatten(1)))[:, :, None, None]


class StandInInception(nn.Module):
    """clean-fid's Inception interface (0..255 299x299 images in; `layers` for the 2048 features,
    class probabilities for return_features=False), random weights: lets the evaluation stage run
    where the real file is absent."""

    def __init__(self):
        super().__init__()
        self.layers = StandInLayers()
        self.output = nn.Linear(2048, 1008)

    def forward(self, img, return_features: bool = False, no_output_bias: bool = False):
        x = img.to(torch.float32)
        if x.shape[2] != 299 or x.shape[3] != 299:  # the real file resizes inside, as the TF graph
            x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        f = self.layers((x - 128) / 128).view(-1, 2048)
        logits = self.output(f)
        if no_output_bias:
            logits = logits - self.output.bias
        return f if return_features else torch.softmax(logits, dim=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cin256-v2", choices=[*LDM_CONFIGS, "smoke"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ddim-steps", type=int, default=None, help="default: 20 on CUDA, 2 on the CPU")
    parser.add_argument("--wbits", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=32, help="the paper's rank")
    parser.add_argument("--distill-batches", default=None,
                        help="trajectories per iteration, one distill run each (default: 4 on CUDA, '1,2' on the CPU)")
    parser.add_argument("--recompute", action="store_true", help="pass --recompute to distill.py")
    parser.add_argument("--num-images", type=int, default=None, help="default: 64 on CUDA, 2 on the CPU")
    parser.add_argument("--sample-batch", type=int, default=None, help="default: 32 on CUDA, 1 on the CPU")
    parser.add_argument("--inception", type=Path, default=None, help="clean-fid's Inception weights (default: its cache)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "fullsize")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible here")
    steps = args.ddim_steps or (20 if cuda else 2)
    batches = [int(b) for b in (args.distill_batches or ("4" if cuda else "1,2")).split(",")]
    num_images = args.num_images or (64 if cuda else 2)
    sample_batch = args.sample_batch or (32 if cuda else 1)
    out = args.out / args.config
    out.mkdir(parents=True, exist_ok=True)
    guidance = 3.0

    # ---- a full-size checkpoint with the official names and random weights
    def write_checkpoint(path):
        config = SMOKE_CONFIG if args.config == "smoke" else LDM_CONFIGS[args.config]
        torch.manual_seed(0)
        model = DiffusionModel(config)
        sd = {}
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.dim() > 1:
                    v = torch.randn_like(v) / v[0].numel() ** 0.5
                elif k.endswith("weight") and "norm" in k:
                    v = 1 + 0.1 * torch.randn_like(v)
                else:
                    v = 0.1 * torch.randn_like(v)
                sd[UNET_PREFIX + k[len("unet."):] if k.startswith("unet.") else k] = v
        if config.get("scale_factor") is None:  # churches: scale_by_std, a buffer in the checkpoint
            sd["scale_factor"] = torch.tensor(0.22765929)
        torch.save({"state_dict": sd}, path)
        if args.config == "smoke":  # the scripts read an official-layout YAML for a model that is not released
            import yaml

            u = config["unet"]
            fs = config["first_stage"]
            yaml_cfg = {"model": {"params": {
                "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000,
                "unet_config": {"params": u},
                "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                      "params": {"n_classes": 11, "embed_dim": 32}},
                "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface",
                                       "params": {"embed_dim": fs["embed_dim"], "n_embed": fs["n_embed"],
                                                  "ddconfig": fs["ddconfig"]}}}}}
            path.with_suffix(".yaml").write_text(yaml.safe_dump(yaml_cfg))

    ckpt = out / "model.ckpt"
    if not ckpt.exists():
        t0 = time.time()
        write_checkpoint(ckpt)
        print(f"wrote {ckpt} ({ckpt.stat().st_size / 1e9:.2f} GB) in {time.time() - t0:.0f} s", flush=True)
    config_arg = str(ckpt.with_suffix(".yaml")) if args.config == "smoke" else args.config

    # ---- the stages, each a script in its own process
    rows = []
    # CPU: glibc returns a freed large tensor to the OS only above its mmap threshold, which it raises
    # as tensors are freed; fixed low, peak RSS counts the tensors alive at the peak (as CUDA's max
    # allocated does) rather than heap that glibc kept after they were freed
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}

    def stage(name, script, *script_args, launcher=()):
        """Runs one script (under `launcher`, e.g. torch.distributed.run); returns (wall seconds, peak GiB,
        kind of peak, its stdout)."""
        cmd = [sys.executable, *launcher, str(ROOT / script), *map(str, script_args)]
        print("$", " ".join(cmd[1:]), flush=True)
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.time() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            print(output[-4000:])
            raise SystemExit(f"{name} failed")
        if cuda:
            peaks = [float(m) for m in re.findall(r"peak CUDA memory allocated: ([\d.]+) GiB", output)]
            peak, kind = max(peaks), "CUDA allocated"
        else:
            peak, kind = usage.ru_maxrss / 2 ** 20, "peak RSS"  # Linux: KiB
        print(f"  {name}: {seconds:.0f} s, {kind} {peak:.2f} GiB", flush=True)
        return seconds, peak, kind, output

    dev = ["--device", args.device]
    qckpt = out / f"w{args.wbits}a4_omq.pt"
    sec, peak, kind, _ = stage("quantize", "quantize.py", "--ckpt", ckpt, "--config", config_arg, "--wbits", args.wbits,
                               "--abits", 4, "--steps", steps, "--guidance", guidance, "--calib-samples", 1,
                               "--calib-keep", 1, "--eval-samples", 1, "--batch-size", 1, "--out", qckpt, *dev)
    report = json.loads(qckpt.with_suffix(".json").read_text())["layers"]
    layer_seconds = [r["seconds"] for r in report.values() if "seconds" in r and r["mode"] != "fp"]
    rows.append(("quantize (OMQ search, 1 calibration trajectory)", f"{len(layer_seconds)} layers", sec, peak,
                 f"{sum(layer_seconds) / len(layer_seconds):.2f} s per layer (max {max(layer_seconds):.2f})"))

    per_update = {}
    for b in batches:
        dckpt = out / f"w{args.wbits}a4_omq_trd_b{b}.pt"
        sec, peak, kind, _ = stage(f"distill batch {b}", "distill.py", "--qckpt", qckpt, "--lora-rank", args.lora_rank,
                                   "--batch-size", b, "--iters", 1, "--eval-samples", 1, "--out", dckpt,
                                   *(["--recompute"] if args.recompute else []), *dev)
        info = json.loads(dckpt.with_suffix(".json").read_text())
        per_update[b] = info["seconds_train"] / info["updates_run"]
        rows.append((f"distill, batch {b}, rank {args.lora_rank}" + (", --recompute" if args.recompute else ""),
                     f"{info['updates_run']} updates", sec, peak, f"{per_update[b]:.2f} s per update"))
    distill_peaks = {b: r[3] for b, r in zip(batches, rows[1:])}
    n_gpus = torch.cuda.device_count() if cuda else 1
    if n_gpus > 1:  # the same updates on every GPU of the machine (torchrun, DDP): the paper's batch 4 when it divides
        b = 4 if 4 % n_gpus == 0 else n_gpus
        info_path = out / f"w{args.wbits}a4_omq_trd_b{b}_{n_gpus}gpus.pt"
        sec, peak, kind, _ = stage(f"distill batch {b}, {n_gpus} GPUs", "distill.py", "--qckpt", qckpt, "--lora-rank",
                                   args.lora_rank, "--batch-size", b, "--iters", 1, "--eval-samples", 1, "--out", info_path,
                                   *(["--recompute"] if args.recompute else []), *dev,
                                   launcher=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_gpus)])
        info = json.loads(info_path.with_suffix(".json").read_text())
        per_update_n = info["seconds_train"] / info["updates_run"]
        rows.append((f"distill, batch {b}, rank {args.lora_rank}, {n_gpus} GPUs (torchrun)", f"{info['updates_run']} updates",
                     sec, peak, f"{per_update_n:.2f} s per update"
                     + (f" ({per_update[b] / per_update_n:.2f}x one GPU's)" if b in per_update else "")))

    samples = out / "samples"
    sec, peak, kind, _ = stage("sample", "sample.py", "--ckpt", dckpt, "--num-images", num_images, "--batch-size",
                               sample_batch, "--guidance", guidance, "--out", samples, *dev)
    per_image_step = json.loads((samples / "samples.json").read_text())["seconds_sampling"] / (num_images * steps)
    rows.append((f"sample (batch {sample_batch}, guidance {guidance})", f"{num_images} images x {steps} steps", sec, peak,
                 f"{per_image_step:.3f} s per image-step"))

    inception = args.inception or INCEPTION_CACHE
    real_inception = inception.is_file()
    if not real_inception:
        inception = out / "stand-in" / "inception-2015-12-05.pt"
        inception.parent.mkdir(exist_ok=True)
        torch.jit.script(StandInInception()).save(str(inception))
    sec, peak, kind, _ = stage("evaluate", "evaluate.py", samples / "samples.npz", "--ref", samples / "samples.npz",
                               "--features", "inception", "--inception", inception, *dev)
    rows.append(("evaluate (Inception)" if real_inception else "evaluate (stand-in network: time not Inception's)",
                 f"{num_images} images", sec, peak, ""))

    # ---- the table and the projections
    name = torch.cuda.get_device_name(args.device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nconfig {args.config}, device {args.device} ({name}), DDIM steps {steps}, W{args.wbits}A4, peak memory: {kind}")
    print("| stage | work | wall s | peak GiB | rate |")
    print("|---|---|---|---|---|")
    for stage_name, work, sec, peak, rate in rows:
        print(f"| {stage_name} | {work} | {sec:.0f} | {peak:.2f} | {rate} |")
    if 4 in per_update:
        upd4, mem4, how = per_update[4], distill_peaks[4], "measured"
    elif len(per_update) >= 2:  # linear in the batch, through the two smallest measured
        (b1, b2) = sorted(per_update)[:2]
        slope = lambda d: (d[b2] - d[b1]) / (b2 - b1)
        upd4 = per_update[b2] + slope(per_update) * (4 - b2)
        mem4 = distill_peaks[b2] + slope(distill_peaks) * (4 - b2)
        how = f"projected linearly from batch {b1} and {b2}"
    else:
        upd4 = mem4 = None
        how = "not projected (needs batch 4, or two batch sizes)"
    if upd4 is not None:
        print(f"distillation at the paper's batch 4, rank {args.lora_rank} ({how}): peak {mem4:.2f} GiB, "
              f"{upd4:.2f} s per update -> {PAPER_UPDATES} updates {upd4 * PAPER_UPDATES / 3600:.1f} h")
    print(f"sampling {PAPER_SAMPLES} images x {PAPER_STEPS} steps at batch {sample_batch}: "
          f"{per_image_step * PAPER_SAMPLES * PAPER_STEPS / 3600:.1f} h")
    (out / "fullsize.json").write_text(json.dumps(dict(
        config=args.config, device=args.device, device_name=name, ddim_steps=steps, peak_kind=kind,
        rows=[dict(stage=r[0], work=r[1], seconds=r[2], peak_gib=r[3], rate=r[4]) for r in rows],
        distill_seconds_per_update=per_update, distill_batch4=dict(how=how, peak_gib=mem4, seconds_per_update=upd4),
        sampling_seconds_per_image_step=per_image_step), indent=1))


if __name__ == "__main__":
    main()
