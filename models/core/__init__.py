"""The quantization core of MPQ-DM: torch only, and the unit to copy into another project.

Copy this folder (quant.py, allocate.py, lowrank.py, trd.py, bits.py and this file) under any name; it imports
nothing but torch and itself (tests/test_core.py copies it alone and quantizes a plain torch.nn model).

    quant.py     QuantLayer: a Conv1d/Conv2d/Linear with per-channel fake-quantized weights (each
                 channel its own bit-width), per-step quantized activations, smoothing, an optional
                 LoRA and an optional float low-rank branch; quant_layers, set_step, refresh_weights
    allocate.py  OMQ: kurtosis per output channel, the n+1 / n / n-1 split chosen by the layer's output
                 error, and calibrate_layer (smoothing, activation ranges, split, weight ranges)
    lowrank.py   the float low-rank branch's SVD / LoftQ split of a weight
    trd.py       TRD: the relation loss between two models' features (relation_kl) and the smoothing
                 of features over neighbouring sampling steps (WindowSmoother)
    bits.py      what a quantized model stores, in bits per weight, every overhead counted (stored_bits)

Use on any model:

    q = QuantLayer(linear, "quant", wbits=2, abits=4, n_steps=1)  # put q where linear was
    calibrate_layer(q, {0: recorded_inputs_of_linear})             # OMQ; method="uniform" for none
    refresh_weights(model)                                         # fake-quantize the weights once

Everything diffusion-specific (which UNet layers stay at 8 bits, the DDIM trajectory, distillation)
lives outside, in models/ and the scripts.
"""
from .allocate import calibrate_layer, kurtosis, split_bits
from .bits import bits_per_weight, stored_bits
from .lowrank import lowrank_split
from .quant import QuantLayer, WeightRefresher, quant_layers, refresh_weights, set_step
from .trd import WindowSmoother, relation_kl

__all__ = ["QuantLayer", "WeightRefresher", "bits_per_weight", "calibrate_layer", "kurtosis", "lowrank_split",
           "quant_layers", "refresh_weights", "relation_kl", "set_step", "split_bits", "stored_bits", "WindowSmoother"]
