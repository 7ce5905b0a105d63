"""Made-up quantized layers of every kind the int8 kernels run (conv 3x3, strided, 1x1, Conv1d, Linear),
with mixed bit-widths, real zero-points and smoothing: the cases that tests/test_int8.py checks against
their fake-quant float layers and bench/int8_layer_error.py measures under other kernel sets."""
import torch
import torch.nn as nn

from models.core.quant import QuantLayer, range_search


def made_up_layer(layer, bits, abits=4, smooth=True, seed=0):
    """A QuantLayer around `layer` with per-channel bits drawn from `bits`, searched real zero-points,
    a smoothing scale and two steps' activation parameters."""
    g = torch.Generator().manual_seed(seed)
    q = QuantLayer(layer, "quant", 2, abits, n_steps=2)
    out_ch = layer.weight.shape[0]
    with torch.no_grad():
        q.bits.copy_(torch.tensor(bits)[torch.randint(len(bits), (out_ch,), generator=g)])
        if smooth:
            q.smooth.copy_(torch.rand(q.smooth.shape, generator=g) + 0.5)
        w = q.smoothed_weight()
        scale, zero = range_search(w, 2.0 ** q.bits.float() - 1, dim=0)
        q.w_scale.copy_(scale)
        q.w_zero.copy_(zero)
        assert (zero != zero.round()).any()  # real zero-points: the correction term is exercised
        q.a_scale.copy_(torch.tensor([0.3, 0.17]))
        q.a_zero.copy_(torch.tensor([6.0, 3.0]))
        q.refresh()
    return q.eval()


LAYERS = {
    "conv3x3": (lambda: nn.Conv2d(24, 40, 3, padding=1), (2, 24, 9, 9), (3, 24, 5, 7)),
    "conv3x3 stride 2, no bias": (lambda: nn.Conv2d(24, 17, 3, stride=2, padding=1, bias=False), (2, 24, 8, 8), (1, 24, 6, 6)),
    "conv1x1": (lambda: nn.Conv2d(32, 48, 1), (2, 32, 6, 6), (1, 32, 4, 4)),
    "conv1d": (lambda: nn.Conv1d(32, 96, 1), (2, 32, 36), (3, 32, 16)),
    "linear": (lambda: nn.Linear(40, 72), (2, 50, 40), (7, 40)),
}
