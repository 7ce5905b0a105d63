"""The low-rank full-precision branch: quantize only what a rank-R matrix leaves of the weight.

A quantized layer with a branch computes
    y = layer(Q_a(x / s), Q_w((W - L) * s)) + L x,      L = U V, U [out, R], V [R, fan_in]
so the weight is split into a float branch L, which runs on the unquantized input, and a residual
W - L, which is quantized as before (OMQ or uniform, its split search and calibration seeing the
residual). L is taken from the smoothed weight W * s (where the quantizer works; V is stored divided
by s, so the branch needs no smoothing of its own):
  - svd:   the best rank-R approximation of W * s (SVDQuant's branch): the dominant directions,
           which carry the weight's largest values, leave the residual with smaller outliers;
  - loftq: then rounds of L <- best rank-R approximation of W * s - Q(W * s - L) (LoftQ / LQER), so
           that Q(W * s - L) + L approaches W * s; a round is kept only where it lowers that error.
distill.py trains U and V as its LoRA (instead of a cold-start LoRA that starts at B = 0): the
branch starts from the quantization error rather than from nothing. The branch stays in float16
values (QuantLayer.round_params), which the packed file stores and models/core/bits.py counts. The
branch's arithmetic is the layer's: models.core.quant.branch_forward.
"""
import torch

from .quant import code_max, fake_quant, range_search

INITS = ("svd", "loftq")


def top_singular(w, rank):
    """(U, V) with U V the best rank-`rank` approximation of the 2-D w (Eckart-Young), the singular
    values split evenly between the two (sqrt on each side, so that both train at a similar scale).
    Computed in float64: at full rank U V gives back w to a few float32 roundings. A rank above
    min(w.shape) is padded with zero directions (the approximation is then w itself)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    u, v = u[:, :rank] * root, root[:, None] * vh[:rank]
    pad = rank - len(root)
    return torch.cat([u, u.new_zeros(u.shape[0], pad)], 1), torch.cat([v, v.new_zeros(pad, v.shape[1])])


def quantize_rows(w, bits):
    """w fake-quantized per row at `bits`, its range searched as calibration searches it."""
    w = w.float()
    scale, zero = range_search(w, code_max(bits), dim=0)
    return fake_quant(w, scale[:, None], zero[:, None], code_max(bits)).to(w.dtype)


def weight_error(w, low, bits):
    """||w - L - Q(w - L)||_F with L = low: how far the branch plus the quantized residual is from w."""
    return (w.double() - low - quantize_rows(w - low, bits).double()).norm().item()


def lowrank_split(w, rank, bits, init="svd", rounds=1):
    """The branch of a smoothed weight w [out, fan_in]: (U, V, errors), errors the weight error
    (weight_error at `bits` per row) of the SVD start and of each LoftQ round that was kept. A round
    is kept only if it lowers the error (the alternation is not guaranteed to: the quantizer's range
    is searched again for each residual), so the errors never increase."""
    if init not in INITS:
        raise ValueError(f"unknown low-rank init {init!r}: use one of {INITS}")
    w = w.double()
    u, v = top_singular(w, rank)
    errors = [weight_error(w, u @ v, bits)]
    for _ in range(rounds if init == "loftq" else 0):
        u2, v2 = top_singular(w - quantize_rows(w - u @ v, bits).double(), rank)
        e = weight_error(w, u2 @ v2, bits)
        if e >= errors[-1]:
            break
        u, v = u2, v2
        errors.append(e)
    return u.float(), v.float(), errors


def allocate_ranks(candidates, budget):
    """Per-layer branch ranks within a budget of bits. candidates: {layer: {rank: (error, bits)}}, each layer's
    calibration output error and the bits it stores beyond rank 0's at each rank it may take (rank 0: no
    branch, 0 bits).
    Greedy by marginal value: from every layer at rank 0, repeatedly take the upgrade (one layer to any higher
    rank) with the largest fall in error per added bit that still fits, until none fits or none lowers the
    error. Returns ({layer: rank}, bits spent)."""
    ranks = {layer: 0 for layer in candidates}
    spent = 0
    while True:
        best = None
        for layer, options in candidates.items():
            err0, bits0 = options[ranks[layer]]
            for r, (err, bits) in options.items():
                gain, cost = err0 - err, bits - bits0
                value = gain / cost if cost > 0 else float("inf")  # a rank that costs nothing more (or less)
                if r > ranks[layer] and gain > 0 and spent + cost <= budget and (best is None or value > best[0]):
                    best = (value, layer, r, cost)
        if best is None:
            return ranks, spent
        _, layer, r, cost = best
        ranks[layer], spent = r, spent + cost
