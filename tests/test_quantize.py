"""quantize.py and models/core/quant.py, models/core/allocate.py: OMQ allocation and calibration."""
import json

import pytest
import torch
import torch.nn as nn

from models.core.allocate import calibrate_layer, kurtosis, split_bits, split_candidates
from models.checkpoint import load_quant_model, quant_checkpoint
from models.files import save_atomic
from models.diffusion import DDIM, ddim_sample
from models.core.quant import QuantLayer, fake_quant, quant_layers, range_search, set_step
from models.seeds import HELD_OUT_SEED_OFFSET
from models.trajectory import eps_mse
from tests.conftest import QUICK, run_script


def planted_layer(seed=0):
    """A Linear layer of 40 output channels: 4 with one large outlier weight (high kurtosis), 4 nearly
    binary (+-1, kurtosis ~1: one bit loses little), the rest Gaussian."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 64, generator=g)
    w[:4, 0] = 12.0
    w[4:8] = torch.sign(torch.randn(4, 64, generator=g)) + 0.01 * torch.randn(4, 64, generator=g)
    layer = nn.Linear(64, 40)
    with torch.no_grad():
        layer.weight.copy_(w)
    inputs = {s: torch.randn(256, 64, generator=g) * (1 + s) for s in range(3)}
    return layer, inputs


def calibrated(method, n=2, seed=0):
    layer, inputs = planted_layer(seed)
    q = QuantLayer(layer, "quant", n, 8, n_steps=3)
    report = calibrate_layer(q, inputs, method=method, smooth_alphas=(0.0,))
    return q, report


def test_planted_outliers_get_more_bits_and_lower_error():
    q, report = calibrated("omq")
    _, uniform = calibrated("uniform")
    assert report["split"] > 0
    assert report["mse_chosen"] < uniform["mse_chosen"]
    # the outlier channels got n+1 bits, the near-binary ones n-1
    assert (q.bits[:4] == 3).all() and (q.bits[4:8] == 1).all()
    assert q.bits.float().mean().item() == 2.0


def test_random_control_keeps_omqs_split_sizes_on_other_channels():
    """--method random: the same search as OMQ (same k, smoothing, search error), then its n+1 and
    n-1 bits on channels drawn at random, each channel with the weight range of its own bit-width;
    on the planted layer that costs error, since the kurtosis picks were the right ones."""
    q_omq, omq = calibrated("omq")
    layer, inputs = planted_layer()
    q = QuantLayer(layer, "quant", 2, 8, n_steps=3)
    rand = calibrate_layer(q, inputs, method="random", smooth_alphas=(0.0,), generator=torch.Generator().manual_seed(0))
    assert (rand["split"], rand["high"], rand["low"]) == (omq["split"], omq["high"], omq["low"]) and omq["split"] > 0
    assert rand["mse_kurtosis_split"] == pytest.approx(omq["mse_chosen"], rel=1e-6) and rand["mse_chosen"] > omq["mse_chosen"]
    assert q.bits.float().mean().item() == 2.0 and not torch.equal(q.bits, q_omq.bits)
    w = q.smoothed_weight().detach()
    for b in (1, 2, 3):
        scale = range_search(w, 2.0 ** b - 1, dim=0)[0].half().float()  # as round_params stores it
        assert torch.allclose(q.w_scale[q.bits == b], scale[q.bits == b]), b
    q2 = QuantLayer(planted_layer()[0], "quant", 2, 8, n_steps=3)  # another draw, other channels
    calibrate_layer(q2, inputs, method="random", smooth_alphas=(0.0,), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(q2.bits, q.bits)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_split_keeps_average_exactly_n_and_follows_kurtosis(n):
    kurt = torch.rand(37, generator=torch.Generator().manual_seed(n)) * 10
    for k in split_candidates(37):
        bits = split_bits(kurt, n, k)
        assert bits.float().mean().item() == n
        if k:
            assert bits[kurt.argmax()] == n + 1 and bits[kurt.argmin()] == n - 1
            # every n+1 channel has higher kurtosis than every n-1 channel
            assert kurt[bits == n + 1].min() > kurt[bits == n - 1].max()
    assert split_candidates(37) == [0, 3, 6, 9, 12, 15, 18]


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_split_scores_from_per_channel_errors_equal_direct_output_errors(kind):
    """The OMQ search scores every split from one error per (channel, bit-width); each score must
    equal the output error of the layer actually quantized with that split."""
    from models.core.allocate import channel_errors

    g = torch.Generator().manual_seed(1)
    if kind == "linear":
        layer, inputs = planted_layer()
    else:
        layer = nn.Conv2d(8, 20, 3, padding=1)
        inputs = {s: torch.randn(6, 8, 5, 5, generator=g) for s in range(3)}
    q = QuantLayer(layer, "quant", 2, 4, n_steps=3)
    for s, x in inputs.items():
        q.a_scale.data[s], q.a_zero.data[s] = range_search(x, 15.0, integer_zero=True)
    w = q.smoothed_weight().detach()
    ranges = {b: range_search(w, 2.0 ** b - 1, dim=0) for b in (1, 2, 3)}
    weights = []
    for b in (1, 2, 3):
        q.bits.fill_(b)
        q.w_scale.data, q.w_zero.data = ranges[b]
        weights.append(q.quant_weight().detach())
    err, count = channel_errors(q, inputs, weights)
    kurt = kurtosis(w)
    for k in split_candidates(w.shape[0]):
        bits = split_bits(kurt, 2, k)
        q.bits.copy_(bits)
        q.w_scale.data = torch.stack([ranges[b][0] for b in (1, 2, 3)]).gather(0, bits.long()[None] - 1)[0]
        q.w_zero.data = torch.stack([ranges[b][1] for b in (1, 2, 3)]).gather(0, bits.long()[None] - 1)[0]
        q.refresh()
        direct, n = 0.0, 0
        with torch.no_grad():
            for s, x in inputs.items():
                q.step = s
                direct += (q(x) - layer(x)).double().pow(2).sum().item()
                n += layer(x).numel()
        scored = err.gather(0, bits.long()[None] - 1).sum().item() / count
        assert n == count and abs(scored - direct / n) <= 1e-5 * direct / n, (k, scored, direct / n)


def test_quant_model_is_built_on_the_fp_models_device():
    """quantize.py wraps a model already on --device: every quantizer tensor must be made there, or
    calibration mixes devices (found on a GPU). CI has no GPU; the meta device stands in for it."""
    from models.digits import DEFAULT_CHECKPOINT
    from models.checkpoint import load_fp_model
    from models.qmodel import build_quant_model
    fp = load_fp_model(DEFAULT_CHECKPOINT).to("meta")
    q = build_quant_model(fp, dict(wbits=2, abits=4, steps=4, quantize_all=False, quantize_conv1d=False))
    layers = quant_layers(q.unet)
    assert layers and all(t.device.type == "meta" for m in layers.values() for t in [*m.parameters(), *m.buffers()])


def test_moving_a_quant_model_moves_its_fake_quantized_weights(quant_ckpts):
    """distill.py and sample.py load on the CPU (weights fake-quantized once, there) and then move the
    model to --device: the cached weights must follow, or the first forward mixes devices."""
    _, q, _ = load_quant_model(quant_ckpts["omq"])
    layers = [m for m in quant_layers(q.unet).values() if m.mode != "fp"]
    assert layers and all(m.w_q is not None for m in layers)
    q.to("meta")
    assert all(m.w_q.device.type == "meta" for m in layers)


def test_kurtosis_ranks_outliers_high():
    w = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    w[1, 0] = 50.0
    w[2] = torch.rand(1000) * 2 - 1  # uniform: kurtosis 1.8
    k = kurtosis(w)
    assert k[1] > k[0] > k[2]
    assert abs(k[0].item() - 3.0) < 0.5 and abs(k[2].item() - 1.8) < 0.2


def test_range_search_beats_min_max_at_two_bits():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    qmax = torch.full((16,), 3.0)
    scale, zero = range_search(w, qmax, dim=0)
    err = (fake_quant(w, scale[:, None], zero[:, None], qmax[:, None]) - w).pow(2).mean()
    lo, hi = w.min(1).values, w.max(1).values
    s0 = (hi - lo) / 3
    err_minmax = (fake_quant(w, s0[:, None], (-lo / s0)[:, None], qmax[:, None]) - w).pow(2).mean()
    assert err < 0.7 * err_minmax


def test_activation_ranges_are_per_step():
    q, _ = calibrated("uniform")
    assert len(set(q.a_scale.tolist())) == 3  # the three steps' inputs differ in scale
    x = torch.randn(8, 64) * 3
    q.refresh()
    q.step = 0
    y0 = q(x)
    q.step = 2
    assert not torch.equal(y0, q(x))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sampling_fast_path_equals_training_arithmetic(kind):
    """Sampling quantizes activations in place in a reused scratch tensor; it must give bit-identical
    outputs to the differentiable path, smoothed or not, for contiguous and permuted inputs, and a
    later call, which reuses the scratch tensor, must not change an earlier call's result."""
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(16, 8), torch.randn(4, 16, 6, generator=g).transpose(1, 2)  # (4, 6, 16), strided
    else:
        # (b, h*w, c) -> (b, c, h, w) as a spatial transformer's proj_out sees it: channels-last strides,
        # for which the conv sums in another order than for a contiguous copy
        layer, x = nn.Conv2d(16, 8, 1), torch.randn(4, 25, 16, generator=g).permute(0, 2, 1).unflatten(2, (5, 5))
    q = QuantLayer(layer, "quant", 4, 8, n_steps=2)  # fine grids: sums whose order shows in the last bit
    with torch.no_grad():
        q.a_scale.fill_(0.037)
        q.a_zero.fill_(127.3)
        q.w_scale.fill_(0.01)
    for smooth in (None, torch.rand(16, generator=g) + 0.5):
        if smooth is not None:
            q.smooth.copy_(smooth)
        q.refresh()
        for inp in (x, x.contiguous()):
            with torch.enable_grad():
                want = q(inp).detach()
            with torch.no_grad():
                got = q(inp)
                q(inp * 2)  # reuses the same scratch tensor
            assert torch.equal(got, want)


def test_quantize_script_end_to_end(quant_ckpts):
    ratios = {}
    for key, path in quant_ckpts.items():
        report = json.loads(path.with_suffix(".json").read_text())
        layers = report["layers"]
        method = report["settings"]["method"]
        assert method == ("uniform" if key == "uniform" else "omq")
        assert {r["mode"] for r in layers.values()} == ({"quant", "w8a8"} if key == "all" else {"quant", "w8a8", "fp"})
        assert layers["input_blocks.0.0"]["mode"] == "w8a8" and layers["out.2"]["mode"] == "w8a8"
        fp_model, qmodel, ckpt = load_quant_model(path)
        qlayers = quant_layers(qmodel.unet)
        assert qlayers.keys() == layers.keys()
        for name, r in layers.items():  # the saved model carries the bits that the report describes
            q = qlayers[name]
            assert q.mode == r["mode"], name
            if r["mode"] == "quant":
                assert set(q.bits.tolist()) <= ({2} if method == "uniform" else {1, 2, 3}), name
                assert q.bits.float().mean().item() == 2.0, name  # exactly n on average, mixed or not
                assert ((q.bits == 3).sum().item(), (q.bits == 1).sum().item()) == (r["high"], r["low"]), name
        # per-step activation parameters differ between steps for the quantized layers
        varying = [n for n, m in qlayers.items() if m.mode == "quant" and len(set(m.a_scale.tolist())) > 1]
        assert len(varying) > 0.9 * sum(m.mode == "quant" for m in qlayers.values())
        # the reported eps MSE is the saved model's, on the held-out trajectories
        s = ckpt["settings"]
        ddim = DDIM(fp_model.alphas_cumprod, steps=s["steps"])
        again = eps_mse(fp_model, qmodel, ddim, 4, 8, s["seed"] + HELD_OUT_SEED_OFFSET, s["guidance"], torch.device("cpu"))
        assert again == ckpt["eps_mse"]  # the same model, trajectories, batches and kernels: the same bits
        # and calibration did its work: the same model with min/max weight ranges and untouched
        # activation quantizers (scale 1, zero 0) is clearly worse
        with torch.no_grad():
            for q in qlayers.values():
                if q.mode != "fp":
                    w = q.smoothed_weight().flatten(1)
                    lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
                    q.w_scale.copy_((hi - lo) / (2.0 ** q.bits.float() - 1))
                    q.w_zero.copy_(-lo / q.w_scale)
                    q.a_scale.fill_(1.0)
                    q.a_zero.fill_(0.0)
                    q.refresh()
        crude = eps_mse(fp_model, qmodel, ddim, 4, 8, s["seed"] + HELD_OUT_SEED_OFFSET, s["guidance"], torch.device("cpu"))
        ratios[key] = ckpt["eps_mse"] / crude
    assert max(ratios.values()) < 0.75, ratios


def test_save_load_round_trip_is_exact(quant_ckpts, tmp_path):
    fp_model, qmodel, ckpt = load_quant_model(quant_ckpts["omq"])
    path = tmp_path / "again.pt"
    save_atomic(quant_checkpoint(qmodel, ckpt["fp"]), path)
    _, again, _ = load_quant_model(path)
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([1, 300, 600, 999])
    ctx, _ = fp_model.context(torch.tensor([0, 3, 5, 10]))
    for step in (0, 3):
        set_step(qmodel.unet, step)
        set_step(again.unet, step)
        with torch.no_grad():
            assert torch.equal(qmodel.unet(x, t, ctx), again.unet(x, t, ctx))


def test_sampling_never_requantizes_weights(quant_ckpts, monkeypatch):
    fp_model, qmodel, ckpt = load_quant_model(quant_ckpts["omq"])
    calls = []
    monkeypatch.setattr(QuantLayer, "quant_weight", lambda self: calls.append(1))
    ddim = DDIM(fp_model.alphas_cumprod, steps=4)
    ctx, uctx = fp_model.context(torch.arange(4))
    ddim_sample(qmodel.unet, ddim, torch.randn(4, 1, 8, 8), ctx, uctx, guidance=2.0)
    assert calls == []


@pytest.mark.parametrize("flags,message", [
    (["--wbits", "1"], "n = 1 would leave 0 bits"),
    (["--wbits", "9"], "--wbits must be 2..8"),
    (["--abits", "1"], "--abits must be 2..8"),
    (["--method", "mixed"], "unknown --method 'mixed'"),
    (["--ckpt", "checkpoints/digits_classifier.pt"], "not a diffusion model checkpoint"),
    (["--ckpt", "no/such/file.pt"], "no checkpoint at no/such/file.pt"),
])
def test_bad_input_is_refused_clearly(flags, message, tmp_path):
    proc = run_script("quantize.py", *flags, *QUICK, "--out", tmp_path / "q.pt", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
