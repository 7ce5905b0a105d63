"""The float low-rank branch (quantize.py --lowrank, models/core/lowrank.py): the branch plus the residual
is the layer it replaces; LoftQ rounds never make the weight error worse; calibration scores the
residual with the branch in place; --lowrank 0 is today's model; distill.py trains the branch; the
packed and int8 paths carry it."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.core.allocate import _set_branch, calibrate_layer, channel_errors
from models.checkpoint import load_packed_model, load_quant_model
from models.int8 import Int8Layer, int8_unavailable
from models.core.lowrank import allocate_ranks, lowrank_split, weight_error
from models.core.quant import QuantLayer, branch_forward, quant_layers, range_search
from tests.conftest import QUICK, run_script

EPS = 2.0 ** -24  # float32's unit roundoff


def layers():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1, stride=1)
    lin = nn.Linear(12, 9)
    with torch.no_grad():
        for m in (conv, lin):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g).pow(3))  # heavy tails: outliers to move
    return {"conv": (conv, torch.randn(2, 6, 5, 5, generator=g)), "linear": (lin, torch.randn(7, 12, generator=g))}


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("full", [True, False], ids=["full rank", "rank 2"])
def test_branch_plus_residual_is_the_layer(kind, full):
    """Before any quantization the residual the layer now holds plus the branch give back the weight
    to float32 rounding: residual = fl(W - fl(U V)), so |residual + U V - W| <= |fl(U V) - U V| + eps |residual|,
    with |fl(U V) - U V| <= R eps / (1 - R eps) sum_k |U_ik| |V_kj| (any summation order). And the
    branch's output is the convolution/product with U V to the same kind of bound."""
    layer, x = layers()[kind]
    w0 = layer.weight.detach().clone()
    fan_in = w0[0].numel()
    rank = min(w0.shape[0], fan_in) if full else 2
    q = QuantLayer(copy.deepcopy(layer), "quant", 2, 4, n_steps=1)
    q.add_lowrank(rank)
    with torch.no_grad():
        q.smooth.copy_(torch.rand(q.smooth.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
        _set_branch(q, w0, (rank, "svd", 0))
    u, v = q.lowrank_U.detach().double(), q.lowrank_V.detach().double()
    residual = q.layer.weight.detach().double()
    gamma = rank * EPS / (1 - rank * EPS)
    bound = gamma * (u.abs() @ v.abs()) + EPS * residual.abs().reshape(w0.shape[0], -1)
    err = (residual.reshape(w0.shape[0], -1) + u @ v - w0.double().reshape(w0.shape[0], -1)).abs()
    assert (err <= bound).all(), (err - bound).max()
    if full:  # the branch is the whole weight but for its float16 values: the residual is that rounding
        assert residual.abs().max() <= 2 ** -10 * (u.abs() @ v.abs()).max() + 1e-12
    else:
        assert residual.abs().max() > 1e-3  # rank 2 leaves a real residual to quantize
    # the branch's arithmetic: L x by two thin products, to float32 rounding of the fan_in + R terms
    lw = (u @ v).reshape(w0.shape)
    exact = F.linear(x.double(), lw) if kind == "linear" else F.conv2d(x.double(), lw, padding=1)
    size = (F.linear(x.double().abs(), (u.abs() @ v.abs()).reshape(w0.shape)) if kind == "linear"
            else F.conv2d(x.double().abs(), (u.abs() @ v.abs()).reshape(w0.shape), padding=1))
    got = branch_forward(x, q.lowrank_U, q.lowrank_V, q.branch_conv).double()
    n = fan_in + rank
    assert ((got - exact).abs() <= n * EPS / (1 - n * EPS) * size + 1e-30).all()


@pytest.mark.parametrize("seed, shape, rank, bits", [(2, (48, 64), 4, 2), (11, (10, 54), 8, 4)])
def test_loftq_rounds_never_increase_the_weight_error_and_help(seed, shape, rank, bits):
    """Each kept round lowers ||W - L - Q(W - L)||; the returned branch is the last kept one; on a
    heavy-tailed weight LoftQ ends below its SVD start. The second weight's fifth round, unchecked,
    raises the error (the quantizer's range is searched again for each residual): it must stop there."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).pow(3)
    u0, v0, e0 = lowrank_split(w, rank, bits, "svd")
    u, v, errors = lowrank_split(w, rank, bits, "loftq", rounds=6)
    assert e0 == errors[:1] and len(errors) > 1
    assert all(b < a for a, b in zip(errors, errors[1:]))
    assert weight_error(w.double(), u.double() @ v.double(), bits) == pytest.approx(errors[-1], rel=1e-6)
    assert errors[-1] < 0.97 * errors[0]
    # a branch beats no branch, and the SVD branch takes the largest values out of the residual
    assert e0[0] < weight_error(w.double(), torch.zeros_like(w, dtype=torch.float64), bits)
    assert (w - u0 @ v0).abs().max() < w.abs().max()
    with pytest.raises(ValueError, match="low-rank init"):
        lowrank_split(w, 4, 2, "pissa")


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_calibration_scores_the_residual_with_the_branch_in_place(kind):
    """calibrate_layer scores splits by the layer's output error, which with a branch is that of the
    quantized residual (the branch is exact): each score must equal the output error of the layer
    run whole (quantized residual + branch) against the full-precision layer. The branch's own rounding
    (at most (fan_in + R) 2^-24 of |x| |W| per output, 1e-6 of outputs here) against an output error of
    over 10 % moves the squared error by less than 1e-4 of itself."""
    layer, x = layers()[kind]
    inputs = {0: x, 1: 1.5 * x}
    q = QuantLayer(copy.deepcopy(layer), "quant", 2, 4, n_steps=2)
    q.add_lowrank(2)
    with torch.no_grad():
        for s, xs in inputs.items():
            q.a_scale.data[s], q.a_zero.data[s] = range_search(xs, 15.0, integer_zero=True)
        _set_branch(q, layer.weight.detach().clone(), (2, "loftq", 2))
        w = q.smoothed_weight()
        scale, zero = range_search(w, 3.0, dim=0)
        q.w_scale.copy_(scale)
        q.w_zero.copy_(zero)
        weights = [q.quant_weight()]
        err, count = channel_errors(q, inputs, weights)
        q.refresh()
        direct = 0.0
        for s, xs in inputs.items():
            q.step = s
            direct += (q(xs) - layer(xs)).double().pow(2).sum().item()
    assert err.sum().item() / count == pytest.approx(direct / count, rel=1e-4)
    assert direct / sum(layer(xs).pow(2).sum().item() for xs in inputs.values()) > 0.01
    # and calibrate_layer reports the branch and keeps the chosen smoothing's residual with it
    q2 = QuantLayer(copy.deepcopy(layer), "quant", 2, 4, n_steps=2)
    q2.add_lowrank(2)
    report = calibrate_layer(q2, inputs, "omq", (0.0, 0.5), 0.1, lowrank=(2, "loftq", 2))
    assert report["lowrank"] == 2 and report["loftq_weight_errors"]
    recon = q2.layer.weight.detach() + (q2.lowrank_U @ q2.lowrank_V).detach().reshape(layer.weight.shape)
    # loose on purpose (the exact bound is test_branch_plus_residual_is_the_layer's, about 2^-23 of |W| at
    # rank 2 on any CPU): it catches a residual taken before the branch's float16 rounding (~5e-4 of |W|)
    assert torch.allclose(recon, layer.weight.detach(), rtol=0, atol=1e-5 * layer.weight.abs().max().item())


@pytest.fixture(scope="module")
def lowrank_ckpt(fp_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("lowrank") / "lr.pt"
    proc = run_script("quantize.py", "--ckpt", fp_ckpt, "--out", path, "--lowrank", 3, "--pack", *QUICK)
    assert "float16 branch" in proc.stdout
    return path


def test_lowrank_zero_is_todays_model(fp_ckpt, quant_ckpts, tmp_path):
    """--lowrank 0 writes the same checkpoint as no option, tensor for tensor and setting for setting."""
    run_script("quantize.py", "--ckpt", fp_ckpt, "--out", tmp_path / "r0.pt", "--lowrank", 0, *QUICK)
    a, b = torch.load(quant_ckpts["omq"], weights_only=False), torch.load(tmp_path / "r0.pt", weights_only=False)
    assert a["settings"] == b["settings"] and "lowrank" not in b["settings"]
    assert a["unet_state_dict"].keys() == b["unet_state_dict"].keys()
    for k, v in a["unet_state_dict"].items():
        assert torch.equal(v, b["unet_state_dict"][k]), k


def test_lowrank_checkpoint_carries_the_branch(lowrank_ckpt):
    _, qmodel, ckpt = load_quant_model(lowrank_ckpt)
    low = {n: q for n, q in quant_layers(qmodel.unet).items() if q.mode == "quant"}
    assert low and all(q.lowrank_U is not None and q.lowrank_U.shape[1] == 3 for q in low.values())
    assert all(q.lowrank_U is None for q in quant_layers(qmodel.unet).values() if q.mode != "quant")
    assert all(q.lowrank_U.abs().sum() > 0 for q in low.values())
    assert ckpt["settings"]["lowrank"] == 3 and ckpt["settings"]["lowrank_init"] == "loftq"
    # float16 values (the packed file's)
    for q in low.values():
        assert torch.equal(q.lowrank_V, q.lowrank_V.half().float())


def test_distill_trains_the_branch_and_keeps_it_beside_the_weights(lowrank_ckpt, tmp_path):
    out = tmp_path / "d.pt"
    proc = run_script("distill.py", "--qckpt", lowrank_ckpt, "--iters", 1, "--batch-size", 4, "--eval-samples", 4,
                      "--lr-mult", 64, "--out", out, "--pack")
    assert "float branch (rank 3)" in proc.stdout
    _, before, _ = load_quant_model(lowrank_ckpt)
    _, after, _ = load_quant_model(out)
    lb, la = quant_layers(before.unet), quant_layers(after.unet)
    for name, q in lb.items():
        if q.mode == "quant":  # the branch trained; the residual is untouched (no LoRA merged into it)
            moved = not torch.equal(q.lowrank_U, la[name].lowrank_U) and not torch.equal(q.lowrank_V, la[name].lowrank_V)
            # but for the cross-attention's query and key: with one context token its softmax is 1
            # whatever they compute, so no gradient reaches them
            assert moved != name.endswith(("attn2.to_q", "attn2.to_k")), name
            assert torch.equal(q.layer.weight, la[name].layer.weight), name
        elif q.mode == "w8a8":  # these still get a cold LoRA, merged
            assert not torch.equal(q.layer.weight, la[name].layer.weight), name
    assert not any("lora" in k for k in torch.load(out, weights_only=False)["unet_state_dict"])
    # the packed file stores the branch in float16 and samples the same images as the float checkpoint
    images = {}
    for key, ckpt in {"float": out, "packed": out.with_suffix(".packed.pt")}.items():
        run_script("sample.py", "--ckpt", ckpt, "--num-images", 6, "--batch-size", 4, "--no-png", "--out", tmp_path / key)
        images[key] = np.load(tmp_path / key / "samples.npz")["arr_0"]
    assert np.array_equal(images["float"], images["packed"])
    packed, file = load_packed_model(out.with_suffix(".packed.pt"))
    index = file["packed"]["tensors"]["index"]
    assert {index[k][0] for k in index if k.endswith(("lowrank_U", "lowrank_V"))} == {"float16"}
    for name, q in quant_layers(packed.unet).items():
        if q.mode == "quant":
            assert torch.equal(q.lowrank_U, la[name].lowrank_U) and torch.equal(q.lowrank_V, la[name].lowrank_V)


@pytest.mark.skipif(int8_unavailable("cpu") is not None, reason=str(int8_unavailable("cpu")))
@pytest.mark.parametrize("kind", ["conv3x3", "conv3x3 stride 2, no bias", "conv1d", "linear"])
def test_int8_layer_with_a_branch_equals_the_fake_quant_layer(kind):
    """The branch runs in float beside the int8 GEMM on the same input: the layer still equals its
    fake-quant float layer within tests/test_int8.py's margin."""
    from tests.test_int8 import LAYERS, assert_same_output, made_up_layer

    make, shape, other_shape = LAYERS[kind]
    torch.manual_seed(0)
    fake = made_up_layer(make(), (1, 2, 3))
    fake.add_lowrank(3)
    with torch.no_grad():
        fake.lowrank_U.normal_()
        fake.lowrank_V.normal_(std=0.2)
    int8 = Int8Layer(fake)
    for step in (0, 1):
        fake.step = int8.step = step
        x = torch.randn(shape) * 1.5
        with torch.no_grad():
            assert (fake(x) - fake._quant_forward(x)).abs().max() > 0.1  # the branch counts in the output
        assert_same_output(fake, int8, x, f"{kind}, step {step}")
        assert_same_output(fake, int8, torch.randn(other_shape), f"{kind}, step {step}, another shape")


def test_negative_rank_is_refused(fp_ckpt, tmp_path):
    proc = run_script("quantize.py", "--ckpt", fp_ckpt, "--out", tmp_path / "x.pt", "--lowrank", -1, check=False)
    assert proc.returncode == 2 and "--lowrank must be 0" in proc.stderr


@pytest.mark.parametrize("name", ["cin256-v2", "lsun_beds256"])
def test_official_layer_policy_puts_the_branch_on_the_low_bit_layers_only(name):
    """On the official models' UNets (built on the meta device from the built-in configs, whose names
    and shapes tests/test_ldm.py checks against the manifests) the branch sits beside the official code's
    quantized layers less the four W8A8 ones, and beside the LSUN attention Conv1d layers only when
    those are quantized."""
    from models.ldm import LDM_CONFIGS, DiffusionModel
    from models.qmodel import build_quant_model
    from tests.test_ldm import OFFICIAL_LAYER_COUNTS

    with torch.device("meta"):
        fp = DiffusionModel(LDM_CONFIGS[name])
    for conv1d, extra in ((False, 0), (True, {"cin256-v2": 0, "lsun_beds256": 32}[name])):
        with torch.device("meta"):
            q = build_quant_model(fp, dict(wbits=2, abits=4, steps=20, quantize_all=False, quantize_conv1d=conv1d, lowrank=8))
        layers = quant_layers(q.unet)
        branched = {n: m for n, m in layers.items() if m.lowrank_U is not None}
        assert len(branched) == OFFICIAL_LAYER_COUNTS[name] - 4 + extra
        assert all(m.mode == "quant" for m in branched.values())
        assert sum(isinstance(m.layer, nn.Conv1d) for m in branched.values()) == extra
        for m in branched.values():
            assert m.lowrank_U.shape == (m.layer.weight.shape[0], 8) and m.lowrank_V.shape == (8, m.layer.weight[0].numel())


def test_allocate_ranks_buys_the_most_error_per_bit_within_the_budget():
    candidates = {
        "a": {0: (1.0, 0), 1: (0.5, 100), 2: (0.4, 200)},    # 0.005 per bit, then 0.001
        "b": {0: (1.0, 0), 1: (0.9, 100), 2: (0.2, 200)},    # rank 2 at once: 0.004 per bit
        "c": {0: (1.0, 0), 1: (1.0, 100)},                   # no gain: never bought
        "d": {0: (1.0, 0), 1: (0.95, -16)},                  # a gain for fewer bits: bought first
    }
    assert allocate_ranks(candidates, 300) == ({"a": 1, "b": 2, "c": 0, "d": 1}, 284)
    assert allocate_ranks(candidates, 150) == ({"a": 1, "b": 0, "c": 0, "d": 1}, 84)
    assert allocate_ranks(candidates, 0) == ({"a": 0, "b": 0, "c": 0, "d": 1}, -16)
    ranks, spent = allocate_ranks(candidates, 10_000)  # everything that helps, nothing that does not
    assert ranks == {"a": 2, "b": 2, "c": 0, "d": 1} and spent == 384


def test_lowrank_budget_gives_mixed_ranks_within_the_budget_end_to_end(fp_ckpt, quant_ckpts, tmp_path):
    """quantize.py --lowrank-budget: ranks per layer (some 0), the stored bits within the budget; the model
    loads, distils and samples in float, int8 and packed form with its mixed ranks."""
    base = json.loads(quant_ckpts["omq"].with_suffix(".json").read_text())["bits_per_weight"]
    budget = base + 0.3
    out = tmp_path / "b.pt"
    flags = ["--ckpt", fp_ckpt, "--lowrank-max", 2, "--lowrank-init", "svd", *QUICK]
    proc = run_script("quantize.py", *flags, "--lowrank-budget", f"{budget:.4f}", "--out", out, "--pack")
    report = json.loads(out.with_suffix(".json").read_text())
    ranks = report["settings"]["lowrank"]
    low = [n for n, r in report["layers"].items() if r["mode"] == "quant"]
    assert set(ranks.values()) <= {1, 2} and 0 < len(ranks) < len(low)  # mixed: some layers without a branch
    assert base < report["bits_per_weight"] <= budget + 1e-9
    assert all("lowrank_candidates" in report["layers"][n] for n in low)
    assert "a branch in" in proc.stdout
    _, q, _ = load_quant_model(out)
    got = {n: m.lowrank_U.shape[1] for n, m in quant_layers(q.unet).items() if m.lowrank_U is not None}
    assert got == ranks
    packed, _ = load_packed_model(out.with_suffix(".packed.pt"))
    assert {n: m.lowrank_U.shape[1] for n, m in quant_layers(packed.unet).items() if m.lowrank_U is not None} == ranks
    run_script("distill.py", "--qckpt", out, "--iters", 1, "--batch-size", 4, "--eval-samples", 4, "--out", tmp_path / "d.pt")
    for ckpt, kernels in ((tmp_path / "d.pt", "float"), (out.with_suffix(".packed.pt"), "float"), (out, "int8")):
        run_script("sample.py", "--ckpt", ckpt, "--num-images", 4, "--kernels", kernels, "--no-png",
                   "--out", tmp_path / f"s_{ckpt.stem}_{kernels}")
    # a budget below the model without a branch, and --lowrank with it, are refused
    proc = run_script("quantize.py", *flags, "--lowrank-budget", 1.0, "--out", tmp_path / "low.pt", check=False)
    assert proc.returncode == 2 and "below what the model stores without a branch" in proc.stderr
    proc = run_script("quantize.py", *flags, "--lowrank-budget", 9, "--lowrank", 2, "--out", tmp_path / "x.pt", check=False)
    assert proc.returncode == 2 and "pass one of them" in proc.stderr
