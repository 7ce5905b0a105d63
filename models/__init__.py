"""What the four scripts share. Nothing is imported here: a script imports the modules it needs.

The quantization core, torch only, the unit to copy into another project (its own docstring says how):
    core/          QuantLayer and its quantizers (quant.py), OMQ's kurtosis split and layer calibration
                   (allocate.py), the float low-rank branch (lowrank.py), TRD's relation loss (trd.py)

The networks and their diffusion:
    unet.py        the LDM UNet, with the official parameter names
    autoencoder.py the first-stage autoencoders (KL and VQ decoders, the KL encoder)
    classifier.py  the in-domain classifiers that evaluate.py scores with, and their files
    ldm.py         the official LDM configs, their loader and the config guess from a checkpoint
    diffusion.py   the noise schedule, DDIM and classifier-free guidance
    digits.py      the first embedded default: 8x8 digits, its checkpoints and data
    photos.py      the second: a latent diffusion model of photograph patches, its data and configs

Quantizing a diffusion model with the core:
    qmodel.py      which UNet layers are quantized and how; build_quant_model from an FP model
    calibration.py the FP trajectory's UNet inputs and each layer's inputs, within a memory budget
    trajectory.py  the FP DDIM trajectories that calibration, distillation and the eps-MSE check follow
    int8.py        quantized layers on the CPU's int8 kernels (sample.py --kernels int8)
    pack.py        weights bit-packed at their bit-widths (--pack)

Files:
    files.py       checkpoint formats, versions, atomic writes (the format layer)
    checkpoint.py  diffusion models and autoencoders from their files and back
    safe_load.py   reading a checkpoint without running code from it
    npz.py         image arrays written and read a piece at a time

Metrics and the scripts' shared rules:
    paired.py      per-image fidelity to the FP model (PSNR, feature distance) and bootstrap intervals
    cli.py         argument checks, output and interrupt rules
    seeds.py       how seeds are derived for each role
"""
