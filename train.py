"""Trains the embedded defaults from scratch on the CPU. Two of them:

  digits  (--data digits) the class-conditional pixel-space diffusion model on 8x8 digits (--net
          unet) and its digit classifier (--net classifier), evaluate.py's in-domain feature network.
  photos  (--data photos) a latent diffusion model of 32x32 patches of ten real photographs
          (models/photos.py): its KL-f4 autoencoder (--net autoencoder), the class-conditional UNet
          on the autoencoder's latents (--net unet; the decoder is copied into the model, so a
          sample decodes to pixels) and its patch classifier (--net classifier).

The defaults reproduce the shipped files in checkpoints/. Order: the classifier first (a UNet run
ends by classifying its own samples with the shipped classifier), and for photos the autoencoder
before the UNet. Outputs go to runs/train/ unless --out names another file, so the shipped files
change only when asked:

    python train.py --net classifier                   # -> runs/train/digits_classifier.pt
    python train.py --net unet                         # -> runs/train/digits_unet.pt
    python train.py --net unet --resume                # continue a killed run from its last checkpoint
    python train.py --net unet --out checkpoints/digits_unet.pt --force   # replace the shipped file
    python train.py --data photos --net autoencoder    # -> runs/train/photo_autoencoder.pt
    python train.py --data photos --net classifier     # -> runs/train/photo_classifier.pt
    python train.py --data photos --net unet --autoencoder runs/train/photo_autoencoder.pt
"""
import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.autoencoder import AutoencoderKL
from models.checkpoint import autoencoder_checkpoint, fp_checkpoint, load_autoencoder
from models.files import save_atomic
from models.classifier import classifier_checkpoint, load_classifier
from models.classifier import CLASSIFIERS
from models.cli import (add_trust_flag, check_folder, check_output, exit_on_interrupt, finite_float, load_resume_state,
                        plain_args, positive_float, positive_int, unit_float)
from models.diffusion import DDIM, ddim_sample, randn_per_sample, sample_generators, to_uint8
from models.digits import DEFAULT_CLASSIFIER, DIGITS_CONFIG, load_digits, to_model_range
from models.ldm import DiffusionModel
from models.paired import psnr
from models.photos import (AUTOENCODER_CONFIG, PHOTO_AUTOENCODER, PHOTO_CLASSIFIER, PHOTO_CONFIG, load_photos,
                           sample_patches)
from models.safe_load import allow_pickle

# (data, net) -> steps, learning rate, batch size
DEFAULTS = {("digits", "unet"): (5000, 5e-4, 128), ("digits", "classifier"): (1500, 1e-3, 128),
            ("photos", "autoencoder"): (3000, 1e-3, 64), ("photos", "unet"): (5000, 5e-4, 128),
            ("photos", "classifier"): (1000, 1e-3, 128)}
PREFIX = {"digits": "digits", "photos": "photo"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["digits", "photos"], default="digits", help="which embedded default")
    parser.add_argument("--net", choices=["unet", "classifier", "autoencoder"], default="unet",
                        help="autoencoder: photos only")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="default: 5000 (unet), 1500 (digits classifier), 1000 (photos classifier), 3000 (autoencoder)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default: 128 (64 for the autoencoder)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="default: 5e-4 (unet), 1e-3 (classifier, autoencoder)")
    parser.add_argument("--ema-decay", type=unit_float, default=0.999, help="unet: the shipped weights are the EMA")
    parser.add_argument("--class-dropout", type=unit_float, default=0.1, help="unet: label -> unconditional, for guidance")
    parser.add_argument("--holdout", type=positive_int, default=300,
                        help="digits classifier: images held out to measure accuracy")
    parser.add_argument("--kl-weight", type=finite_float, default=1e-6,
                        help="autoencoder: weight of the KL term against the summed L1 reconstruction (LDM's kl-f4)")
    parser.add_argument("--autoencoder", type=Path, default=PHOTO_AUTOENCODER,
                        help="photos unet: the first stage whose latents it learns (default: the shipped one)")
    parser.add_argument("--bank", type=positive_int, default=50_000,
                        help="photos unet: training patches encoded once; each step draws latents from their posteriors")
    parser.add_argument("--eval-samples", type=positive_int, default=1000,
                        help="unet: samples classified at the end; photos classifier/autoencoder: held-out patches")
    parser.add_argument("--guidance", type=finite_float, default=2.0, help="unet: guidance scale of the final check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="default: runs/train/<digits|photo>_<net>.pt (the shipped files in checkpoints/ are replaced "
                             "only when named here, with --force)")
    parser.add_argument("--run-dir", type=Path, default=None, help="training state; default runs/train_<data>_<net>")
    parser.add_argument("--ckpt-every", type=positive_int, default=500, help="a killed run loses at most this many steps")
    parser.add_argument("--resume", action="store_true", help="continue from <run-dir>/state.pt")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_trust_flag(parser)
    args = parser.parse_args(argv)
    allow_pickle(args.trust_checkpoint)
    photos = args.data == "photos"
    is_unet, is_ae = args.net == "unet", args.net == "autoencoder"
    if is_ae and not photos:
        parser.error("--net autoencoder trains the photograph model's first stage: add --data photos")
    steps, lr, batch_size = DEFAULTS[args.data, args.net]
    steps, lr, batch_size = args.steps or steps, args.lr or lr, args.batch_size or batch_size
    if not photos and args.net == "classifier" and args.holdout >= 1797:
        parser.error(f"--holdout must leave training images: the data has 1797, got {args.holdout}")
    if photos and is_unet and not args.autoencoder.is_file():
        parser.error(f"--autoencoder {args.autoencoder} does not exist; train it first: "
                     f"python train.py --data photos --net autoencoder")
    out_path = check_output(parser, args.out or Path("runs/train") / f"{PREFIX[args.data]}_{args.net}.pt", force=args.force)
    # digits runs keep their old state folder, so that a run started before --data existed resumes
    run_dir = args.run_dir or Path("runs") / (f"train_{args.net}" if not photos else f"train_photos_{args.net}")
    state_path = run_dir / "state.pt"
    if args.resume and not state_path.is_file():
        parser.error(f"--resume: no training state at {state_path}; run without --resume to start")
    check_folder(parser, run_dir, "--run-dir")
    exit_on_interrupt(f"train.py (continue with --resume from {state_path})")
    if args.threads:
        torch.set_num_threads(args.threads)
    classifier_path = PHOTO_CLASSIFIER if photos else DEFAULT_CLASSIFIER

    # ---- data. digits: all 1797 images for the diffusion model, a fixed held-out split for the
    # classifier. photos: patches cropped on the fly (models/photos.py), the held-out columns of every
    # photograph reserved for the held-out figures; the UNet learns the latents of a bank of patches
    # encoded once by the autoencoder.
    heldout_gen = lambda: torch.Generator().manual_seed(1234)  # the held-out patches: the same in every run
    if not photos:
        images, labels = load_digits()
        x_all, y_all = to_model_range(images), labels
        split = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(1234))
        if not is_unet:
            test_idx, train_idx = split[:args.holdout], split[args.holdout:]
            x_test, y_test = x_all[test_idx], y_all[test_idx]
            x_all, y_all = x_all[train_idx], y_all[train_idx]
    else:
        photo_list, photo_meta = load_photos()
        if is_unet:
            autoencoder, ae_config = load_autoencoder(args.autoencoder)
            # the bank's own generator: a resumed run rebuilds the same bank
            bank_x, bank_y = sample_patches(photo_list, photo_meta, args.bank, torch.Generator().manual_seed(args.seed + 1))
            means, stds = [], []
            with torch.no_grad():
                for start in tqdm(range(0, args.bank, 500), desc="encode the patch bank"):
                    m, sd = autoencoder.encode(bank_x[start:start + 500])
                    means.append(m)
                    stds.append(sd)
            bank_mean, bank_std, y_all = torch.cat(means), torch.cat(stds), bank_y
            del bank_x
            # LDM's scale_by_std: latents scaled to unit standard deviation (over the bank's posterior samples)
            z_sample = bank_mean + bank_std * torch.randn(bank_mean.shape, generator=torch.Generator().manual_seed(args.seed + 2))
            scale_factor = float(1.0 / z_sample.flatten().std())
            print(f"latent scale factor 1/std = {scale_factor:.5f} over {args.bank} patches")
        else:
            x_test, y_test = sample_patches(photo_list, photo_meta, args.eval_samples, heldout_gen(), region="heldout")

    # ---- model, optimiser, state
    torch.manual_seed(args.seed)
    if is_unet:
        if photos:
            config = copy.deepcopy(PHOTO_CONFIG)
            config["first_stage"] = dict(kind="kl", **ae_config)
            config["scale_factor"] = scale_factor
            model = DiffusionModel(config)
            model.first_stage_model.load_state_dict(autoencoder.decoder_state_dict())
            model.first_stage_model.requires_grad_(False)  # the first stage is trained apart, by --net autoencoder
        else:
            model = DiffusionModel(DIGITS_CONFIG)
        ema = copy.deepcopy(model).requires_grad_(False)
        sqrt_ac = model.alphas_cumprod.sqrt()
        sqrt_1m_ac = (1 - model.alphas_cumprod).sqrt()
    elif is_ae:
        model = AutoencoderKL(**AUTOENCODER_CONFIG)
    else:
        model = CLASSIFIERS[args.data][0]()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=1e-4 if args.net == "classifier" else 0.0)
    if is_ae:  # warm-up, then a cosine decay to a tenth: the reconstruction keeps improving to the end
        schedule = lambda s: min(1.0, (s + 1) / 200) * (0.55 + 0.45 * math.cos(math.pi * min(s, steps) / steps))
    else:
        schedule = lambda s: min(1.0, (s + 1) / 200)  # short warm-up
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(args.seed)  # all batch and noise randomness comes from here
    step = 0
    # every setting that shapes the run: a resumed run must have been started with the same ones
    fingerprint = dict(net=args.net, steps=steps, batch_size=batch_size, lr=lr, ema_decay=args.ema_decay,
                       class_dropout=args.class_dropout, holdout=args.holdout, seed=args.seed, data=args.data)
    if photos:
        fingerprint.update(kl_weight=args.kl_weight, bank=args.bank,
                           autoencoder=str(args.autoencoder.resolve()) if is_unet else None)
    if args.resume:
        # states written before --data existed are digits runs (their batch size was recorded as None = 128)
        state = load_resume_state(parser, state_path, fingerprint, missing=dict(data="digits"))
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
        """Random translation by up to one pixel (digit classifier augmentation; zero padding = background)."""
        dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
        return torch.roll(F.pad(x, (1, 1, 1, 1), value=-1.0), (dy, dx), dims=(2, 3))[:, :, 1:-1, 1:-1]

    def batch_of_latents(g):
        """photos unet: a batch of latents drawn from the bank's posteriors, scaled, and their classes."""
        idx = torch.randint(len(bank_mean), (batch_size,), generator=g)
        z = bank_mean[idx] + bank_std[idx] * torch.randn(bank_mean[idx].shape, generator=g)
        return z * scale_factor, y_all[idx]

    # ---- train
    model.train()
    t0 = time.time()
    bar = tqdm(initial=step, total=steps, desc=f"train {args.data} {args.net}")
    while step < steps:
        if is_unet:
            if photos:
                x, y = batch_of_latents(gen)
            else:
                idx = torch.randint(len(x_all), (batch_size,), generator=gen)
                x, y = x_all[idx], y_all[idx]
            t = torch.randint(0, len(sqrt_ac), (len(x),), generator=gen)
            noise = torch.randn(x.shape, generator=gen)
            drop = torch.rand(len(y), generator=gen) < args.class_dropout
            y = torch.where(drop, model.cond_stage_model.null_class, y)
            x_t = sqrt_ac[t].view(-1, 1, 1, 1) * x + sqrt_1m_ac[t].view(-1, 1, 1, 1) * noise
            loss = F.mse_loss(model.unet(x_t, t, model.cond_stage_model(y)), noise)
        elif is_ae:
            x, _ = sample_patches(photo_list, photo_meta, batch_size, gen)
            mean, std = model.encode(x)
            recon = model.decode(mean + std * torch.randn(mean.shape, generator=gen))
            # LDM's AutoencoderKL loss without its perceptual and adversarial terms: the L1 summed per
            # image, plus the KL to N(0, I) summed per image, both averaged over the batch
            kl = 0.5 * (mean.pow(2) + std.pow(2) - 1 - 2 * std.log()).flatten(1).sum(1)
            loss = ((recon - x).abs().flatten(1).sum(1) + args.kl_weight * kl).mean()
        elif photos:
            x, y = sample_patches(photo_list, photo_meta, batch_size, gen)
            loss = F.cross_entropy(model(x), y)
        else:
            idx = torch.randint(len(x_all), (batch_size,), generator=gen)
            x, y = x_all[idx], y_all[idx]
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
        if classifier_path.is_file():
            clf = load_classifier(classifier_path)
            ddim = DDIM(model.alphas_cumprod, steps=20)
            correct = 0
            for start in tqdm(range(0, args.eval_samples, 250), desc="classify samples"):
                ids = range(start, min(start + 250, args.eval_samples))
                y = torch.tensor([i % model.num_classes for i in ids])
                gens = sample_generators(args.seed + 1, ids)
                ctx, uctx = model.context(y)
                x = ddim_sample(model.unet, ddim, randn_per_sample(gens, model.latent_shape), ctx, uctx, args.guidance, gens)
                with torch.no_grad():
                    correct += (clf(model.decode(x)).argmax(1) == y).sum().item()
            extra["sample_class_accuracy"] = dict(accuracy=correct / args.eval_samples, samples=args.eval_samples,
                                                  guidance=args.guidance, ddim_steps=20)
            print(f"classifier accuracy on {args.eval_samples} class-conditioned samples "
                  f"(guidance {args.guidance}, DDIM 20): {correct / args.eval_samples:.3f}")
        if photos:
            extra["autoencoder"] = str(args.autoencoder)
        ckpt = fp_checkpoint(model, train_args=plain_args(args), train_steps=steps, train_seconds=train_time, **extra)
    elif is_ae:
        model.eval()
        with torch.no_grad():  # decoded from the posterior mean, as sampling decodes a latent
            recon = torch.cat([model.decode(model.encode(x_test[i:i + 250])[0]) for i in range(0, len(x_test), 250)])
            value = float(psnr(to_uint8(recon).numpy(), to_uint8(x_test).numpy()).mean())
        print(f"reconstruction PSNR on {len(x_test)} held-out patches: {value:.2f} dB")
        ckpt = autoencoder_checkpoint(model, AUTOENCODER_CONFIG, heldout_psnr=value, heldout_patches=len(x_test),
                                      train_args=plain_args(args), train_seconds=train_time)
    else:
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"held-out accuracy on {len(x_test)} real {'patches' if photos else 'digits'}: {acc:.3f}")
        ckpt = classifier_checkpoint(model, args.data, heldout_accuracy=acc, train_args=plain_args(args),
                                     train_seconds=train_time)
    save_atomic(ckpt, out_path)
    print(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB) after {train_time / 60:.1f} min of training")


if __name__ == "__main__":
    main()
