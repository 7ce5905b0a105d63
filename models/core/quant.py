"""Fake quantization: uniform asymmetric quantizers and the quantized-layer wrapper.

A QuantLayer wraps one Conv1d/Conv2d/Linear of the UNet and computes
    y = layer(Q_a(x / s), Q_w((W + B A) * s))
with
  - s: a per-input-channel smoothing scale (1 when smoothing is off), so that without quantization
    the layer computes exactly what it did;
  - Q_w: per-output-channel asymmetric quantizer whose bit-width may differ per channel (OMQ);
  - Q_a: asymmetric per-tensor quantizer with one (scale, zero-point) per DDIM sampling step;
  - B A: an optional LoRA update (distill.py), merged into W before packing.
With a low-rank branch (quantize.py --lowrank R, models/core/lowrank.py) W holds the residual W - L and
the layer adds L x = U (V x) in float on the unquantized input.
The fake-quantized weight is computed by `refresh()` (once per training step, once at load) and
cached; forward never requantizes it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

MODES = ("quant", "w8a8", "fp")


def round_ste(x):
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


def code_max(bits):
    """The largest code of a b-bit quantizer, 2^b - 1, as a float: bits an int, or a tensor of
    per-channel bit-widths (a float tensor out)."""
    return 2.0 ** (bits.float() if torch.is_tensor(bits) else bits) - 1


def clamp_codes(r, qmax):
    """clamp(r, 0, qmax) as a new tensor; qmax a float or a tensor broadcasting to r's shape."""
    if isinstance(qmax, float):
        return r.clamp(0, qmax)
    q = r.clamp(min=0)
    return torch.minimum(q, qmax, out=q)


class FakeQuant(torch.autograd.Function):
    """(clamp(round(x / scale + zero), 0, qmax) - zero) * scale as one autograd node, with the
    gradient of that expression spelled out with round_ste (round's gradient taken as 1) and
    torch.clamp with tensor bounds: clamp passes the gradient where 0 < round(.) < qmax, half of it
    where round(.) sits on a bound (torch splits a tie between the input and the bound) and none
    outside. round_zero: the forward uses round(zero), the gradient passes to zero straight through
    (round_ste(zero), the activations' integer zero-point) without a node of its own.

    With u = x / scale, r = round(u + zero), q = clamp(r, 0, qmax) and p the gradient clamp passes
    (1, 1/2 or 0), out = (q - zero) * scale has
        d out / d x     = p
        d out / d scale = (q - zero) - p * u
        d out / d zero  = (p - 1) * scale
    Forward saves p (float16 holds 0, 1/2, 1 exactly) and, when the scale trains, the scale factor,
    so backward is three products, a difference and two sums. Recomputing the rounding and masks
    in backward instead took about twenty operations; on the embedded default's 8 x 8 maps each
    costs its dispatch more than its arithmetic (docs/profile.md). Values equal the spelled-out
    version's exactly, gradients to float rounding (tests/test_distill.py)."""

    @staticmethod
    def forward(ctx, x, scale, zero, qmax, round_zero=False):
        if round_zero:
            zero = zero.round()
        u = x / scale
        r = (u + zero).round_()
        out = clamp_codes(r, qmax).sub_(zero)  # q - zero
        ctx.shapes = scale.shape, zero.shape
        if any(ctx.needs_input_grad[:3]):  # p = clamp(min(r + 1/2, qmax + 1/2 - r), 0, 1): r is an integer
            r.add_(0.5)  # r is free now: p is made in its memory
            p = torch.minimum(r, torch.rsub(r, qmax + 1.0), out=r).clamp_(0, 1)
            factor = torch.addcmul(out, p, u, value=-1, out=u) if ctx.needs_input_grad[1] else None
            ctx.save_for_backward(p.half(), factor, scale)
        return out.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        p, factor, scale = ctx.saved_tensors
        scale_shape, zero_shape = ctx.shapes
        grad_x = grad * p
        grad_scale = grad_zero = None
        if scale.numel() == 1 and factor is not None:  # an activation's one scale: a dot product, no temporary
            grad_scale = torch.dot(grad.reshape(-1), factor.reshape(-1)).reshape(scale_shape)
        elif ctx.needs_input_grad[1]:
            grad_scale = (grad * factor).sum_to_size(scale_shape)
        if ctx.needs_input_grad[2] and scale.numel() == 1 and len(zero_shape) == 0:  # sums, no temporary
            grad_zero = (grad_x.sum() - grad.sum()) * scale.reshape(())
        elif ctx.needs_input_grad[2]:
            grad_zero = ((grad_x - grad) * scale).sum_to_size(zero_shape)
        return grad_x if ctx.needs_input_grad[0] else None, grad_scale, grad_zero, None, None


def fake_quant(x, scale, zero, qmax, round_zero=False):
    """Asymmetric uniform quantize-dequantize; scale, zero, qmax broadcast against x. The zero-point
    is used as given (round_zero: rounded, with a straight-through gradient): activations round
    theirs to an integer, weights keep a real one, which lets a 1-bit channel take the two levels
    {lo, hi} instead of {0, hi}."""
    if not isinstance(qmax, float):  # a float (one bit-width for all of x) stays a float: one tensor less per call
        qmax = torch.as_tensor(qmax, dtype=x.dtype, device=x.device)
    zero = torch.as_tensor(zero, dtype=x.dtype, device=x.device)
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or zero.requires_grad):
        return FakeQuant.apply(x, scale, zero, qmax, round_zero)
    zero = zero.round() if round_zero else zero  # no gradient wanted: FakeQuant's forward without what it saves
    return clamp_codes((x / scale + zero).round_(), qmax).sub_(zero).mul_(scale)


def quant_int(x, scale, zero, qmax):
    """The integer codes of fake_quant (no gradient): what a packed checkpoint stores."""
    return torch.clamp(torch.round(x / scale + zero), torch.zeros_like(qmax), qmax)


def _squared_error(flat, scale, zero, qmax):
    """Per row, sum of (fake_quant(flat) - flat)^2: fake_quant's arithmetic in the same order (so
    the same values), in place on one temporary. The weight range search runs this 20 times per
    bit-width on every weight of the model; fresh tensors per operation made it most of
    quantize.py's time on LDM-4."""
    t = flat / scale
    t.add_(zero).round_()
    torch.clamp(t, torch.zeros_like(qmax), qmax, out=t)
    return t.sub_(zero).mul_(scale).sub_(flat).pow_(2).sum(1)


def range_search(x, qmax, dim=None, grid=20, integer_zero=False):
    """Scale and zero-point minimising the squared quantization error, over clipping ratios
    alpha in (0, 1] of the [min, max] range (low bit-widths want tight clipping, plain min/max is
    far from optimal at 2 bits). dim: reduce over all dims but this one (per-channel), or None
    (per-tensor). qmax broadcasts against the per-channel statistics."""
    rnd = torch.round if integer_zero else (lambda v: v)
    flat = x.reshape(x.shape[0], -1) if dim == 0 else x.reshape(1, -1)
    lo0 = flat.min(1).values.clamp(max=0)
    hi0 = flat.max(1).values.clamp(min=0)
    qmax = torch.as_tensor(qmax, dtype=x.dtype, device=x.device).reshape(-1).expand_as(lo0)
    best_err = torch.full_like(lo0, float("inf"))
    best_scale, best_zero = torch.ones_like(lo0), torch.zeros_like(lo0)
    for alpha in torch.linspace(1.0, 1.0 / grid, grid).tolist():
        lo, hi = lo0 * alpha, hi0 * alpha
        scale = ((hi - lo) / qmax).clamp(min=1e-8)
        zero = rnd(-lo / scale)
        err = _squared_error(flat, scale[:, None], zero[:, None], qmax[:, None])
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def conv_args(layer):
    """What the branch needs of the layer it sits beside: None for a Linear, else the convolution's
    kernel size, stride, padding and dilation (the branch is that convolution at R output channels,
    then a 1x1 one back to the layer's)."""
    if isinstance(layer, nn.Linear):
        return None
    if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        raise ValueError("a low-rank branch needs an ungrouped convolution with explicit zero padding")
    return dict(kernel=tuple(layer.weight.shape[2:]), stride=layer.stride, padding=layer.padding,
                dilation=layer.dilation)


def branch_forward(x, u, v, conv):
    """L x for L = U V: two thin products (x through V, then U), never the [out, fan_in] matrix."""
    if conv is None:
        return F.linear(F.linear(x, v), u)
    conv_fn = F.conv1d if len(conv["kernel"]) == 1 else F.conv2d
    h = conv_fn(x, v.reshape(v.shape[0], -1, *conv["kernel"]), None, conv["stride"], conv["padding"], conv["dilation"])
    return conv_fn(h, u.reshape(*u.shape, *[1] * len(conv["kernel"])))


# weights from this size up recompute their fake-quantization in backward (see refresh): 98 % of
# LDM-4's weights, none of the embedded default's, where the bookkeeping cost more time than the
# memory was worth
RECOMPUTE_MIN_WEIGHTS = 1 << 18

_SCRATCH = {}


def scratch_like(x):
    """An uninitialised tensor like x (shape and strides), reused across calls on the CPU. A
    quantized layer's input is read only by its own conv/linear, right after quantization, so one
    tensor per shape can serve every layer (one sampling loop per process: it is not thread-safe).
    On the CPU, allocating (and first touching) a fresh activation-sized tensor per layer per step
    costs about as much as the quantization arithmetic itself; CUDA's caching allocator already
    reuses memory, so there a fresh tensor is returned."""
    if x.device.type != "cpu":
        return torch.empty_like(x)
    key = (tuple(x.shape), x.stride(), x.dtype)  # the same strides as x: the conv/linear below sums
    if key not in _SCRATCH:                      # in an order that depends on its input's layout
        _SCRATCH[key] = torch.empty_like(x)
    return _SCRATCH[key]


class QuantLayer(nn.Module):
    """mode 'quant': weights at `bits` per output channel, activations at abits (per step);
    'w8a8': 8-bit weights and activations (first/last conv, time embedding); 'fp': untouched."""

    has_steps = True  # set_step tells it the sampling step

    def __init__(self, layer, mode, wbits, abits, n_steps):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            raise TypeError(f"cannot quantize {type(layer).__name__}")
        self.layer = layer.requires_grad_(False)
        self.mode = mode
        self.wbits, self.abits = wbits, abits  # wbits: the layer's target (mean) bit-width
        self.step = 0
        self.w_q = None
        self.frozen = False  # a packed layer: layer.weight already holds the dequantized weight
        self.smoothed = True
        out_ch, in_ch = layer.weight.shape[:2]
        dev = layer.weight.device  # the wrapped layer's: quantize.py wraps a model already on the GPU
        self.register_buffer("smooth", torch.ones(in_ch, device=dev))
        self.register_buffer("bits", torch.full((out_ch,), wbits, dtype=torch.int8, device=dev))
        self.w_scale = nn.Parameter(torch.ones(out_ch, device=dev))
        self.register_buffer("w_zero", torch.zeros(out_ch, device=dev))
        self.a_scale = nn.Parameter(torch.ones(n_steps, device=dev))
        self.a_zero = nn.Parameter(torch.zeros(n_steps, device=dev))
        self.lora_A = self.lora_B = None
        self.lowrank_U = self.lowrank_V = None  # the float branch L = U V (add_lowrank)
        self.recompute = False  # training: recompute activations in backward (distill.py --recompute)

    # ---- weights
    def _channel_view(self, v, ndim, dim):
        shape = [1] * ndim
        shape[dim] = -1
        return v.reshape(shape)

    def smoothed_weight(self):
        """(W + BA) * s, s along the input-channel axis."""
        w = self.layer.weight
        if self.lora_A is not None:
            w = w + (self.lora_B @ self.lora_A).reshape(w.shape)
        return w * self._channel_view(self.smooth, w.dim(), 1)

    def quant_weight(self):
        w = self.smoothed_weight()
        view = lambda v: self._channel_view(v, w.dim(), 0)
        qmax = view(code_max(self.bits))
        return fake_quant(w, view(self.w_scale.abs().clamp(min=1e-8)), view(self.w_zero), qmax)

    def refresh(self):
        """Recompute the cached fake-quantized weight (with autograd if enabled). In training the
        fake-quantization's weight-sized intermediates (W + BA, its scaled, rounded and clamped
        copies) are not kept for backward but recomputed there, layer by layer: on LDM-4 they would
        be several times the model's size."""
        if self.mode == "fp":
            self.w_q = None
        elif self.frozen:
            self.w_q = self.layer.weight
        elif torch.is_grad_enabled() and self.layer.weight.numel() >= RECOMPUTE_MIN_WEIGHTS:
            self.w_q = checkpoint(self.quant_weight, use_reentrant=False)
        else:
            self.w_q = self.quant_weight()
        self.note_smoothing()

    def _apply(self, fn, recurse=True):
        """.to(device) and friends move the cached fake-quantized weight too (it is no parameter or
        buffer): a checkpoint is loaded on the CPU, its weights fake-quantized once, then moved."""
        super()._apply(fn, recurse)
        if self.w_q is not None:
            self.w_q = self.layer.weight if self.frozen else fn(self.w_q)
        return self

    def note_smoothing(self):
        """Whether inputs are divided by the smoothing scale: most layers skip the division."""
        self.smoothed = not bool((self.smooth == 1).all())

    @torch.no_grad()
    def round_params(self):
        """Rounds the quantizer parameters to float16-representable values, which is how a packed
        checkpoint stores them: the model then computes with exactly what the file holds."""
        for t in (self.w_scale, self.w_zero, self.a_scale, self.a_zero, self.smooth, self.lowrank_U, self.lowrank_V):
            if t is not None:  # the branch too: the packed file stores it in float16
                t.copy_(t.half().float())
        self.w_q = None

    def lora_step_size(self):
        """Mean quantization step of the weight the LoRA is added to (W, before smoothing): channel
        i's step on W * s is w_scale_i, so on W[i, j] it is w_scale_i / s_j, whose mean over (i, j)
        is mean(w_scale) * mean(1 / s). The official code sets each layer's LoRA learning rate from
        its own step size (/ 2500)."""
        return (self.w_scale.detach().abs().mean() * (1.0 / self.smooth).mean()).item()

    def add_lora(self, rank, generator=None):
        w = self.layer.weight
        fan_in = w[0].numel()
        a = torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5
        self.lora_A = nn.Parameter(a.to(w))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device))

    def add_lowrank(self, rank):
        """A float branch L = U V of this rank beside the quantized weight, zero until calibration
        (models/core/lowrank.py) or a checkpoint fills it; frozen until distill.py trains it."""
        w = self.layer.weight
        self.branch_conv = conv_args(self.layer)  # refuses a layer the branch cannot sit beside
        self.lowrank_U = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device), requires_grad=False)
        self.lowrank_V = nn.Parameter(torch.zeros(rank, w[0].numel(), dtype=w.dtype, device=w.device), requires_grad=False)

    @torch.no_grad()
    def merge_lora(self):
        if self.lora_A is not None:
            self.layer.weight += (self.lora_B @ self.lora_A).reshape(self.layer.weight.shape)
            self.lora_A = self.lora_B = None
        self.refresh()

    # ---- activations
    def quant_input(self, x):
        if self.smoothed:
            dim = 1 if isinstance(self.layer, (nn.Conv1d, nn.Conv2d)) else x.dim() - 1
            smooth = self._channel_view(self.smooth, x.dim(), dim)
        scale = self.a_scale[self.step].abs().clamp(min=1e-8)
        qmax = code_max(self.abits)
        if torch.is_grad_enabled():
            x = x / smooth if self.smoothed else x
            return fake_quant(x, scale, self.a_zero[self.step], qmax, round_zero=True)
        # sampling: fake_quant's arithmetic in place on a scratch tensor
        out = scratch_like(x)
        if self.smoothed:
            torch.div(x, smooth, out=out).div_(scale)
        else:
            torch.div(x, scale, out=out)
        zero = self.a_zero[self.step].round()
        return out.add_(zero).round_().clamp_(0, qmax).sub_(zero).mul_(scale)

    def forward(self, x):
        if self.mode == "fp":
            return self.layer(x)
        if self.w_q is None:
            self.refresh()
        if self.recompute and torch.is_grad_enabled():
            # keep only the layer's input for backward; its quantized copy and output are recomputed
            y = checkpoint(self._quant_forward, x, use_reentrant=False)
        else:
            y = self._quant_forward(x)
        if self.lowrank_U is not None:  # the float branch, on the input before quantization
            y = y + branch_forward(x, self.lowrank_U, self.lowrank_V, self.branch_conv)
        return y

    def _quant_forward(self, x):
        x = self.quant_input(x)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, self.w_q, self.layer.bias)
        return self.layer._conv_forward(x, self.w_q, self.layer.bias)


def quant_layers(module):
    return {name: m for name, m in module.named_modules() if isinstance(m, QuantLayer)}


def set_step(module, step):
    """Tells every layer with per-step activation parameters (QuantLayer, models.int8.Int8Layer)
    which DDIM step comes next."""
    for m in module.modules():
        if getattr(m, "has_steps", False):
            m.step = step


def refresh_weights(module):
    for m in quant_layers(module).values():
        m.refresh()


# WeightRefresher's pieces: rows of weights of one fan-in, up to this many elements, so that a
# FakeQuant's half-dozen temporaries stay in the CPU's cache
BANK_CHUNK = 1 << 17


class WeightRefresher:
    """refresh_weights for a training loop: the small layers' weights (below RECOMPUTE_MIN_WEIGHTS:
    all of the embedded default's) fake-quantized together instead of layer by layer. Layers of one
    fan-in are stacked as rows of one [channels, fan-in] tensor, cut into pieces of at most
    BANK_CHUNK elements; each piece goes through one FakeQuant, its scales, zero-points and qmax a
    column that broadcasts. Per layer that leaves only the LoRA product B A; the frozen weights,
    smoothing, zero-points and bit-widths are stacked once here, since they do not change in
    training (the weight scales do and are stacked each time). On the embedded default's 113 small
    layers the per-layer version was a dozen tiny operations each way per layer; one flat tensor of
    all of them (the version before) spent its time waiting on memory: its temporaries, 4 MB each,
    did not fit the cache, and the per-element scale gather and its backward cost as much again.
    The weights equal refresh_weights' exactly, the gradients to float rounding (tests/test_distill.py).
    The large layers refresh as before."""

    def __init__(self, module):
        layers = [m for m in quant_layers(module).values() if m.mode != "fp"]
        self.bank = [m for m in layers if not m.frozen and m.layer.weight.numel() < RECOMPUTE_MIN_WEIGHTS]
        self.rest = [m for m in layers if m not in self.bank]
        by_fan_in = {}
        for m in self.bank:
            m.note_smoothing()
            by_fan_in.setdefault(m.layer.weight[0].numel(), []).append(m)
        self.pieces = []  # (layers, their frozen weights, smoothing or None, zero-points, qmax)
        with torch.no_grad():
            for fan_in, group in sorted(by_fan_in.items()):
                piece, size = [], 0
                for m in group:  # a layer is never split; one larger than BANK_CHUNK is a piece alone
                    if piece and size + m.layer.weight.numel() > BANK_CHUNK:
                        self.pieces.append(self._stack(piece, fan_in))
                        piece, size = [], 0
                    piece.append(m)
                    size += m.layer.weight.numel()
                self.pieces.append(self._stack(piece, fan_in))

    @staticmethod
    def _stack(layers, fan_in):
        weight = torch.cat([m.layer.weight.reshape(-1, fan_in) for m in layers])
        smooth = None
        if any(m.smoothed for m in layers):  # x 1 is exact: unsmoothed layers of the piece may share it
            smooth = torch.cat([m._channel_view(m.smooth, m.layer.weight.dim(), 1).expand_as(m.layer.weight)
                                .reshape(-1, fan_in) for m in layers])
        zero = torch.cat([m.w_zero for m in layers])[:, None]
        qmax = code_max(torch.cat([m.bits for m in layers]))[:, None]
        return layers, weight, smooth, zero, qmax

    def __call__(self):
        for m in self.rest:
            m.refresh()
        for layers, weight, smooth, zero, qmax in self.pieces:
            w = weight
            if any(m.lora_A is not None for m in layers):
                w = w + torch.cat([m.lora_B @ m.lora_A if m.lora_A is not None else torch.zeros_like(m.layer.weight)
                                   .reshape(m.layer.weight.shape[0], -1) for m in layers])
            if smooth is not None:
                w = w * smooth
            scale = torch.cat([m.w_scale for m in layers]).abs().clamp(min=1e-8)[:, None]
            w_q = fake_quant(w, scale, zero, qmax)
            for m, v in zip(layers, w_q.split([m.layer.weight.shape[0] for m in layers])):
                m.w_q = v.view(m.layer.weight.shape)
