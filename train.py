"""Trains the embedded default from scratch on the CPU: the class-conditional pixel-space diffusion
model on 8x8 digits (--net unet), or the small digit classifier that checks its samples and serves as
evaluate.py's in-domain feature network (--net classifier). The defaults reproduce the shipped files
in checkpoints/ (train the classifier first: the UNet run ends by classifying its own samples with
the shipped classifier). Outputs go to runs/train/ unless --out names another file, so the shipped
files change only when asked:

    python train.py --net classifier                   # -> runs/train/digits_classifier.pt
    python train.py --net unet                         # -> runs/train/digits_unet.pt
    python train.py --net unet --resume                # continue a killed run from its last checkpoint
    python train.py --net unet --out checkpoints/digits_unet.pt --force   # replace the shipped file
"""
import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.cli import (add_trust_flag, check_folder, check_output, exit_on_interrupt, finite_float, load_resume_state,
                        plain_args, positive_float, positive_int, unit_float)
from models.checkpoint import classifier_checkpoint, fp_checkpoint, load_classifier, save_atomic
from models.classifier import DigitClassifier
from models.diffusion import DDIM, ddim_sample, randn_per_sample, sample_generators
from models.digits import DEFAULT_CLASSIFIER, DIGITS_CONFIG, load_digits, to_model_range
from models.ldm import DiffusionModel
from models.safe_load import allow_pickle

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--net", choices=["unet", "classifier"], default="unet")
parser.add_argument("--steps", type=positive_int, default=None, help="default: 5000 (unet), 1500 (classifier)")
parser.add_argument("--batch-size", type=positive_int, default=128)
parser.add_argument("--lr", type=positive_float, default=None, help="default: 5e-4 (unet), 1e-3 (classifier)")
parser.add_argument("--ema-decay", type=unit_float, default=0.999, help="unet: the shipped weights are the EMA")
parser.add_argument("--class-dropout", type=unit_float, default=0.1, help="unet: label -> unconditional, for guidance")
parser.add_argument("--holdout", type=positive_int, default=300, help="classifier: images held out to measure accuracy")
parser.add_argument("--eval-samples", type=positive_int, default=1000, help="unet: samples classified at the end")
parser.add_argument("--guidance", type=finite_float, default=2.0, help="unet: guidance scale of the final check")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", type=Path, default=None,
                    help="default: runs/train/digits_<net>.pt (the shipped files in checkpoints/ are replaced only "
                         "when named here, with --force)")
parser.add_argument("--run-dir", type=Path, default=None, help="training state; default runs/train_<net>")
parser.add_argument("--ckpt-every", type=positive_int, default=500, help="a killed run loses at most this many steps")
parser.add_argument("--resume", action="store_true", help="continue from <run-dir>/state.pt")
parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
parser.add_argument("--force", action="store_true", help="replace --out if it exists")
add_trust_flag(parser)
args = parser.parse_args()
allow_pickle(args.trust_checkpoint)
is_unet = args.net == "unet"
steps = args.steps or (5000 if is_unet else 1500)
lr = args.lr or (5e-4 if is_unet else 1e-3)
if not is_unet and args.holdout >= 1797:
    parser.error(f"--holdout must leave training images: the data has 1797, got {args.holdout}")
out_path = check_output(parser, args.out or Path("runs/train") / f"digits_{args.net}.pt", force=args.force)
run_dir = args.run_dir or Path("runs") / f"train_{args.net}"
state_path = run_dir / "state.pt"
if args.resume and not state_path.is_file():
    parser.error(f"--resume: no training state at {state_path}; run without --resume to start")
check_folder(parser, run_dir, "--run-dir")
exit_on_interrupt(f"train.py (continue with --resume from {state_path})")
if args.threads:
    torch.set_num_threads(args.threads)

# ---- data: all 1797 digits for the diffusion model; a fixed held-out split for the classifier
images, labels = load_digits()
x_all, y_all = to_model_range(images), labels
split = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(1234))
if not is_unet:
    test_idx, train_idx = split[:args.holdout], split[args.holdout:]
    x_test, y_test = x_all[test_idx], y_all[test_idx]
    x_all, y_all = x_all[train_idx], y_all[train_idx]

# ---- model, optimiser, state
torch.manual_seed(args.seed)
if is_unet:
    model = DiffusionModel(DIGITS_CONFIG)
    ema = copy.deepcopy(model).requires_grad_(False)
    sqrt_ac = model.alphas_cumprod.sqrt()
    sqrt_1m_ac = (1 - model.alphas_cumprod).sqrt()
else:
    model = DigitClassifier()
opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0 if is_unet else 1e-4)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))  # short warm-up
gen = torch.Generator().manual_seed(args.seed)  # all batch and noise randomness comes from here
step = 0
# every setting that shapes the run: a resumed run must have been started with the same ones
fingerprint = dict(net=args.net, steps=steps, batch_size=args.batch_size, lr=lr, ema_decay=args.ema_decay,
                   class_dropout=args.class_dropout, holdout=args.holdout, seed=args.seed)
if args.resume:
    state = load_resume_state(parser, state_path, fingerprint)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    gen.set_state(state["gen"])
    step = state["step"]
    if is_unet:
        ema.load_state_dict(state["ema"])
    print(f"resumed {state_path} at step {step}/{steps}")


def save_state():
    state = dict(fingerprint=fingerprint, step=step, model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                 gen=gen.get_state(), args=plain_args(args))
    if is_unet:
        state["ema"] = ema.state_dict()
    save_atomic(state, state_path)


def shift(x, g):
    """Random translation by up to one pixel (classifier augmentation; zero padding = background)."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    return torch.roll(F.pad(x, (1, 1, 1, 1), value=-1.0), (dy, dx), dims=(2, 3))[:, :, 1:-1, 1:-1]


# ---- train
model.train()
t0 = time.time()
bar = tqdm(initial=step, total=steps, desc=f"train {args.net}")
while step < steps:
    idx = torch.randint(len(x_all), (args.batch_size,), generator=gen)
    x, y = x_all[idx], y_all[idx]
    if is_unet:
        t = torch.randint(0, len(sqrt_ac), (len(x),), generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        drop = torch.rand(len(y), generator=gen) < args.class_dropout
        y = torch.where(drop, model.cond_stage_model.null_class, y)
        x_t = sqrt_ac[t].view(-1, 1, 1, 1) * x + sqrt_1m_ac[t].view(-1, 1, 1, 1) * noise
        loss = F.mse_loss(model.unet(x_t, t, model.cond_stage_model(y)), noise)
    else:
        loss = F.cross_entropy(model(shift(x, gen)), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    if is_unet:
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - args.ema_decay)
    step += 1
    bar.update()
    bar.set_postfix(loss=f"{loss.item():.4f}")
    if step % args.ckpt_every == 0 or step == steps:
        save_state()
bar.close()
train_time = time.time() - t0

# ---- measure and export
if is_unet:
    model = ema.eval()
    extra = {}
    if DEFAULT_CLASSIFIER.is_file():
        clf = load_classifier(DEFAULT_CLASSIFIER)
        ddim = DDIM(model.alphas_cumprod, steps=20)
        correct = 0
        for start in tqdm(range(0, args.eval_samples, 250), desc="classify samples"):
            ids = range(start, min(start + 250, args.eval_samples))
            y = torch.tensor([i % 10 for i in ids])
            gens = sample_generators(args.seed + 1, ids)
            ctx, uctx = model.context(y)
            x = ddim_sample(model.unet, ddim, randn_per_sample(gens, model.latent_shape), ctx, uctx, args.guidance, gens)
            with torch.no_grad():
                correct += (clf(model.decode(x)).argmax(1) == y).sum().item()
        extra["sample_class_accuracy"] = dict(accuracy=correct / args.eval_samples, samples=args.eval_samples,
                                              guidance=args.guidance, ddim_steps=20)
        print(f"classifier accuracy on {args.eval_samples} class-conditioned samples "
              f"(guidance {args.guidance}, DDIM 20): {correct / args.eval_samples:.3f}")
    ckpt = fp_checkpoint(model, train_args=plain_args(args), train_steps=steps, train_seconds=train_time, **extra)
else:
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"held-out accuracy on {len(x_test)} real digits: {acc:.3f}")
    ckpt = classifier_checkpoint(model, heldout_accuracy=acc, train_args=plain_args(args), train_seconds=train_time)
ckpt["train_args"] = {k: str(v) if isinstance(v, Path) else v for k, v in ckpt["train_args"].items()}
save_atomic(ckpt, out_path)
print(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB) after {train_time / 60:.1f} min of training")
