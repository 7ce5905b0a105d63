"""Integer execution of a quantized model: every quantized conv/linear on the CPU's int8 kernels.

A QuantLayer computes y = layer(Q_a(x / s), W_q) in float, with W_q = (q - z) * w_scale per output
channel (codes q in 0 .. 2^b - 1, b <= 8 whatever OMQ gave the channel; z real) and
Q_a(v) = (u - z_a) * a_scale (codes u in 0 .. 2^abits - 1, z_a an integer, one pair per DDIM step).
Both are integers times per-channel / per-tensor scales, so the layer is one uint8 x int8 GEMM:

  - weights: w8 = q - c with c = round(z) moved into [qmax - 127, 128], so w8 fits int8 for any
    b <= 8; then W_q = w_scale * w8 - w_scale * f with f = z - c (the real part of the zero-point);
  - the f term adds -w_scale[o] * f[o] * S(x) to output o, where S(x) is the sum of the layer's
    dequantized input over o's receptive field (the same for every output channel). The kernel
    computes S itself: the packed weight gets one more output channel of ones (scale 1, then zero
    channels up to a multiple of 16), and y = out[:o] + out[o] * (-w_scale * f) in place afterwards;
  - activations: the same arithmetic as QuantLayer.quant_input, to uint8 codes, passed with the
    step's (a_scale, z_a) at call time, so one prepacked weight serves every sampling step.

The kernels are PyTorch's oneDNN ops that Inductor's x86 quantization lowers to
(torch.ops.onednn.qconv_prepack / qconv2d_pointwise, qlinear_prepack / qlinear_pointwise); the
weights are held only in their prepacked int8 form (no float copy). Outputs equal the fake-quant
layer's to float rounding (tests/test_int8.py). Layers whose codes do not fit (more than 8 bits, or
products that can saturate the kernels' int16 pair sums: the W8A8 layers) stay as they are, in
float, and are counted; attention matmuls, norms and activations stay in float. A layer's float
low-rank branch (quantize.py --lowrank) runs in float beside its int8 GEMM, on the same input.
Convolutions run in channels-last layout (the kernels' own), so the whole UNet does.
"""
import torch
import torch.nn as nn

from models.core.quant import QuantLayer, branch_forward, code_max, quant_int, quant_layers, scratch_like


def int8_unavailable(device):
    """Why the int8 kernels cannot run here (None when they can): they are CPU (oneDNN) kernels."""
    if torch.device(device).type != "cpu":
        return f"the int8 kernels are the CPU's (oneDNN); there are none for --device {device} in this code"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qconv2d_pointwise"):
        return "this PyTorch build has no oneDNN int8 kernels (torch.ops.onednn.qconv2d_pointwise)"
    try:  # a tiny layer through both kernels: some CPUs / builds lack them at run time
        w = torch.ones(2, 2, dtype=torch.int8)
        torch.ops.onednn.qlinear_pointwise(torch.ones(1, 2, dtype=torch.uint8), 1.0, 0, torch.ops.onednn.qlinear_prepack(w, None),
                                           torch.ones(2), torch.zeros(2, dtype=torch.int32), None, 1.0, 0, torch.float32,
                                           "none", [], "")
        w = w[:, :, None, None]
        pk = torch.ops.onednn.qconv_prepack(w, torch.ones(2), 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
        torch.ops.onednn.qconv2d_pointwise(torch.ones(1, 2, 1, 1, dtype=torch.uint8), 1.0, 0, pk, torch.ones(2),
                                           torch.zeros(2, dtype=torch.int32), None, [1, 1], [0, 0], [1, 1], 1, 1.0, 0,
                                           torch.float32, "none", [], "")
    except Exception as e:  # noqa: BLE001 (whatever the build raises: the kernels cannot run)
        return f"the oneDNN int8 kernels failed on this machine ({str(e).splitlines()[0]})"
    return None


class CodesDoNotFit(ValueError):
    """A layer whose codes the int8 kernels cannot multiply exactly: it stays in float."""


_CODES = {}


def uint8_scratch(x):
    """A reused uint8 tensor like x (see models.core.quant.scratch_like: one sampling loop per process)."""
    key = (tuple(x.shape), x.stride())
    if key not in _CODES:
        _CODES[key] = torch.empty_like(x, dtype=torch.uint8)
    return _CODES[key]


# adding 1.5 * 2^23 to a float32 in [0, 255] rounds it to an integer exactly as round() does (half to
# even) and leaves that integer in the low bits, so a view as int32 narrowed to uint8 is the code:
# one pass less than round() and float -> uint8 (which is slow here: an int32 step is 2x faster)
ROUNDING_OFFSET = 12582912.0


class Int8Layer(nn.Module):
    """One quantized Conv1d/Conv2d/Linear on the int8 kernels, made from a QuantLayer with its
    fake-quantized weight computed (q.w_q). Holds the prepacked int8 weight, the per-channel scales
    and zero-point correction, the bias, the smoothing scale and each step's activation parameters."""

    has_steps = True  # models.core.quant.set_step tells it the sampling step

    def __init__(self, q: QuantLayer):
        super().__init__()
        w_q, layer = q.w_q.detach(), q.layer
        out_ch = w_q.shape[0]
        view = lambda v: v.reshape([-1] + [1] * (w_q.dim() - 1))
        scale = q.w_scale.detach().abs().clamp(min=1e-8)
        zero, qmax = q.w_zero.detach(), code_max(q.bits)
        if int(q.bits.max()) > 8 or q.abits > 8:
            raise CodesDoNotFit("more than 8 bits")
        codes = quant_int(w_q, view(scale), view(zero), view(qmax))
        if not torch.equal((codes - view(zero)) * view(scale), w_q):  # the codes must give back the exact weight
            raise CodesDoNotFit("the layer's weight is not its codes' dequantization")
        c = torch.minimum(torch.maximum(torch.round(zero), qmax - 127), torch.full_like(qmax, 128))
        w8 = (codes - view(c)).to(torch.int8)
        # x86 CPUs without VNNI multiply uint8 x int8 pairs into int16 sums that saturate: a layer
        # whose |u1 w1 + u2 w2| can pass 32767 (8-bit activations with 8-bit weights: the W8A8
        # layers) would be wrong there, so it stays in float (the rest have 4-bit activations)
        if 2 * (2 ** q.abits - 1) * int(w8.abs().max()) > 32767:
            raise CodesDoNotFit(f"{2 ** q.abits - 1} x {int(w8.abs().max())} pair sums overflow int16")
        # the extra output channel: S(x), the input summed over the receptive field; then zero
        # channels up to a multiple of 16 (an odd channel count slowed some GEMMs by a third)
        extra = torch.zeros_like(w8[:16 - out_ch % 16])
        extra[0] = 1
        w8 = torch.cat([w8, extra])
        padded = w8.shape[0]
        self.kind = "linear" if isinstance(layer, nn.Linear) else "conv"
        self.out_ch = out_ch
        self.w_scale = torch.cat([scale, scale.new_ones(padded - out_ch)])
        self.register_buffer("correction", -(scale * (zero - c)))  # times S(x), per output channel
        bias = layer.bias.detach() if layer.bias is not None else scale.new_zeros(out_ch)
        self.bias = torch.cat([bias, bias.new_zeros(padded - out_ch)])
        self.w_zp = torch.zeros(padded, dtype=torch.int32)
        self.smooth = q.smooth.detach().clone() if q.smoothed else None
        self.qmax = code_max(q.abits)
        self.a_scale = q.a_scale.detach().abs().clamp(min=1e-8)  # 0-dim per step, as QuantLayer divides by them
        self.a_zero = q.a_zero.detach().round()
        self.step = 0
        self.conv1d = False
        if self.kind == "linear":
            self.weight = torch.ops.onednn.qlinear_prepack(w8, None)
        else:
            conv1d = isinstance(layer, nn.Conv1d)  # run as a 2-D convolution over a height of 1
            pair = lambda v, height: [height, v[0]] if conv1d else list(v)
            if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
                raise ValueError("only explicit zero padding")
            self.conv1d = conv1d
            self.conv_args = (pair(layer.stride, 1), pair(layer.padding, 0), pair(layer.dilation, 1), layer.groups)
            # prepacked at the first call, when the input's shape is known: oneDNN then picks
            # its layout for it (a few % faster on the largest convolutions here)
            self.w8, self.weight = (w8[:, :, None] if conv1d else w8), None
        self.weight_bytes = w8.numel() + 4 * (self.w_scale.numel() + self.bias.numel() + self.correction.numel())
        self.branch = None  # (U, V, conv args): the float branch, as QuantLayer computes it
        if q.lowrank_U is not None:
            self.branch = (q.lowrank_U.detach(), q.lowrank_V.detach(), q.branch_conv)
            self.weight_bytes += 4 * (q.lowrank_U.numel() + q.lowrank_V.numel())

    def quantize_input(self, x):
        """uint8 codes of Q_a(x / s) and the step's (scale, zero-point): QuantLayer.quant_input's
        arithmetic up to the rounding, which clamps first (clamp(round(v), 0, qmax) equals
        round(clamp(v, 0, qmax)) for integer bounds) and rounds with ROUNDING_OFFSET."""
        scale, zero = self.a_scale[self.step], self.a_zero[self.step]
        t = scratch_like(x)
        if self.smooth is not None:
            shape = [1] * x.dim()
            shape[1 if self.kind == "conv" else -1] = -1
            torch.div(x, self.smooth.reshape(shape), out=t).div_(scale)
        else:
            torch.div(x, scale, out=t)
        t.add_(zero).clamp_(0, self.qmax).add_(ROUNDING_OFFSET)
        return uint8_scratch(t).copy_(t.view(torch.int32)), float(scale), int(zero)

    def forward(self, x):
        y = self._int8_forward(x)
        return y if self.branch is None else y.add_(branch_forward(x, *self.branch))

    def _int8_forward(self, x):
        if self.kind == "linear":
            u, scale, zero = self.quantize_input(x)
            out = torch.ops.onednn.qlinear_pointwise(u, scale, zero, self.weight, self.w_scale, self.w_zp, self.bias,
                                                     1.0, 0, torch.float32, "none", [], "")
            # the zero-point correction in place: y is a view of the first out_ch channels
            return out[..., :self.out_ch].addcmul_(out[..., self.out_ch:self.out_ch + 1], self.correction)
        x = x.unsqueeze(2) if self.conv1d else x
        u, scale, zero = self.quantize_input(x.contiguous(memory_format=torch.channels_last))
        if self.weight is None:  # prepacked for the first input's shape (other shapes still work)
            self.weight = torch.ops.onednn.qconv_prepack(self.w8, self.w_scale, scale, zero, *self.conv_args, list(u.shape))
            self.w8 = None
        out = torch.ops.onednn.qconv2d_pointwise(u, scale, zero, self.weight, self.w_scale, self.w_zp, self.bias,
                                                 *self.conv_args, 1.0, 0, torch.float32, "none", [], "")
        y = out[:, :self.out_ch].addcmul_(out[:, self.out_ch:self.out_ch + 1], self.correction[:, None, None])
        return y.squeeze(2) if self.conv1d else y


def _channels_last_input(unet, args):
    x, *rest = args
    return (x.contiguous(memory_format=torch.channels_last), *rest)


def convert_to_int8(model):
    """Replaces, in place, every quantized layer of model.unet (a sampling model: fake-quantized
    weights computed) by an Int8Layer, and puts the UNet in channels-last layout (its input too);
    returns counts: int8 layers, layers left in float because their codes do not fit the kernels,
    and full-precision layers (mode 'fp', float by design). Raises RuntimeError where the kernels
    cannot run (int8_unavailable)."""
    reason = int8_unavailable(next(model.unet.parameters()).device)
    if reason:
        raise RuntimeError(reason)
    counts = dict(int8=0, float_not_fitting=0, full_precision=0)
    with torch.no_grad():
        for name, q in quant_layers(model.unet).items():
            if q.mode == "fp":
                counts["full_precision"] += 1
                continue
            if q.w_q is None:
                q.refresh()
            try:
                int8_layer = Int8Layer(q)
            except CodesDoNotFit:
                counts["float_not_fitting"] += 1
                continue
            parent, _, child = name.rpartition(".")
            setattr(model.unet.get_submodule(parent) if parent else model.unet, child, int8_layer)
            counts["int8"] += 1
    model.unet.to(memory_format=torch.channels_last)
    model.unet.register_forward_pre_hook(_channels_last_input)
    return counts


def weight_bytes(module):
    """Bytes of weights a module holds: its float tensors (parameters and buffers, with each
    QuantLayer's cached fake-quantized weight) and the int8 layers' packed weights and scales."""
    seen, total = set(), 0
    for m in module.modules():
        if isinstance(m, Int8Layer):
            total += m.weight_bytes
            continue
        tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        if isinstance(m, QuantLayer) and m.w_q is not None and m.w_q is not m.layer.weight:
            tensors.append(m.w_q)
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
