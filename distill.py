"""TRD: data-free LoRA distillation of a quantized model from its full-precision model, with the
time-smoothed relation loss. Reads a quantize.py checkpoint, writes a distilled one (LoRA merged,
weights quantized once) that sample.py reads. A checkpoint with a float low-rank branch
(quantize.py --lowrank) trains the branch in place of the LoRA and keeps it beside the weights.

    python distill.py --qckpt runs/quant/w2a4_omq.pt                 # MPQ-DM (MSE + TRD)
    python distill.py --qckpt runs/quant/w2a4_uniform.pt --trd off   # EfficientDM-style baseline
    python distill.py --qckpt ... --resume                           # continue a killed run
    torchrun --nproc_per_node 4 distill.py --qckpt ...               # the same run on 4 GPUs (DDP)

Each iteration runs --batch-size full-precision DDIM trajectories (random classes, guidance) and
makes one update per sampling step: the quantized model predicts eps for the same (x_t, t, context)
as the FP model, with that step's activation parameters; the trajectory follows the FP prediction.

Loss per update: MSE(eps_q, eps_fp), on the guided eps as in the official code (--mse-target
halves: on the UNet's unconditional and conditional outputs instead), plus, at the last step of
each window of --window steps, lambda * KL(relation_fp || relation_q) of the window's mean
features (the official schedule; --trd-every step adds it at every step, on the window so far).
Relation maps come from the output features of --feature-block (default: the last output block,
before the final norm and conv). In the window mean the earlier steps' quantized features enter
detached (their update is done) and the current step's stay in the graph, so the relation term
sends a gradient into the quantized model (the official code detaches them all).

Under torchrun each of the N processes runs batch-size / N of every iteration's trajectories (the
same ones a single process runs: a trajectory is fixed by the seed and its index) and
DistributedDataParallel averages the gradients, so each update is the single-process update; rank 0
alone writes the checkpoints, the resume state and the report.

--teacher-cache DIR keeps the FP teacher's side of each iteration (every step's inputs, output and
features) in DIR: the runs of one training seed walk the same trajectories whatever the quantized
model, so a later run reads them instead of running the teacher, and trains on the same tensors bit
for bit (bench/reproduce.py shares one directory across its runs).

Reductions: MSE is the mean over elements; the KL is summed over each relation row's distribution
and averaged over rows and samples, so neither scale depends on batch or image size. The official
code uses summed MSE + 100 x summed KL, the KL over both guidance halves' features and the MSE over
the one guided eps; with these means that is lambda = 100 * 2 * (feature H*W) / (eps C*H*W), which
is what --lam auto computes (200 for the 1-channel digits, 66.7 for LDM-4's 3-channel latents with
the default feature block; without the factor 2 where the MSE covers both halves or there is no
guidance).

LDM-4 ImageNet settings of the official code: --lora-rank 32 --steps 20 --eta 0 --guidance 3.0
--iters 200 --batch-size 4 (800 trajectories of 4 random classes = 16,000 updates), AdamW with linear
decay, --lr-lora auto (per layer: that layer's mean weight step size / 2500), --lr-wq 1e-6, --lr-act 5e-4.
The W8A8 layers (time embedding, first and last conv) train too, unless --freeze-w8a8 (the official
code's choice: no LoRA, quantizers kept); on the embedded default freezing them left a 1.7x larger
eps MSE after distillation at W2A4 (see README).
"""
import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.cli import (add_trust_flag, auto_or, check_device, check_finite, check_output, exit_on_interrupt,
                        finite_float, init_distributed, load_resume_state, nonneg_float, plain_args, positive_float,
                        positive_int)
from models.checkpoint import fp_fingerprint, load_quant_model, quant_checkpoint, write_packed
from models.files import save_atomic, save_with_report, sha256_file
from models.diffusion import DDIM, combine_guidance, is_guided
from models.core.quant import WeightRefresher, quant_layers, refresh_weights, set_step
from models.safe_load import allow_pickle
from models.seeds import HELD_OUT_SEED_OFFSET
from models.trajectory import TeacherCache, eps_mse, fp_trajectory
from models.core.trd import WindowSmoother, relation_kl


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qckpt", type=Path, default=Path("runs/quant/w2a4_omq.pt"), help="quantize.py checkpoint")
    parser.add_argument("--trd", choices=["on", "off"], default="on", help="off: MSE only (EfficientDM-style baseline)")
    parser.add_argument("--lam", type=auto_or(nonneg_float), default="auto",
                        help="weight of the relation loss (auto: the official weighting)")
    parser.add_argument("--window", type=positive_int, default=2, help="steps per smoothing window")
    parser.add_argument("--trd-every", choices=["window", "step"], default="window",
                        help="window: the relation loss once per window, at its last step (official); step: at every step")
    parser.add_argument("--mse-target", choices=["guided", "halves"], default="guided",
                        help="guided: MSE of the guided eps (official); halves: of both guidance halves' UNet outputs")
    parser.add_argument("--temperature", type=positive_float, default=1.0, help="softmax temperature of the relation maps")
    parser.add_argument("--feature-block", type=int, default=-1, help="index into output_blocks (default: the last)")
    parser.add_argument("--lora-rank", type=positive_int, default=8)
    parser.add_argument("--lr-lora", type=auto_or(positive_float), default="auto",
                        help="LoRA learning rate; auto: per layer, its own mean weight quantizer step size / 2500")
    parser.add_argument("--lr-mult", type=positive_float, default=1.0, help="multiplies every LoRA learning rate")
    parser.add_argument("--freeze-w8a8", action="store_true",
                        help="train only the low-bit layers, as the official code (default: the W8A8 layers train too)")
    parser.add_argument("--lr-wq", type=nonneg_float, default=1e-6, help="weight quantizer scales")
    parser.add_argument("--lr-act", type=nonneg_float, default=5e-4, help="per-step activation scales and zero-points")
    parser.add_argument("--iters", type=positive_int, default=40, help="iterations (each: --batch-size trajectories)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="trajectories per iteration")
    parser.add_argument("--guidance", type=finite_float, default=None, help="default: the one used by quantize.py")
    parser.add_argument("--eval-samples", type=positive_int, default=64, help="held-out trajectories for the eps-MSE check")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also measure the held-out eps MSE every this many iterations, into the history (0: only "
                             "before and after; it follows training, so it is the unmerged model, before float16 rounding)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pack", action="store_true", help="also write <out>.packed.pt: weights bit-packed at their bit-widths")
    parser.add_argument("--recompute", action="store_true",
                        help="keep only each quantized layer's input for backward and recompute the rest there "
                             "(less activation memory, about a third more time)")
    parser.add_argument("--teacher-cache", type=Path, default=None,
                        help="directory that keeps the FP teacher's trajectories for other runs of this seed (see the top)")
    parser.add_argument("--profile", action="store_true",
                        help="time each part of an update (teacher, weight refresh, student forward, losses, backward, "
                             "optimizer) into the report JSON; synchronizes CUDA, so it slows a GPU run a little")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: <qckpt stem>_trd|_mse.pt beside it")
    parser.add_argument("--ckpt-every", type=positive_int, default=5, help="iterations between resumable checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from <out>.state.pt")
    parser.add_argument("--force", action="store_true", help="replace --out (and its .json) if it exists")
    add_trust_flag(parser)
    args = parser.parse_args(argv)
    allow_pickle(args.trust_checkpoint)
    device = check_device(parser, args.device)
    if args.eval_every < 0:
        parser.error(f"--eval-every must be 0 (off) or a number of iterations, got {args.eval_every}")
    if not args.qckpt.is_file():
        parser.error(f"--qckpt: no checkpoint at {args.qckpt}; run quantize.py first")
    out_path = check_output(parser, args.out or args.qckpt.with_name(f"{args.qckpt.stem}_{'trd' if args.trd == 'on' else 'mse'}.pt"),
                            inputs=[args.qckpt], force=args.force)
    state_path = out_path.with_name(out_path.name + ".state.pt")
    if args.resume and not state_path.is_file():
        parser.error(f"--resume: no training state at {state_path}; run without --resume to start")
    exit_on_interrupt("distill.py (continue from its last state with --resume)")
    device, rank, world = init_distributed(device)  # torchrun: one process per GPU (gloo on the CPU)
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} must be divisible by the {world} processes: each runs an equal share "
                     f"of every iteration's trajectories")
    torch.manual_seed(args.seed)
    t_start = time.time()

    # every setting that shapes the run: a resumed run must have been started with the same ones
    STATE_FORMAT = 4  # 1: trainable tensors named 'unet.*'; 2: one LoRA rate for all layers; 3: relation loss every step
    fingerprint = dict(state_format=STATE_FORMAT, qckpt_sha256=sha256_file(args.qckpt), **{k: getattr(args, k) for k in (
        "trd", "lam", "window", "trd_every", "mse_target", "temperature", "feature_block", "lora_rank", "lr_lora", "lr_mult", "freeze_w8a8", "lr_wq", "lr_act", "iters",
        "batch_size", "guidance", "seed")}, world_size=world)
    if args.resume:
        state = load_resume_state(parser, state_path, fingerprint, {"qckpt_sha256": "the --qckpt file (it changed since)",
                                                                    "state_format": "an older version of distill.py",
                                                                    "world_size": "another number of processes (torchrun "
                                                                                  "--nproc_per_node)"},
                                  missing={"world_size": 1})

    # ---- load: the FP teacher and the quantized student
    try:
        fp_model, qmodel, qckpt = load_quant_model(args.qckpt)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    n_blocks = len(qmodel.unet.output_blocks)
    if not -n_blocks <= args.feature_block < n_blocks:
        parser.error(f"--feature-block {args.feature_block}: this UNet has {n_blocks} output blocks "
                     f"(use {-n_blocks}..{n_blocks - 1}; -1 is the last)")
    settings = qmodel.quant_settings
    guidance = settings["guidance"] if args.guidance is None else args.guidance
    fp_model.to(device).requires_grad_(False)
    qmodel.to(device).requires_grad_(False)
    ddim = DDIM(fp_model.alphas_cumprod, steps=settings["steps"], eta=settings["eta"])
    layers = quant_layers(qmodel.unet)
    trained = {n: m for n, m in layers.items() if m.mode == "quant" or (m.mode == "w8a8" and not args.freeze_w8a8)}
    lora_gen = torch.Generator().manual_seed(args.seed)
    for m in trained.values():
        if m.lowrank_U is None:  # a layer with a float branch (quantize.py --lowrank) trains it as its LoRA instead
            m.add_lora(args.lora_rank, lora_gen)
        m.recompute = args.recompute
    if settings.get("lowrank") and rank == 0:
        ranks = sorted({m.lowrank_U.shape[1] for m in trained.values() if m.lowrank_U is not None})
        print(f"the quantized model has a float branch (rank {', '.join(map(str, ranks))}) in "
              f"{sum(m.lowrank_U is not None for m in trained.values())} low-bit layers: it trains there in place of a "
              f"rank-{args.lora_rank} LoRA (which the other layers still get)")
    held_out_seed = args.seed + HELD_OUT_SEED_OFFSET
    if rank == 0:  # the report's figure: one process computes it
        mse_before = eps_mse(fp_model, qmodel, ddim, args.eval_samples, args.batch_size, held_out_seed, guidance, device)

    # ---- optimiser: LoRA, weight-quantizer scales (tiny lr), per-step activation parameters
    # LoRA rates per layer from that layer's own quantizer, so that a layer trains at the same rate
    # whatever the other layers' smoothing or bits, and whichever method quantized them
    lr_lora = {n: args.lr_mult * (m.lora_step_size() / 2500 if args.lr_lora == "auto" else float(args.lr_lora))
               for n, m in trained.items()}
    groups = [dict(params=[m.lora_A, m.lora_B] if m.lowrank_U is None else [m.lowrank_U, m.lowrank_V], lr=lr_lora[n])
              for n, m in trained.items()] + [
        dict(params=[m.w_scale for m in trained.values()], lr=args.lr_wq),
        dict(params=[p for m in trained.values() for p in (m.a_scale, m.a_zero)], lr=args.lr_act),
    ]
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    total_updates = args.iters * ddim.steps
    opt = torch.optim.AdamW(groups, weight_decay=0.0, fused=True)  # one kernel per group: the per-tensor loop was 7 % of an update
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: max(0.0, 1 - u / total_updates))
    start_iter = 0
    history = []
    if args.resume:
        qmodel.unet.load_state_dict(state["trainable"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_iter, history = state["iter"], state["history"]
        if rank == 0:
            print(f"resumed {state_path} at iteration {start_iter}/{args.iters}")
    student = qmodel.unet
    if world > 1:  # averages the trainable parameters' gradients over the processes in backward
        student = torch.nn.parallel.DistributedDataParallel(qmodel.unet, device_ids=[device] if device.type == "cuda" else None,
                                                            broadcast_buffers=False)

    # ---- the relation loss on the feature block's output
    def feature_hook(store):
        return lambda module, inp, out: store.__setitem__("f", out)

    fp_feat, q_feat = {}, {}
    fp_model.unet.output_blocks[args.feature_block].register_forward_hook(feature_hook(fp_feat))
    qmodel.unet.output_blocks[args.feature_block].register_forward_hook(feature_hook(q_feat))
    with torch.no_grad():  # one dry call: is the trajectory guided, and the feature block's output size
        y = torch.zeros(1, dtype=torch.long, device=device)
        context, uncond = fp_model.context(y)
        fp_model.unet(torch.zeros(1, *fp_model.latent_shape, device=device), y, context)
    guided = is_guided(context, uncond, guidance)
    mse_guided = guided and args.mse_target == "guided"
    lam = None  # the relation loss's weight; None: no relation loss (--trd off)
    if args.trd == "on" and args.lam != "auto":
        lam = float(args.lam)
    elif args.trd == "on":  # the official summed weighting for our mean reductions (see the top)
        lam = (200.0 if mse_guided else 100.0) * fp_feat["f"].shape[2] * fp_feat["f"].shape[3] / math.prod(fp_model.latent_shape)
    teacher = fp_trajectory
    if args.teacher_cache:  # everything that fixes the teacher's tensors, and nothing else (not the quantized model)
        cache = TeacherCache(args.teacher_cache, fp=fp_fingerprint(qckpt["fp"]), guidance=guidance, steps=ddim.steps,
                             eta=ddim.eta, timesteps=[int(t) for t in ddim.timesteps], feature_block=args.feature_block,
                             device=device.type, threads=torch.get_num_threads())
        teacher = lambda *a: cache.steps(*a, features=fp_feat)  # noqa: E731
    relation_steps = [i for i in range(ddim.steps) if lam is not None and (
        args.trd_every == "step" or (i + 1) % args.window == 0 or i == ddim.steps - 1)]  # a last, shorter window too

    # ---- train
    phase_seconds = dict.fromkeys(["teacher", "weight refresh", "student forward", "losses", "backward", "optimizer"], 0.0)

    t_lap = 0.0  # lap(): the time of the last lap

    def lap(phase=None):
        """--profile: adds the time since the last lap to `phase`."""
        nonlocal t_lap
        if args.profile:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            if phase:
                phase_seconds[phase] += now - t_lap
            t_lap = now

    fp_model.unet.eval()
    qmodel.unet.train()
    refresh = WeightRefresher(qmodel.unet)  # refresh_weights, the small layers in one call
    bar = tqdm(total=args.iters, initial=start_iter, desc=f"distill ({'MSE+TRD' if args.trd == 'on' else 'MSE'})",
               disable=rank != 0)
    t_train = time.time()
    for it in range(start_iter, args.iters):
        # trajectories of this iteration are fixed by (seed, index): a resumed run redraws the same ones
        share = args.batch_size // world  # this process's part of the iteration's trajectories
        ids = range(it * args.batch_size + rank * share, it * args.batch_size + (rank + 1) * share)
        smooth_fp, smooth_q = WindowSmoother(args.window), WindowSmoother(args.window)
        loss_trd = torch.zeros((), device=device)
        mse_sum = torch.zeros((), device=device)  # over the iteration's updates: the training MSE the history logs
        lap()
        for i, inputs, out_fp in teacher(fp_model, ddim, ids, args.seed, guidance, device):  # fp_feat: its features
            lap("teacher")
            refresh()  # fake-quantize the weights once for this update
            set_step(qmodel.unet, i)
            lap("weight refresh")
            out_q = student(*inputs)
            lap("student forward")
            if mse_guided:
                loss_mse = F.mse_loss(combine_guidance(out_q, guidance), combine_guidance(out_fp, guidance))
            else:
                loss_mse = F.mse_loss(out_q, out_fp)
            loss = loss_mse
            feats = smooth_fp(i, fp_feat["f"]), smooth_q(i, q_feat["f"])  # every step enters its window
            if i in relation_steps:
                loss_trd = relation_kl(*feats, args.temperature)
                loss = loss + lam * loss_trd
            finite = torch.isfinite(loss.detach())
            if world > 1:  # every process stops together
                finite = finite.float()
                torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
            if not finite:
                raise SystemExit(f"error: the loss is {loss.item()} at iteration {it + 1}, step {i + 1}; stopped, nothing "
                                 f"was written. Lower the learning rates, or check --temperature and --guidance")
            mse_sum += loss_mse.detach()
            lap("losses")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lap("backward")
            opt.step()
            sched.step()
            lap("optimizer")
        logged = torch.stack([loss_mse.detach(), loss_trd.detach(), mse_sum / ddim.steps])
        if world > 1:  # the mean over all trajectories, as one process logs it
            torch.distributed.all_reduce(logged)
            logged /= world
        mse_logged, trd_logged, mse_mean = logged.tolist()
        history.append(dict(iter=it + 1, mse=mse_logged, trd=trd_logged, mse_mean=mse_mean))
        if args.eval_every > 0 and (it + 1) % args.eval_every == 0 and rank == 0:
            with torch.no_grad():
                refresh_weights(qmodel.unet)  # the weights after this iteration's last update
                parts = eps_mse(fp_model, qmodel, ddim, args.eval_samples, args.batch_size, held_out_seed, guidance, device,
                                parts=True)
                history[-1]["eps_mse_held_out"] = parts.pop("both")
                history[-1].update({f"eps_mse_held_out_{k}": v for k, v in parts.items()})  # guided, and each half
        bar.update()
        bar.set_postfix(mse=f"{mse_logged:.5f}", trd=f"{trd_logged:.5f}")
        if (it + 1) % args.ckpt_every == 0 and it + 1 < args.iters and rank == 0:
            trainable = {k: v for k, v in qmodel.unet.state_dict().items()
                         if k.endswith(("lora_A", "lora_B", "lowrank_U", "lowrank_V", "w_scale", "a_scale", "a_zero"))}
            save_atomic(dict(fingerprint=fingerprint, iter=it + 1, trainable=trainable,
                             opt=opt.state_dict(), sched=sched.state_dict(), history=history, args=plain_args(args)), state_path)
    bar.close()
    seconds_train, updates_run = time.time() - t_train, (args.iters - start_iter) * ddim.steps
    if world > 1:  # the trained parameters are the same in every process: rank 0 checks and writes the result
        torch.distributed.barrier()  # every process is done with every collective before the group goes
        torch.distributed.destroy_process_group()
        if rank != 0:
            raise SystemExit(0)

    # ---- merge LoRA into the weights (a float branch stays beside them), quantize once, check and save
    qmodel.unet.eval().requires_grad_(False)
    for m in trained.values():
        m.round_params()  # as the packed file stores them
        m.merge_lora()
    check_finite("the distilled model's weights", *qmodel.parameters(), hint="lower the learning rates")
    parts_after = eps_mse(fp_model, qmodel, ddim, args.eval_samples, args.batch_size, held_out_seed, guidance, device,
                          parts=True)
    mse_after = parts_after.pop("both")  # the mean over both guidance halves; parts_after: the guided eps and each half
    print(f"eps MSE vs FP on {args.eval_samples} held-out trajectories: before {mse_before:.5f}, after {mse_after:.5f} "
          f"({'MSE+TRD' if args.trd == 'on' else 'MSE only'}, {args.iters * args.batch_size} trajectories, "
          f"{total_updates} updates)")
    distill_settings = dict(trd=args.trd, lam=lam, window=args.window, trd_every=args.trd_every, mse_target=args.mse_target,
                            relation_steps=relation_steps, temperature=args.temperature,
                            feature_block=args.feature_block, lora_rank=args.lora_rank, lr_lora=args.lr_lora,
                            lr_mult=args.lr_mult, freeze_w8a8=args.freeze_w8a8, lr_wq=args.lr_wq,
                            lr_act=args.lr_act, iters=args.iters, batch_size=args.batch_size, guidance=guidance, seed=args.seed)
    elapsed = time.time() - t_start
    ckpt = quant_checkpoint(qmodel.cpu(), qckpt["fp"], report=qckpt.get("report"), distill=distill_settings,
                            eps_mse_before=mse_before, eps_mse=mse_after, history=history, source=str(args.qckpt))
    save_with_report(ckpt, out_path, dict(distill=distill_settings, eps_mse_before=mse_before, eps_mse_after=mse_after,
                                          **{f"eps_mse_after_{k}": v for k, v in parts_after.items()},
                                          seconds=elapsed, seconds_train=seconds_train, updates_run=updates_run,
                                          lr_lora_per_layer=lr_lora, history=history,
                                          **({"teacher_cache": dict(dir=str(args.teacher_cache), batches_read=cache.hits,
                                                                    batches_computed=cache.misses)} if args.teacher_cache else {}),
                                          **({"seconds_per_update_by_phase": {k: v / max(updates_run, 1) for k, v in phase_seconds.items()}}
                                             if args.profile else {})))
    if args.pack:
        write_packed(qmodel, out_path.with_suffix(".packed.pt"), distill=distill_settings)
    state_path.unlink(missing_ok=True)
    if args.teacher_cache:
        print(f"teacher cache {args.teacher_cache}: {cache.hits} batches read, {cache.misses} computed and written")
    print(f"wrote {out_path} in {elapsed:.0f} s ({seconds_train / max(updates_run, 1):.2f} s per update)")
    if device.type == "cuda":
        print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")


if __name__ == "__main__":
    main()
