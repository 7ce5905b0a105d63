"""Diffusion models and autoencoders from their files, and their files from the models: full precision
(this project's or an official LDM checkpoint), quantized, packed. The formats, their versions and the
atomic writes are models/files.py's; the classifiers' files are models/classifier.py's."""
import hashlib
from pathlib import Path

import torch

from models.autoencoder import AutoencoderKL
from models.ldm import LDM_CONFIGS, UNET_PREFIX, DiffusionModel, guess_ldm_config, load_ldm
from models.pack import fp32_bytes, pack_model, unpack_model
from models.qmodel import build_quant_model
from models.core.quant import quant_layers, refresh_weights
from models.files import (AUTOENCODER_FORMAT, FP_FORMAT, PACKED_FORMAT, QUANT_FORMAT, VERSIONS, check_format,
                          load_file, save_atomic, sha256_file)

EMBED_FP_MAX_BYTES = 64 << 20  # larger FP models are referenced by path + sha256 instead of copied


# ---- full-precision models
def fp_checkpoint(model, **extra):
    return dict(format=FP_FORMAT, version=VERSIONS[FP_FORMAT], config=model.config, state_dict=model.state_dict(),
                **extra)


def load_fp_model(path, config=None, ckpt=None):
    """A full-precision DiffusionModel from this project's checkpoint, or from an official
    latent-diffusion checkpoint (`config`: a released model's name or YAML path; guessed from the
    weights' shapes when not given)."""
    ckpt = load_file(path) if ckpt is None else ckpt
    if isinstance(ckpt, dict) and ckpt.get("format") == FP_FORMAT:
        if config is not None:
            raise ValueError(f"--config {config} is for official LDM checkpoints; {path} is this project's own "
                             f"checkpoint and carries its config: drop --config")
        check_format(ckpt, path, FP_FORMAT, "rerun train.py")
        model = DiffusionModel(ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
        return model.eval()
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    if not any(isinstance(k, str) and k.startswith(UNET_PREFIX) for k in sd):
        fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
        raise ValueError(f"{path} is not a diffusion model checkpoint"
                         + (f" (it is a {fmt} checkpoint)" if fmt else "")
                         + ": expected this project's full-precision checkpoint or an official LDM model.ckpt")
    if config is None:
        config = guess_ldm_config(sd)
        if config is None:
            raise ValueError(f"{path}: its UNet matches none of {sorted(LDM_CONFIGS)}; pass its YAML config")
    return load_ldm(path, config, ckpt)


def fp_reference(model, path, config_arg=None):
    """How a quantized checkpoint finds its full-precision model: a copy of the weights when small,
    otherwise the path, the config argument and a content hash (checked on load)."""
    path = Path(path)
    if path.stat().st_size <= EMBED_FP_MAX_BYTES:
        return dict(config=model.config, state_dict=model.state_dict())
    return dict(config=model.config, path=str(path.resolve()), config_arg=config_arg, sha256=sha256_file(path))


def fp_fingerprint(ref):
    """A content hash of the full-precision model behind an fp_reference(): what keys the files that
    depend on that model alone (distill.py's teacher cache)."""
    if "sha256" in ref:
        return ref["sha256"]
    h = hashlib.sha256(repr(ref["config"]).encode())
    for name, t in ref["state_dict"].items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_fp_reference(ref):
    if "state_dict" in ref:
        model = DiffusionModel(ref["config"])
        model.load_state_dict(ref["state_dict"])
        return model.eval()
    path = Path(ref["path"])
    if not path.is_file():
        raise FileNotFoundError(f"the full-precision model of this checkpoint is not at {path}")
    if sha256_file(path) != ref["sha256"]:
        raise ValueError(f"{path} changed since quantization (sha256 differs)")
    return load_fp_model(path, ref.get("config_arg"))


# ---- quantized models
def quant_checkpoint(qmodel, fp_ref, **extra):
    """A quantize.py/distill.py checkpoint of qmodel (built by models.qmodel.build_quant_model; its
    settings are saved whole). fp_ref: fp_reference() of its full-precision model."""
    return dict(format=QUANT_FORMAT, version=VERSIONS[QUANT_FORMAT], fp=fp_ref, settings=qmodel.quant_settings,
                unet_state_dict=qmodel.unet.state_dict(), **extra)


def load_quant_model(path, ckpt=None):
    """(fp_model, quantized model, checkpoint dict) from a quantize.py or distill.py checkpoint. The
    fake-quantized weights are computed here, once."""
    ckpt = load_file(path) if ckpt is None else ckpt
    check_format(ckpt, path, QUANT_FORMAT, "rerun quantize.py (and distill.py)")
    fp_model = load_fp_reference(ckpt["fp"])
    qmodel = build_quant_model(fp_model, ckpt["settings"])
    # assign: the model takes the file's tensors rather than copies (the caller may keep `ckpt`; on
    # LDM-4 a copy is 1.7 GB)
    try:
        qmodel.unet.load_state_dict(ckpt["unet_state_dict"], assign=True)
    except RuntimeError as e:  # e.g. written for another step schedule by an older version
        raise ValueError(f"{path}: its quantized layers do not fit the model this code builds from its settings "
                         f"({str(e).splitlines()[-1].strip()}); rerun quantize.py to make it again") from None
    with torch.no_grad():
        refresh_weights(qmodel.unet)
    return fp_model, qmodel.eval(), ckpt


def packed_checkpoint(qmodel, distill=None):
    """qmodel with its weights bit-packed (models.pack), and its settings."""
    return dict(format=PACKED_FORMAT, version=VERSIONS[PACKED_FORMAT], config=qmodel.config,
                settings=qmodel.quant_settings, packed=pack_model(qmodel), distill=distill)


def load_packed_model(path, ckpt=None):
    """The quantized model of a packed checkpoint, its weights unpacked once (a packed layer keeps
    the dequantized weight as is: `frozen`)."""
    ckpt = load_file(path) if ckpt is None else ckpt
    check_format(ckpt, path, PACKED_FORMAT, "rerun quantize.py or distill.py with --pack")
    with torch.device("meta"):
        model = build_quant_model(DiffusionModel(ckpt["config"]), ckpt["settings"])
    layers = quant_layers(model)
    for name in ckpt["packed"]["layers"]:
        layers[name].frozen = True
    model.load_state_dict(unpack_model(ckpt["packed"]), assign=True)
    with torch.no_grad():
        refresh_weights(model.unet)
    return model.eval(), ckpt


def write_packed(qmodel, path, distill=None):
    """Writes the packed checkpoint and prints its size against the FP32 weights."""
    save_atomic(packed_checkpoint(qmodel, distill), path)
    size, ref = Path(path).stat().st_size, fp32_bytes(qmodel)
    print(f"wrote {path}: {size / 1e3:.1f} kB, {100 * size / ref:.1f}% of the {ref / 1e3:.1f} kB of FP32 weights")
    return size


# ---- whatever sample.py is given
def load_sampling_model(path, config=None):
    """Any checkpoint sample.py takes: full precision (this project's or an official LDM one),
    quantize.py / distill.py output, or packed. Returns (model, kind): kind is 'full precision',
    'quantized' or 'packed'; a quantized or packed model has its quant_settings."""
    ckpt = load_file(path)
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt in (QUANT_FORMAT, PACKED_FORMAT) and config is not None:
        raise ValueError(f"--config {config} is for official LDM checkpoints; {path} is a {fmt} checkpoint "
                         f"and carries its config: drop --config")
    if fmt == QUANT_FORMAT:
        return load_quant_model(path, ckpt)[1], "quantized"
    if fmt == PACKED_FORMAT:
        return load_packed_model(path, ckpt)[0], "packed"
    return load_fp_model(path, config, ckpt), "full precision"


# ---- the photograph model's autoencoder (train.py --net autoencoder)
def autoencoder_checkpoint(model, config, **extra):
    return dict(format=AUTOENCODER_FORMAT, version=VERSIONS[AUTOENCODER_FORMAT], config=config,
                state_dict=model.state_dict(), **extra)


def load_autoencoder(path):
    """(AutoencoderKL, its config) from a train.py --net autoencoder checkpoint."""
    ckpt = load_file(path)
    check_format(ckpt, path, AUTOENCODER_FORMAT, "rerun train.py --net autoencoder")
    model = AutoencoderKL(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt["config"]
