"""Quantizes a full-precision diffusion model with OMQ (outlier-driven mixed precision) or uniform
bits, calibrated on the model's own DDIM trajectory. Writes a quantized checkpoint that distill.py
and sample.py read, and a per-layer report (JSON) beside it.

    python quantize.py --wbits 2 --abits 4                      # the embedded default, OMQ
    python quantize.py --wbits 2 --abits 4 --method uniform     # the EfficientDM-style baseline
    python quantize.py --ckpt model.ckpt --config cin256-v2 --guidance 3.0 --calib-samples 256
    python quantize.py --wbits 2 --abits 4 --lowrank 4          # + a float rank-4 branch per layer (LoftQ)
    python quantize.py --wbits 2 --abits 4 --lowrank-budget 3.5 # branches where they pay, 3.5 bits per weight in all

--lowrank-budget B gives each low-bit layer the branch rank (0, 1, 2, 4, ... --lowrank-max) that a
budget of B stored bits per weight of the UNet (models/core/bits.py: every overhead counted) buys best:
each layer is calibrated at every rank, and ranks are given greedily, the largest fall in the layer's
relative output error (its output MSE over the FP output's mean square: raw errors scale with each
layer's output, not with its effect) per added bit first (models/core/lowrank.py: allocate_ranks).
The chosen ranks are in settings and in <out>.json.

Calibration: --calib-samples trajectories (random classes, guidance as in sampling) are run with
the full-precision model; the UNet inputs (x_t, t, context) of every step are kept, then each layer's
inputs are recorded from them, --calib-keep samples per step, a group of layers at a time so that
at most --calib-mem-gb of activations are held.
"""
import argparse
import copy
import time
from pathlib import Path

import torch
from tqdm import tqdm

from models.core.allocate import calibrate_layer
from models.calibration import calibration_groups, layer_inputs, unet_inputs_per_step
from models.cli import (add_trust_flag, check_device, check_finite, check_output, check_steps, exit_on_interrupt,
                        finite_float, nonneg_float, positive_float, positive_int)
from models.checkpoint import fp_reference, load_fp_model, quant_checkpoint, write_packed
from models.files import save_with_report
from models.diffusion import DDIM
from models.core.bits import BITS_COUNT, layer_bits, stored_bits
from models.core.lowrank import allocate_ranks
from models.digits import DEFAULT_CHECKPOINT
from models.qmodel import build_quant_model
from models.core.quant import quant_layers, refresh_weights
from models.safe_load import allow_pickle
from models.seeds import HELD_OUT_SEED_OFFSET
from models.trajectory import eps_mse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=DEFAULT_CHECKPOINT, help="full-precision model (default: digits)")
    parser.add_argument("--config", default=None, help="official LDM checkpoints: name or YAML (guessed if omitted)")
    parser.add_argument("--wbits", type=int, default=2, help="target weight bits n, 2..8 (OMQ uses n-1, n, n+1)")
    parser.add_argument("--abits", type=int, default=4, help="activation bits, 2..8")
    parser.add_argument("--method", default="omq",
                        help="omq (mixed precision by kurtosis), uniform (baseline), or random (control: OMQ's numbers of "
                             "n+1/n-1 channels per layer, on channels drawn at random)")
    parser.add_argument("--smooth", choices=["search", "on", "off"], default=None,
                        help="per-input-channel smoothing s = sqrt(max|x| / max|W|): on, off, or search (per layer, "
                             "kept where it lowers the layer's output error). Default: search for omq and random, off for uniform")
    parser.add_argument("--group-frac", type=positive_float, default=0.1,
                        help="OMQ split search step, fraction of channels (0 < f <= 0.5)")
    parser.add_argument("--quantize-all", action="store_true", help="also quantize skip-connection/downsample convs")
    parser.add_argument("--quantize-conv1d", action="store_true",
                        help="also quantize the Conv1d qkv/proj_out of LSUN attention blocks (the official code does not)")
    parser.add_argument("--lowrank", type=int, default=0, help="rank R of a float branch beside every low-bit layer (0: none)")
    parser.add_argument("--lowrank-init", choices=["svd", "loftq"], default="loftq",
                        help="svd: the branch is the smoothed weight's top R singular directions; loftq: then --lowrank-rounds "
                             "rounds of refitting it to the residual's quantization error (each kept only if it helps)")
    parser.add_argument("--lowrank-rounds", type=positive_int, default=5, help="LoftQ rounds (--lowrank-init loftq)")
    parser.add_argument("--lowrank-budget", type=positive_float, default=None,
                        help="stored bits per weight of the UNet, every overhead counted: branch ranks per layer within it")
    parser.add_argument("--lowrank-max", type=positive_int, default=8, help="--lowrank-budget: the largest rank a layer gets")
    parser.add_argument("--steps", type=positive_int, default=20, help="DDIM steps the quantized model will sample with")
    parser.add_argument("--eta", type=nonneg_float, default=0.0)
    parser.add_argument("--guidance", type=finite_float, default=2.0, help="classifier-free guidance of the trajectories")
    parser.add_argument("--calib-samples", type=positive_int, default=128, help="calibration trajectories")
    parser.add_argument("--calib-keep", type=positive_int, default=32, help="UNet inputs per step used to calibrate layers")
    parser.add_argument("--calib-mem-gb", type=positive_float, default=4.0, help="activation memory held while calibrating")
    parser.add_argument("--eval-samples", type=positive_int, default=64, help="held-out trajectories for the eps-MSE check")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pack", action="store_true", help="also write <out>.packed.pt: weights bit-packed at their bit-widths")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="default runs/quant/w<n>a<m>_<method>.pt")
    parser.add_argument("--force", action="store_true", help="replace --out (and its .json) if it exists")
    add_trust_flag(parser)
    args = parser.parse_args(argv)
    allow_pickle(args.trust_checkpoint)
    if args.method not in ("omq", "uniform", "random"):
        parser.error(f"unknown --method {args.method!r}: use omq, uniform or random")
    if not 2 <= args.wbits <= 8:
        parser.error(f"--wbits must be 2..8 (OMQ gives some channels n-1 bits, so n = 1 would leave 0 bits), got {args.wbits}")
    if not 2 <= args.abits <= 8:
        parser.error(f"--abits must be 2..8, got {args.abits}")
    if args.lowrank < 0:
        parser.error(f"--lowrank must be 0 (no branch) or a rank, got {args.lowrank}")
    if args.lowrank and args.lowrank_budget is not None:
        parser.error("--lowrank gives every layer one rank, --lowrank-budget chooses ranks per layer: pass one of them")
    if args.group_frac > 0.5:
        parser.error(f"--group-frac must be in (0, 0.5] (n+1 and n-1 channels come in pairs), got {args.group_frac}")
    check_steps(parser, args.steps)
    device = check_device(parser, args.device)
    smooth = args.smooth or ("off" if args.method == "uniform" else "search")
    smooth_alphas = {"on": (0.5,), "off": (0.0,), "search": (0.0, 0.5)}[smooth]
    out_path = check_output(parser, args.out or Path("runs/quant") / f"w{args.wbits}a{args.abits}_{args.method}.pt",
                            inputs=[args.ckpt], force=args.force)
    exit_on_interrupt("quantize.py")
    torch.manual_seed(args.seed)
    t_start = time.time()

    # ---- load the full-precision model
    try:
        model = load_fp_model(args.ckpt, args.config).to(device)
        check_steps(parser, args.steps, model.config["schedule"]["timesteps"])
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    ddim = DDIM(model.alphas_cumprod, steps=args.steps, eta=args.eta)

    # ---- 1. calibration data: UNet inputs of every step, --calib-keep of them per step
    bar = tqdm(total=args.calib_samples * ddim.steps, desc="calibration trajectories")
    calib = unet_inputs_per_step(model, ddim, args.calib_samples, args.calib_keep, args.batch_size, args.seed,
                                 args.guidance, device, progress=bar.update)
    bar.close()

    # ---- 2. the quantized model, each layer calibrated on its full-precision inputs
    settings = dict(wbits=args.wbits, abits=args.abits, steps=args.steps, eta=args.eta, quantize_all=args.quantize_all,
                    quantize_conv1d=args.quantize_conv1d, method=args.method, smooth=smooth, group_frac=args.group_frac,
                    guidance=args.guidance, calib_samples=args.calib_samples, calib_keep=args.calib_keep, seed=args.seed)
    if args.lowrank:  # only then: a checkpoint without a branch keeps today's settings
        settings.update(lowrank=args.lowrank, lowrank_init=args.lowrank_init, lowrank_rounds=args.lowrank_rounds)
    lowrank = (args.lowrank, args.lowrank_init, args.lowrank_rounds) if args.lowrank else None
    qmodel = build_quant_model(model, settings)
    qlayers = quant_layers(qmodel.unet)
    report = {}
    random_channels = torch.Generator().manual_seed(args.seed)  # --method random: its draws, layer after layer
    groups = calibration_groups(model, calib, list(qlayers), args.calib_mem_gb * 2 ** 30, device)
    print(f"recording the layers' inputs in {len(groups)} group{'s' * (len(groups) > 1)} within --calib-mem-gb {args.calib_mem_gb:g}")
    bar = tqdm(total=len(qlayers), desc=f"calibrate ({args.method}, W{args.wbits}A{args.abits})")
    ladder = sorted({min(2 ** i, args.lowrank_max) for i in range(args.lowrank_max.bit_length())})  # 1, 2, 4, ..., max
    candidates, calibrated = {}, {}  # --lowrank-budget: per layer {rank: (relative error, added bits)}, and its states
    stored = lambda m: sum(v for k, v in layer_bits(m).items() if k != "weights")  # noqa: E731  a layer's stored bits
    for name, inputs in layer_inputs(model, calib, groups, device):
        t_layer = time.time()
        q = qlayers[name]
        fresh = copy.deepcopy(q) if args.lowrank_budget is not None and q.mode == "quant" else None
        draws = random_channels.get_state()  # every rank of a layer draws --method random's channels alike
        report[name] = calibrate_layer(q, inputs, args.method, smooth_alphas, args.group_frac, random_channels, lowrank)
        if fresh is not None:
            with torch.no_grad():  # the FP output's mean square over the calibration inputs
                outputs = [fresh.layer(x) for x in inputs.values()]
                energy = sum(y.pow(2).sum().item() for y in outputs) / sum(y.numel() for y in outputs)
                del outputs
            candidates[name] = {0: (report[name]["mse_chosen"] / energy, 0)}
            for r in [r for r in ladder if r <= min(q.layer.weight.shape[0], q.layer.weight[0].numel())]:
                t = copy.deepcopy(fresh)
                t.add_lowrank(r)
                rep = calibrate_layer(t, inputs, args.method, smooth_alphas, args.group_frac,
                                      torch.Generator().set_state(draws), (r, args.lowrank_init, args.lowrank_rounds))
                candidates[name][r] = (rep["mse_chosen"] / energy, stored(t) - stored(q))  # its smoothing's bits too
                calibrated[name, r] = (t.state_dict(), rep)
        report[name]["seconds"] = time.time() - t_layer
        del inputs
        bar.update()
    bar.close()
    if args.lowrank_budget is not None:  # the ranks the budget buys best, then each layer at its rank
        base = stored_bits(qmodel.unet)
        budget = args.lowrank_budget * base["weights"] - base["bits"]
        if budget < 0:
            parser.error(f"--lowrank-budget {args.lowrank_budget:g} is below what the model stores without a branch, "
                         f"{base['bits_per_weight']:.3f} bits per weight")
        ranks, _ = allocate_ranks(candidates, budget)
        ranks = {n: r for n, r in ranks.items() if r}
        for n, r in ranks.items():
            qlayers[n].add_lowrank(r)
            qlayers[n].load_state_dict(calibrated[n, r][0])
            report[n] = dict(calibrated[n, r][1], seconds=report[n]["seconds"])
        for n, options in candidates.items():
            report[n]["lowrank_candidates"] = {str(r): dict(relative_error=e, added_bits=b) for r, (e, b) in options.items()}
        settings.update(lowrank=ranks, lowrank_init=args.lowrank_init, lowrank_rounds=args.lowrank_rounds,
                        lowrank_budget=args.lowrank_budget, lowrank_max=args.lowrank_max)
        qmodel.quant_settings = dict(settings)
        del calibrated
        print(f"--lowrank-budget {args.lowrank_budget:g}: a branch in {len(ranks)} of {len(candidates)} low-bit layers "
              f"(ranks {', '.join(f'{r}: {list(ranks.values()).count(r)}' for r in sorted(set(ranks.values())))})")
    refresh_weights(qmodel.unet)

    # ---- 3. check: one-step eps MSE against FP on held-out trajectories (another seed)
    mse = eps_mse(model, qmodel, ddim, args.eval_samples, args.batch_size, args.seed + HELD_OUT_SEED_OFFSET, args.guidance,
                  device)
    check_finite("the quantized model's eps MSE", torch.tensor(mse))

    # ---- report and save
    print(f"{'layer':48s} {'mode':5s} {'bits':>5s} {'+1/-1':>9s} {'smooth':>6s} {'kurtosis':>15s} {'mse uniform':>12s} "
          f"{'mse chosen':>12s}")
    for n, r in report.items():
        if r["mode"] == "fp":
            print(f"{n:48s} fp")
            continue
        split = f"{r['high']}/{r['low']}" if r["mode"] == "quant" else "-"
        print(f"{n:48s} {r['mode']:5s} {r['mean_bits']:5.2f} {split:>9s} {'yes' if r['smooth_alpha'] else 'no':>6s} "
              f"{r['kurtosis_min']:7.2f}-{r['kurtosis_max']:<7.2f} "
              f"{r['mse_uniform']:12.4e} {r['mse_chosen']:12.4e}")
    mixed = [r for r in report.values() if r["mode"] == "quant"]
    print(f"{len(mixed)} layers at W{args.wbits}A{args.abits} ({sum(r['high'] > 0 for r in mixed)} mixed, "
          f"{sum(r['smooth_alpha'] > 0 for r in mixed)} smoothed), "
          f"{sum(r['mode'] == 'w8a8' for r in report.values())} at W8A8, {sum(r['mode'] == 'fp' for r in report.values())} in FP")
    bits = stored_bits(qmodel.unet)  # the one count every table uses (models/core/bits.py)
    bpw = bits.pop("bits_per_weight")
    print(f"stored: {bpw:.3f} bits per weight of the UNet's {bits['weights']:,} conv/linear weights (codes "
          f"{bits['codes'] / bits['weights']:.3f}, quantizer parameters {bits['quantizer'] / bits['weights']:.3f}"
          + (f", float16 branch {bits['branch'] / bits['weights']:.3f}" if bits["branch"] else "") + ")")
    print(f"eps MSE vs FP over {ddim.steps} steps on {args.eval_samples} held-out trajectories: {mse:.5f}")
    elapsed = time.time() - t_start
    ckpt = quant_checkpoint(qmodel.cpu(), fp_reference(model.cpu(), args.ckpt, args.config), report=report, eps_mse=mse,
                            source=str(args.ckpt))
    json_path = out_path.with_suffix(".json")
    save_with_report(ckpt, out_path, dict(settings=settings, eps_mse=mse, bits_per_weight=bpw, bits_count=BITS_COUNT,
                                              stored_bits=bits, seconds=elapsed, layers=report))
    if args.pack:
        write_packed(qmodel, out_path.with_suffix(".packed.pt"))
    print(f"wrote {out_path} and {json_path} in {elapsed:.0f} s")
    if device.type == "cuda":
        print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")


if __name__ == "__main__":
    main()
