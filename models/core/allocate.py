"""OMQ: outlier-driven intra-layer mixed precision, and the calibration of one quantized layer.

For a layer at target n bits: rank the output channels of the smoothed weight W*s by kurtosis
(outlier-heavy channels score high), give the top k channels n+1 bits and the bottom k channels n-1
bits (so the layer's average stays exactly n), and choose k among multiples of a group size by the
squared error of the layer's output, with activations quantized, on the calibration inputs.

Method 'random' is the control for the kurtosis ranking: the same search (so the same smoothing
and the same numbers k of n+1 and n-1 channels as OMQ chooses), then those bits given to k and k
channels drawn at random instead of the highest- and lowest-kurtosis ones.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .lowrank import lowrank_split
from .quant import code_max, range_search

def kurtosis(w):
    """Per output channel: fourth central moment over the squared variance."""
    w = w.reshape(w.shape[0], -1).double()
    d = w - w.mean(1, keepdim=True)
    m2 = d.pow(2).mean(1)
    return (d.pow(4).mean(1) / m2.pow(2).clamp(min=1e-30)).float()


def split_bits(kurt, n, k):
    """n+1 bits for the k highest-kurtosis channels, n-1 for the k lowest, n for the rest."""
    bits = torch.full_like(kurt, n, dtype=torch.int8)
    if k > 0:
        order = torch.argsort(kurt, descending=True)
        bits[order[:k]] = n + 1
        bits[order[-k:]] = n - 1
    return bits


def split_candidates(out_channels, group_frac=0.1):
    """0, g, 2g, ... channels at each end up to half the channels, g = out_channels * group_frac."""
    g = int(out_channels * group_frac)
    if g < 1:
        return [0]
    return list(range(0, out_channels // 2 + 1, g))


def channel_absmax(layer, inputs):
    """max |x_j| per input channel over all calibration inputs of the layer (dict step -> tensor)."""
    conv = isinstance(layer, (nn.Conv1d, nn.Conv2d))
    m = None
    for x in inputs.values():
        a = x.abs().transpose(0, 1).reshape(x.shape[1], -1) if conv else x.abs().reshape(-1, x.shape[-1]).t()
        a = a.amax(1)
        m = a if m is None else torch.maximum(m, a)
    return m


@torch.no_grad()
def channel_errors(q, inputs, weights):
    """Squared output error of the quantized layer against full precision, per output channel and
    summed over the calibration inputs {step: tensor}, for each candidate fake-quantized weight in
    `weights`, with activations quantized by q's current smoothing and per-step ranges. Returns
    ([len(weights), out_channels] float64, number of output elements). An output channel's error
    depends only on that channel's weights, so a layer whose channels mix these weights scores the
    sum of its channels' entries: every OMQ split is scored from these numbers, and the layer is
    run once per step for all candidates (their weights stacked along the output channels), with
    one step's outputs in memory at a time."""
    layer, n = q.layer, len(weights)
    q.note_smoothing()
    w_all = torch.cat(weights)
    bias = None if layer.bias is None else layer.bias.repeat(n)
    err = torch.zeros(n, weights[0].shape[0], dtype=torch.float64, device=w_all.device)
    count = 0
    for step, x in inputs.items():
        q.step = step
        target = layer(x)
        xq = q.quant_input(x)
        if isinstance(layer, nn.Linear):
            d = F.linear(xq, w_all, bias).unflatten(-1, (n, -1)) - target.unsqueeze(-2)  # [..., n, out]
            err += d.pow_(2).reshape(-1, n, d.shape[-1]).sum(0, dtype=torch.float64)
        else:
            d = layer._conv_forward(xq, w_all, bias).unflatten(1, (n, -1)) - target.unsqueeze(1)  # [B, n, out, ...]
            err += d.pow_(2).sum([0, *range(3, d.dim())], dtype=torch.float64)
        count += target.numel()
    q.w_q = None
    return err, count


def smoothing_scale(layer, inputs, alpha):
    """s_j = (max|x_j| / max|W[:, j]|) ** alpha per input channel j (alpha 0.5 is the OMQ rule, the
    square root; 0 turns smoothing off): moves activation outliers into the weights."""
    w_max = layer.weight.abs().transpose(0, 1).reshape(layer.weight.shape[1], -1).amax(1)
    s = (channel_absmax(layer, inputs) / w_max.clamp(min=1e-8)) ** alpha
    return torch.where((s > 0) & torch.isfinite(s), s, torch.ones_like(s)).clamp(1e-4, 1e4)


def _calibrate_activations(q, inputs):
    """One activation range per sampling step, searched on that step's smoothed inputs."""
    qmax_a = code_max(q.abits)
    for step, x in inputs.items():
        dim = 1 if isinstance(q.layer, (nn.Conv1d, nn.Conv2d)) else x.dim() - 1
        view = [1] * x.dim()
        view[dim] = -1
        scale, zero = range_search(x / q.smooth.reshape(view), qmax_a, integer_zero=True)
        q.a_scale[step], q.a_zero[step] = scale[0], zero[0]


def _set_branch(q, w0, lowrank):
    """Splits the layer's full-precision weight w0 into q's float branch L (from the smoothed weight
    w0 * s, models/core/lowrank.py) and the residual w0 - L, which q.layer.weight then holds and the
    quantizer sees. lowrank: (rank, init, rounds). Returns the LoftQ weight errors."""
    rank, init, rounds = lowrank
    s = q._channel_view(q.smooth, w0.dim(), 1)
    u, v, errors = lowrank_split((w0 * s).reshape(w0.shape[0], -1), rank, q.wbits, init, rounds)
    v = (v.reshape(rank, *w0.shape[1:]) / s.squeeze(0)).reshape(rank, -1)  # L on the unsmoothed input
    # in float16 values, as the model keeps them (round_params), before the residual is taken from them:
    # the branch and the residual then add up to w0 to float32 rounding
    u, v = u.half().float(), v.half().float()
    q.lowrank_U.copy_(u)
    q.lowrank_V.copy_(v)
    q.layer.weight.copy_(w0 - (u @ v).reshape(w0.shape))
    return errors


@torch.no_grad()
def calibrate_layer(q, inputs, method="omq", smooth_alphas=(0.5,), group_frac=0.1, generator=None, lowrank=None):
    """Calibrates one QuantLayer on its full-precision inputs {step: tensor}: smoothing scale,
    per-step activation ranges, and (mode 'quant') the bit split and weight ranges. Every
    combination of smoothing strength (smooth_alphas) and split (OMQ: 0, g, 2g, ... channels at
    each end) is scored by the layer's output error with weights and activations quantized; the
    best is kept. Per-channel weight ranges do not depend on the other channels' bit-widths, so
    the layer's error is measured once per bit-width (n-1, n, n+1) and every split is scored from
    those per-channel errors (channel_errors). Method 'random' draws its channels from `generator`.
    lowrank (a layer of mode 'quant' with a branch, QuantLayer.add_lowrank): (rank, init, rounds);
    for each smoothing strength the branch is taken from the smoothed weight and everything above
    is done on the residual (the branch is exact, so the layer's output error is the residual's).
    Returns a report dict."""
    if q.mode == "fp":
        return dict(mode="fp")
    layer = q.layer
    wbits = q.wbits
    if q.mode != "quant":
        smooth_alphas = (0.0,)
    split = q.mode == "quant" and method in ("omq", "random") and wbits > 1
    options = [wbits - 1, wbits, wbits + 1] if split else [wbits]
    best, errors_uniform = None, {}
    lowrank = lowrank if q.mode == "quant" and q.lowrank_U is not None else None
    w0 = layer.weight.clone() if lowrank else None
    for alpha in smooth_alphas:
        if lowrank:
            layer.weight.copy_(w0)  # the smoothing scale is the full weight's
        q.smooth.copy_(smoothing_scale(layer, inputs, alpha) if alpha else torch.ones_like(q.smooth))
        _calibrate_activations(q, inputs)
        loftq_errors = _set_branch(q, w0, lowrank) if lowrank else None
        w = q.smoothed_weight()
        kurt = kurtosis(w)
        ranges, weights = [], []
        for b in options:  # each bit-width's per-channel ranges and fake-quantized weight
            q.bits.fill_(b)
            scale, zero = range_search(w, code_max(b), dim=0)
            q.w_scale.copy_(scale)
            q.w_zero.copy_(zero)
            ranges.append((scale, zero))
            weights.append(q.quant_weight())
        err, count = channel_errors(q, inputs, weights)
        scales, zeros = torch.stack([r[0] for r in ranges]), torch.stack([r[1] for r in ranges])
        for k in split_candidates(w.shape[0], group_frac) if split else [0]:
            bits = split_bits(kurt, wbits, k)
            pick = (bits.long() - options[0])[None].to(err.device)
            e = err.gather(0, pick).sum().item() / count
            if k == 0:
                errors_uniform[alpha] = e
            if best is None or e < best["err"]:
                best = dict(err=e, alpha=alpha, k=k, kurt=kurt, bits=bits, smooth=q.smooth.clone(), scales=scales,
                            zeros=zeros, errors=err, a_scale=q.a_scale.detach().clone(), a_zero=q.a_zero.detach().clone(),
                            branch=[t.clone() for t in (layer.weight, q.lowrank_U, q.lowrank_V)] if lowrank else None,
                            loftq_errors=loftq_errors)
    err_kurtosis = best["err"]
    if split and method == "random":  # OMQ's k and smoothing, channels drawn at random
        best["bits"] = split_bits(torch.rand(len(best["bits"]), generator=generator), wbits, best["k"])
        pick = (best["bits"].long() - options[0])[None].to(best["errors"].device)
        best["err"] = best["errors"].gather(0, pick).sum().item() / count
    pick = (best["bits"].long() - options[0])[None].to(best["scales"].device)
    best["w_scale"], best["w_zero"] = best["scales"].gather(0, pick)[0], best["zeros"].gather(0, pick)[0]
    for name in ("bits", "smooth", "w_scale", "w_zero", "a_scale", "a_zero"):
        getattr(q, name).copy_(best[name])
    if lowrank:  # the chosen smoothing's branch and residual
        for t, v in zip((layer.weight, q.lowrank_U, q.lowrank_V), best["branch"]):
            t.copy_(v)
    q.round_params()
    bits, kurt = q.bits, best["kurt"]
    return dict(mode=q.mode, wbits=wbits, abits=q.abits, out_channels=len(bits), split=best["k"],
                smooth_alpha=best["alpha"], high=int((bits == wbits + 1).sum()), low=int((bits == wbits - 1).sum()),
                mean_bits=bits.float().mean().item(), kurtosis_min=kurt.min().item(), kurtosis_max=kurt.max().item(),
                mse_uniform=errors_uniform[smooth_alphas[0]], mse_chosen=best["err"], mse_kurtosis_split=err_kurtosis,
                **(dict(lowrank=lowrank[0], loftq_weight_errors=best["loftq_errors"]) if lowrank else {}))
