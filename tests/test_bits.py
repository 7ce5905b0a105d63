"""The one count of stored bits per weight (models/core/bits.py): by hand on a small model, and against
what a packed checkpoint really holds."""
import json

import pytest
import torch
import torch.nn as nn

from models.core.bits import stored_bits
from models.core.quant import QuantLayer, quant_layers
from models.files import load_file
from tests.conftest import QUICK, run_script


def test_bits_per_weight_by_hand():
    torch.manual_seed(0)
    low = QuantLayer(nn.Linear(64, 32), "quant", 2, 4, n_steps=1)
    with torch.no_grad():
        low.bits[:4], low.bits[4:8] = 3, 1      # an OMQ split: n+1 and n-1 channels, the same code bits
        low.smooth.uniform_(0.5, 2.0)          # smoothed: its vector is stored
    low.add_lowrank(2)
    w8 = QuantLayer(nn.Conv2d(8, 16, 3), "w8a8", 8, 8, n_steps=20)
    fp = QuantLayer(nn.Linear(4, 4), "fp", 2, 4, n_steps=20)
    model = nn.Sequential(low, w8, nn.Linear(16, 4), fp)
    got = stored_bits(model)
    codes = 2 * 32 * 64 + 8 * 16 * 8 * 9 + 32 * 16 * 4 + 32 * 4 * 4
    quantizer = (8 + 16 + 16) * 32 + (16 + 16) * 1 + 16 * 64 + (8 + 16 + 16) * 16 + (16 + 16) * 20
    branch = 16 * (32 * 2 + 2 * 64)
    weights = 32 * 64 + 16 * 8 * 9 + 16 * 4 + 4 * 4
    assert got == dict(weights=weights, codes=codes, quantizer=quantizer, branch=branch, bits=codes + quantizer + branch,
                       bits_per_weight=(codes + quantizer + branch) / weights)
    with torch.no_grad():
        low.smooth.fill_(1.0)  # unsmoothed: no vector
        low.bits[10] = 4       # each channel at its own width, whatever the layer's target
    assert stored_bits(model)["quantizer"] == quantizer - 16 * 64
    assert stored_bits(model)["codes"] == codes + 2 * 64


def test_the_count_is_what_the_packed_checkpoint_holds(quant_ckpts):
    """The codes of the quantized and W8A8 layers as packed (each bit-width's channels padded to a byte),
    and their quantizer records, are the bits the count gives them."""
    from models.checkpoint import load_quant_model
    from models.pack import unflatten

    _, qmodel, _ = load_quant_model(quant_ckpts["all"])
    packed = load_file(quant_ckpts["all"].with_suffix(".packed.pt"))["packed"]
    layers = {n: q for n, q in quant_layers(qmodel).items() if q.mode != "fp"}
    assert set(packed["layers"]) == set(layers)
    counted = stored_bits(nn.ModuleList(layers.values()))
    code_bytes = sum(nbytes for meta in packed["layers"].values() for _, nbytes in meta["codes"].values())
    groups = sum(len(meta["codes"]) for meta in packed["layers"].values())
    assert 0 <= 8 * code_bytes - counted["codes"] < 8 * groups
    tensors = unflatten(packed["tensors"])
    record_bits = sum(t.numel() * (16 if k.startswith("quantizer:") else 8) for k, t in tensors.items()
                      if k.startswith(("quantizer:", "bits:")))
    assert record_bits == counted["quantizer"]


@pytest.mark.parametrize("flags", [[], ["--lowrank", 2]])
def test_quantize_prints_and_reports_the_count(fp_ckpt, tmp_path, flags):
    out = tmp_path / "q.pt"
    proc = run_script("quantize.py", "--ckpt", fp_ckpt, "--out", out, *flags, *QUICK)
    report = json.loads(out.with_suffix(".json").read_text())
    from models.checkpoint import load_quant_model

    want = stored_bits(load_quant_model(out)[1].unet)
    assert report["bits_per_weight"] == pytest.approx(want["bits_per_weight"], rel=1e-12)
    assert report["stored_bits"] == {k: v for k, v in want.items() if k != "bits_per_weight"}
    assert f"{want['bits_per_weight']:.3f} bits per weight" in proc.stdout
