"""What a quantized model stores, in bits per weight: one count for every method and every model.

Each Conv1d/Conv2d/Linear layer of the module, wrapped in a QuantLayer or not, is counted as a packed
checkpoint stores it (models/pack.py):
  - mode 'quant' and 'w8a8': every output channel's weights at that channel's bit-width (OMQ's n-1, n,
    n+1), and beside them the channel's bit-width (8 bits), its weight scale and zero-point, each sampling
    step's activation scale and zero-point, the smoothing vector where the layer is smoothed (one value per
    input channel), all in float16, and a float low-rank branch's U and V in float16;
  - mode 'fp', and every layer not wrapped: 32 bits per weight.
bits per weight = those bits / the number of Conv/Linear weights. Biases, norms and embeddings are stored
alike by every method and are counted in neither. A model on the meta device (no values yet) is counted
with each layer's target bit-width and without smoothing.
"""
import torch.nn as nn

from .quant import QuantLayer

BITS_COUNT = 2    # reports name the count they used: 1 was the low-bit layers' code bits only (and the branch)
FP_BITS = 32      # a full-precision weight
PARAM_BITS = 16   # a quantizer parameter or branch value (float16, QuantLayer.round_params)
WIDTH_BITS = 8    # a channel's bit-width (int8)


def layer_bits(m):
    """{'weights': count, 'codes': bits of the weights, 'quantizer': bits of the quantizer's parameters,
    'branch': bits of a low-rank branch} of one Conv/Linear layer or QuantLayer."""
    layer = m.layer if isinstance(m, QuantLayer) else m
    out, fan_in = layer.weight.shape[0], layer.weight[0].numel()
    if not isinstance(m, QuantLayer) or m.mode == "fp":
        return dict(weights=out * fan_in, codes=FP_BITS * out * fan_in, quantizer=0, branch=0)
    per_channel = m.wbits * out if m.bits.is_meta else int(m.bits.long().sum())
    smoothed = not m.smooth.is_meta and bool((m.smooth != 1).any())
    quantizer = (WIDTH_BITS + 2 * PARAM_BITS) * out + 2 * PARAM_BITS * m.a_scale.numel()
    quantizer += PARAM_BITS * layer.weight.shape[1] if smoothed else 0
    branch = PARAM_BITS * (m.lowrank_U.numel() + m.lowrank_V.numel()) if m.lowrank_U is not None else 0
    return dict(weights=out * fan_in, codes=per_channel * fan_in, quantizer=quantizer, branch=branch)


def stored_bits(module):
    """The bits of every Conv/Linear layer of the module, by part, with the total and bits_per_weight."""
    total = dict(weights=0, codes=0, quantizer=0, branch=0)
    wrapped = {id(q.layer) for q in module.modules() if isinstance(q, QuantLayer)}
    for m in module.modules():
        if isinstance(m, QuantLayer) or (isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and id(m) not in wrapped):
            for k, v in layer_bits(m).items():
                total[k] += v
    total["bits"] = total["codes"] + total["quantizer"] + total["branch"]
    total["bits_per_weight"] = total["bits"] / max(total["weights"], 1)
    return total


def bits_per_weight(module):
    return stored_bits(module)["bits_per_weight"]
