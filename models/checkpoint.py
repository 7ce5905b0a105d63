"""Checkpoint files: plain torch.save dicts with a `format` tag, a format `version` and the config
needed to rebuild the model, written atomically (a killed run never leaves a half-written file)."""
import os
from pathlib import Path

import torch

VERSION = 1
FP_FORMAT = "mpq-dm/fp-model"


def save_atomic(obj, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_with_report(ckpt, path, report):
    """Writes a checkpoint and its JSON report (<path>.json) so that an interrupted run never leaves
    a new checkpoint beside an old report: the old report goes first, then each file is written
    atomically."""
    import json

    path = Path(path)
    json_path = path.with_suffix(".json")
    json_path.unlink(missing_ok=True)
    save_atomic(ckpt, path)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, json_path)


def load_file(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable torch checkpoint: {e}") from e


def check_format(ckpt, path, *formats):
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt not in formats:
        raise ValueError(f"{path} is a {fmt or 'foreign'} checkpoint; expected {' or '.join(formats)}")
    if ckpt.get("version", 0) > VERSION:
        raise ValueError(f"{path} has format version {ckpt['version']}; this code reads up to {VERSION}")


def fp_checkpoint(model, **extra):
    return dict(format=FP_FORMAT, version=VERSION, config=model.config, state_dict=model.state_dict(), **extra)


def load_fp_model(path, config=None, ckpt=None):
    """A full-precision DiffusionModel from this project's checkpoint, or from an official
    latent-diffusion checkpoint (`config`: a released model's name or YAML path; guessed from the
    weights' shapes when not given)."""
    from models.ldm import DiffusionModel, LDM_CONFIGS, UNET_PREFIX, load_ldm

    ckpt = load_file(path) if ckpt is None else ckpt
    if isinstance(ckpt, dict) and ckpt.get("format") == FP_FORMAT:
        if config is not None:
            raise ValueError(f"--config {config} is for official LDM checkpoints; {path} is this project's own "
                             f"checkpoint and carries its config: drop --config")
        check_format(ckpt, path, FP_FORMAT)
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


def guess_ldm_config(sd):
    """The released config whose UNet has exactly these names and shapes, or None."""
    from models.ldm import LDM_CONFIGS, UNET_PREFIX, DiffusionModel

    found = {k: tuple(v.shape) for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    for name, cfg in LDM_CONFIGS.items():
        with torch.device("meta"):
            unet = DiffusionModel(cfg).unet
        if found == {UNET_PREFIX + k: tuple(v.shape) for k, v in unet.state_dict().items()}:
            return name
    return None


QUANT_FORMAT = "mpq-dm/quantized"
EMBED_FP_MAX_BYTES = 64 << 20  # larger FP models are referenced by path + sha256 instead of copied


def sha256_file(path, chunk=1 << 22):
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fp_reference(model, path, config_arg=None):
    """How a quantized checkpoint finds its full-precision model: a copy of the weights when small,
    otherwise the path, the config argument and a content hash (checked on load)."""
    path = Path(path)
    if path.stat().st_size <= EMBED_FP_MAX_BYTES:
        return dict(config=model.config, state_dict=model.state_dict())
    return dict(config=model.config, path=str(path.resolve()), config_arg=config_arg, sha256=sha256_file(path))


def load_fp_reference(ref):
    from models.ldm import DiffusionModel

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


def quant_checkpoint(fp_ref, qmodel, settings, **extra):
    """qmodel: a DiffusionModel whose unet is a QuantUNet."""
    from models.quant import quant_layers

    return dict(format=QUANT_FORMAT, version=VERSION, fp=fp_ref, settings=settings,
                modes={n: m.mode for n, m in quant_layers(qmodel.unet.unet).items()},
                unet_state_dict=qmodel.unet.unet.state_dict(), **extra)


def build_quant_model(fp_model, settings):
    """A quantized copy of fp_model (sharing nothing with it) with the layers wrapped per settings."""
    import copy

    qmodel = copy.deepcopy(fp_model)
    wrap_quant_unet(qmodel, settings)
    return qmodel


def wrap_quant_unet(model, settings):
    """Wraps model.unet's layers per settings, in place (model.unet becomes a QuantUNet). One set of
    activation parameters per DDIM sampling step of the official schedule for settings['steps'].
    Checkpoints written before the Conv1d policy existed quantized Conv1d layers: a missing
    'quantize_conv1d' means True."""
    from models.allocate import wrap_unet
    from models.diffusion import ddim_timesteps
    from models.quant import QuantUNet

    n_steps = len(ddim_timesteps(settings["steps"], model.config["schedule"]["timesteps"]))
    wrap_unet(model.unet, settings["wbits"], settings["abits"], n_steps, settings["quantize_all"],
              settings.get("quantize_conv1d", True))
    model.unet = QuantUNet(model.unet, settings)


def load_quant_model(path, ckpt=None):
    """(fp_model, quantized model, checkpoint dict) from a quantize.py or distill.py checkpoint. The
    fake-quantized weights are computed here, once."""
    from models.quant import refresh_weights

    ckpt = load_file(path) if ckpt is None else ckpt
    check_format(ckpt, path, QUANT_FORMAT)
    fp_model = load_fp_reference(ckpt["fp"])
    qmodel = build_quant_model(fp_model, ckpt["settings"])
    # assign: the model takes the file's tensors rather than copies (the caller may keep `ckpt`; on
    # LDM-4 a copy is 1.7 GB)
    try:
        qmodel.unet.unet.load_state_dict(ckpt["unet_state_dict"], assign=True)
    except RuntimeError as e:  # e.g. written for another step schedule by an older version
        raise ValueError(f"{path}: its quantized layers do not fit the model this code builds from its settings "
                         f"({str(e).splitlines()[-1].strip()}); rerun quantize.py to make it again") from None
    with torch.no_grad():
        refresh_weights(qmodel.unet)
    return fp_model, qmodel.eval(), ckpt


def packed_checkpoint(qckpt, qmodel):
    """A quantize.py/distill.py checkpoint's model with its weights bit-packed (models.pack)."""
    from models.pack import PACKED_FORMAT, pack_model

    return dict(format=PACKED_FORMAT, version=VERSION, config=qmodel.config, settings=qckpt["settings"],
                modes=qckpt["modes"], packed=pack_model(qmodel), distill=qckpt.get("distill"))


def load_packed_model(path, ckpt=None):
    """The quantized model of a packed checkpoint, its weights unpacked once (a packed layer keeps
    the dequantized weight as is: `frozen`)."""
    from models.ldm import DiffusionModel
    from models.pack import PACKED_FORMAT, unpack_model
    from models.quant import quant_layers, refresh_weights

    ckpt = load_file(path) if ckpt is None else ckpt
    check_format(ckpt, path, PACKED_FORMAT)
    s = ckpt["settings"]
    with torch.device("meta"):
        model = DiffusionModel(ckpt["config"])
        wrap_quant_unet(model, s)
    layers = quant_layers(model.unet.unet)
    for name in ckpt["packed"]["layers"]:
        layers[name].frozen = True
    model.load_state_dict(unpack_model(ckpt["packed"]), assign=True)
    with torch.no_grad():
        refresh_weights(model.unet)
    return model.eval(), ckpt


def load_sampling_model(path, config=None):
    """Any checkpoint sample.py takes: full precision (this project's or an official LDM one),
    quantize.py / distill.py output, or packed. Returns (model, kind)."""
    from models.pack import PACKED_FORMAT

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


def write_packed(qckpt, qmodel, path):
    """Writes the packed checkpoint and prints its size against the FP32 weights."""
    from models.pack import fp32_bytes

    save_atomic(packed_checkpoint(qckpt, qmodel), path)
    size, ref = Path(path).stat().st_size, fp32_bytes(qmodel)
    print(f"wrote {path}: {size / 1e3:.1f} kB, {100 * size / ref:.1f}% of the {ref / 1e3:.1f} kB of FP32 weights")
    return size
