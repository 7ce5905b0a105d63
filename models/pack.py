"""Packed low-bit checkpoints: the integer weight codes of every quantized layer stored at their real
bit-widths (1, 2, 3, ... bits, mixed within a layer as OMQ allocated them), bit-packed into uint8.

Per quantized layer the file holds the per-channel bit-widths, scales and zero-points, the packed
codes of each bit-width's channels, the smoothing scale, the per-step activation parameters, the
bias and, where there is one, the float low-rank branch (in float16: the values it computes with).
Unpacking gives exactly the fake-quantized weights the model was sampled with: the dequantized
weight is (code - zero) * scale with the same float32 scale and zero-point.
"""
import numpy as np
import torch

from models.core.quant import code_max, quant_int, quant_layers

def pack_codes(codes, bits):
    """Unsigned integers < 2**bits (any shape) -> uint8 bytes, `bits` bits each, LSB first."""
    c = codes.reshape(-1).to(torch.int64).numpy()
    planes = ((c[:, None] >> np.arange(bits)) & 1).astype(np.uint8)  # [N, bits]
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_codes(packed, bits, count):
    planes = np.unpackbits(packed.numpy(), bitorder="little")[:count * bits].reshape(count, bits)
    return torch.from_numpy((planes.astype(np.int64) << np.arange(bits)).sum(1))


def layer_codes(q):
    """Integer codes [out, ...] of a QuantLayer's current (merged) weight."""
    w = q.smoothed_weight().detach()
    view = lambda v: v.reshape([-1] + [1] * (w.dim() - 1))
    qmax = view(code_max(q.bits))
    return quant_int(w, view(q.w_scale.detach().abs().clamp(min=1e-8)), view(q.w_zero), qmax)


def flatten(tensors):
    """Many small tensors -> one buffer per dtype plus an index (each tensor stored on its own costs
    a few hundred bytes of file overhead, more than a small layer's 2-bit weights)."""
    buffers, index, parts = {}, {}, {}
    for key, t in tensors.items():
        dt = str(t.dtype).replace("torch.", "")
        offset = sum(p.numel() for p in parts.get(dt, []))
        parts.setdefault(dt, []).append(t.detach().reshape(-1))
        index[key] = (dt, offset, list(t.shape))
    buffers = {dt: torch.cat(p) for dt, p in parts.items()}
    return dict(buffers=buffers, index=index)


def unflatten(flat):
    out = {}
    for key, (dt, offset, shape) in flat["index"].items():
        n = int(np.prod(shape)) if shape else 1
        out[key] = flat["buffers"][dt][offset:offset + n].reshape(shape).clone()
    return out


def pack_model(qmodel):
    """The packed form of a quantized DiffusionModel: the codes of every quantized layer at their
    bit-widths in one uint8 buffer, the quantizer parameters in float16 (the model computes with
    float16-representable values, see QuantLayer.round_params), and every other tensor as is."""
    layers, code_parts, offset = {}, [], 0
    quantized = {n: q for n, q in quant_layers(qmodel).items() if q.mode != "fp"}  # names as in qmodel's state_dict
    tensors = {}
    for name, q in quantized.items():
        codes = layer_codes(q)
        meta = dict(shape=list(q.layer.weight.shape), codes={})
        for b in sorted(set(q.bits.tolist())):
            rows = (q.bits == b).nonzero().flatten()
            packed = pack_codes(codes[rows], int(b))
            meta["codes"][int(b)] = (offset, packed.numel())
            code_parts.append(packed)
            offset += packed.numel()
        meta["smooth"] = not bool((q.smooth == 1).all())  # most layers are not smoothed: no vector then
        layers[name] = meta
        # the layer's quantizer parameters as one float16 record: w_scale | w_zero | a_scale | a_zero | smooth
        record = [q.w_scale, q.w_zero, q.a_scale, q.a_zero] + ([q.smooth] if meta["smooth"] else [])
        tensors[f"quantizer:{name}"] = torch.cat([t.detach().reshape(-1) for t in record]).half()
        tensors[f"bits:{name}"] = q.bits
    skip = {f"{n}.{k}" for n in quantized for k in ("layer.weight",) + QUANTIZER_STATE}
    tensors.update({k: v.half() if k.endswith(BRANCH) else v for k, v in qmodel.state_dict().items() if k not in skip})
    return dict(layers=layers, codes=torch.cat(code_parts) if code_parts else torch.zeros(0, dtype=torch.uint8),
                tensors=flatten(tensors))


def unpack_model(packed):
    """state_dict of the quantized DiffusionModel (packed layers' weights dequantized) from pack_model."""
    sd = unflatten(packed["tensors"])
    sd.update({k: v.float() for k, v in sd.items() if k.endswith(BRANCH)})
    for name, meta in packed["layers"].items():
        prefix = f"{name}."
        out_ch, in_ch = meta["shape"][:2]
        record = sd.pop(f"quantizer:{name}").float()
        steps = (len(record) - 2 * out_ch - (in_ch if meta["smooth"] else 0)) // 2
        parts = record.split([out_ch, out_ch, steps, steps, len(record) - 2 * out_ch - 2 * steps])
        for k, v in zip(("w_scale", "w_zero", "a_scale", "a_zero"), parts):
            sd[prefix + k] = v.clone()
        sd[prefix + "smooth"] = parts[4].clone() if meta["smooth"] else torch.ones(in_ch)
        sd[prefix + "bits"] = sd.pop(f"bits:{name}")
        bits, scale, zero = sd[prefix + "bits"], sd[prefix + "w_scale"].abs().clamp(min=1e-8), sd[prefix + "w_zero"]
        per_row = int(np.prod(meta["shape"][1:]))
        codes = torch.empty(meta["shape"][0], per_row)
        for b, (offset, nbytes) in meta["codes"].items():
            rows = (bits == b).nonzero().flatten()
            codes[rows] = unpack_codes(packed["codes"][offset:offset + nbytes], b, len(rows) * per_row
                                       ).reshape(len(rows), per_row).float()
        sd[prefix + "layer.weight"] = ((codes - zero[:, None]) * scale[:, None]).reshape(meta["shape"])
    return sd


QUANTIZER_STATE = ("smooth", "bits", "w_scale", "w_zero", "a_scale", "a_zero")
BRANCH = ("lowrank_U", "lowrank_V")  # a float low-rank branch (models/core/lowrank.py): stored in float16, as it computes


def fp32_bytes(model):
    """Size of a model's weights as float32 (quantizer parameters excluded): what a packed file is
    compared with."""
    return sum(v.numel() * 4 for k, v in model.state_dict().items() if not k.endswith(QUANTIZER_STATE + BRANCH))
