"""A quantized diffusion model: which layers are quantized and how, the settings that say it, and the
one function that builds the model from a full-precision one and those settings (quantize.py, every
checkpoint load, the packed load and the benchmarks all call it).

Settings: one dict, made by quantize.py, stored whole in every quantized and packed checkpoint and
read back whole, on the model as `model.quant_settings`. Building needs wbits, abits, steps,
quantize_all and quantize_conv1d, and lowrank (the rank of the float branch of every low-bit layer,
models/core/lowrank.py, or {layer name: rank} for ranks chosen per layer by quantize.py --lowrank-budget;
0, missing or a layer not named: none); the rest (eta, guidance, method, calibration settings) say how the
model was made and how it is to be sampled.
"""
import copy

import torch.nn as nn

from models.diffusion import ddim_timesteps
from models.core.quant import QuantLayer

# layers that the official code keeps at W8A8 / in full precision (see layer_mode)
W8A8_LAYERS = ("time_embed.0", "time_embed.2", "input_blocks.0.0", "out.2")


def layer_mode(name, module, quantize_all=False, quantize_conv1d=False):
    """'w8a8' for the time-embedding MLP and the first and last convs, 'fp' for skip-connection and
    downsampling convs (unless quantize_all) and for the Conv1d qkv/proj_out of the LSUN models'
    attention blocks (unless quantize_conv1d: the official code wraps only Conv2d and Linear, which
    quantizes 265 / 73 / 109 layers of cin256-v2 / LSUN-Bedrooms / LSUN-Churches), 'quant' for every
    other Conv/Linear of the UNet. `name` is relative to the UNet."""
    if name in W8A8_LAYERS:
        return "w8a8"
    if not quantize_all and (name.endswith("skip_connection") or name.endswith(".op")):
        return "fp"
    if isinstance(module, nn.Conv1d) and not quantize_conv1d:
        return "fp"
    return "quant"


def wrap_unet(unet, wbits, abits, n_steps, quantize_all=False, quantize_conv1d=False):
    """Replaces every Conv1d/Conv2d/Linear of the UNet by a QuantLayer, in place; returns them by name."""
    layers = {}
    for name, module in list(unet.named_modules()):
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            mode = layer_mode(name, module, quantize_all, quantize_conv1d)
            q = QuantLayer(module, mode, 8 if mode == "w8a8" else wbits, 8 if mode == "w8a8" else abits, n_steps)
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name) if parent_name else unet, child, q)
            layers[name] = q
    return layers


def build_quant_model(fp_model, settings):
    """A quantized copy of fp_model (sharing no tensor with it; a model on the meta device gives one
    on the meta device, for loading into) with its UNet's layers wrapped as the settings say, and
    one set of activation parameters per DDIM step of the official schedule for settings['steps'].
    Checkpoints written before the Conv1d policy existed quantized Conv1d layers: a missing
    'quantize_conv1d' means True."""
    qmodel = copy.deepcopy(fp_model)
    n_steps = len(ddim_timesteps(settings["steps"], qmodel.config["schedule"]["timesteps"]))
    layers = wrap_unet(qmodel.unet, settings["wbits"], settings["abits"], n_steps, settings["quantize_all"],
                       settings.get("quantize_conv1d", True))
    lowrank = settings.get("lowrank") or 0
    for name, q in layers.items():
        rank = lowrank.get(name, 0) if isinstance(lowrank, dict) else lowrank  # a rank per layer, or one for all
        if q.mode == "quant" and rank:  # the branch sits beside the low-bit layers only
            q.add_lowrank(rank)
    qmodel.quant_settings = dict(settings)
    return qmodel
