"""The integer path (models/int8.py, sample.py --kernels int8): each quantized layer on the CPU's int8
kernels equals its fake-quant float layer to float rounding, on made-up layers of every kind and along
a real sampling run; the model holds its quantized weights only as int8; sample.py runs it end to end.

The bound: |int8 - fake-quant| <= 1e-5 x the layer's largest output. Both compute the same sum of
integer products times the same scales; they differ by float32 rounding of that sum (the kernel sums
exactly in int32 and rounds once, the float path rounds as it sums: at most K 2^-24 of the K terms'
absolute sum). How that absolute sum compares with the largest output depends on the layer, so the
bound is a measured margin, not a derivation: the worst ratio was 6e-6 on the AVX2 machine this was
written on, and on made-up layers 1.0e-6 with AVX-512 VNNI, 1.4e-6 with oneDNN capped at AVX2 (no
VNNI) and 0.9e-6 with ATEN_CPU_CAPABILITY=default (bench/int8_layer_error.py, docs/portability.md).
A layer missing its zero-point correction fails every per-layer test here (docs/int8.md).
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

from models.checkpoint import load_sampling_model
from models.diffusion import DDIM, ddim_sample, randn_per_sample, sample_generators
from models.int8 import Int8Layer, convert_to_int8, int8_unavailable, weight_bytes
from models.core.quant import QuantLayer, quant_layers, set_step
from bench.int8_cases import LAYERS, made_up_layer
from tests.conftest import run_script

pytestmark = pytest.mark.skipif(int8_unavailable("cpu") is not None, reason=str(int8_unavailable("cpu")))
BOUND = 1e-5


def assert_same_output(fake, int8, x, what):
    with torch.no_grad():
        a, b = fake(x), int8(x)
    assert a.shape == b.shape, what
    err = (a - b).abs().max().item() / a.abs().max().item()
    assert err <= BOUND, f"{what}: int8 differs from fake-quant by {err:.2e} of the largest output"


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("bits", [(1, 2, 3), (4,), (8,)], ids=["W1-2-3", "W4", "W8"])
def test_int8_layer_equals_fake_quant_layer(kind, bits):
    """Each step's activation parameters, two input shapes (the weight is prepacked for the first),
    mixed bit-widths, real zero-points and smoothing."""
    make, shape, other_shape = LAYERS[kind]
    torch.manual_seed(0)
    fake = made_up_layer(make(), bits)
    int8 = Int8Layer(fake)
    for step in (0, 1):
        fake.step = int8.step = step
        x = torch.randn(shape) * 1.5
        assert_same_output(fake, int8, x, f"{kind}, step {step}")
        assert_same_output(fake, int8, torch.randn(other_shape), f"{kind}, step {step}, another shape")


def test_int8_activation_codes_equal_the_fake_quant_codes():
    """The int8 path rounds by adding 1.5 * 2^23 after clamping; the codes must be round()'s,
    half-way values (ties to even) included."""
    fake = made_up_layer(nn.Linear(8, 16), (2,), smooth=False)
    int8 = Int8Layer(fake)
    scale, zero = fake.a_scale[0].item(), fake.a_zero[0].item()
    v = torch.cat([torch.arange(-4, 20, 0.5), torch.randn(1000) * 8])  # every half-way value, and others
    x = ((v - zero) * scale).float().reshape(-1, 8)
    codes, *_ = int8.quantize_input(x)
    expected = (x / fake.a_scale[0] + zero).round().clamp(0, 15)
    assert torch.equal(codes.float(), expected)


def test_int8_w8a8_layers_stay_in_float_and_are_counted():
    """8-bit activations times 8-bit weights can saturate the int16 pair sums of CPUs without VNNI:
    such a layer is not put on the kernels."""
    q = made_up_layer(nn.Linear(8, 16), (8,), abits=8)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = nn.Sequential(q, QuantLayer(nn.Linear(16, 16), "fp", 8, 8, 2),
                                      made_up_layer(nn.Linear(16, 16), (2,), seed=1))

    model = Model()
    counts = convert_to_int8(model)
    assert counts == dict(int8=1, float_not_fitting=1, full_precision=1)
    assert isinstance(model.unet[0], QuantLayer) and isinstance(model.unet[2], Int8Layer)


def test_int8_model_equals_fake_quant_layer_by_layer_along_a_sampling_run(quant_ckpts):
    """Every int8 layer of a quantize.py model (OMQ: mixed bits and smoothing), at every step of a
    sampling run, given the very input it got there, equals the fake-quant layer."""
    fake, _ = load_sampling_model(quant_ckpts["omq"])
    model, _ = load_sampling_model(quant_ckpts["omq"])
    counts = convert_to_int8(model)
    assert counts["int8"] > 0 and counts["float_not_fitting"] == 4  # the W8A8 layers
    assert sum(counts.values()) == len(quant_layers(fake.unet))
    seen = []
    int8_layers = {n: m for n, m in model.unet.named_modules() if isinstance(m, Int8Layer)}
    for name, m in int8_layers.items():
        m.register_forward_hook(lambda mod, i, o, name=name: seen.append((name, mod.step, i[0].clone(), o.clone())))
    settings = model.quant_settings
    ddim = DDIM(model.alphas_cumprod, steps=settings["steps"])
    gens = sample_generators(0, range(4))
    x = randn_per_sample(gens, model.latent_shape)
    ctx, uctx = model.context(torch.arange(4))
    with torch.no_grad():
        ddim_sample(model.unet, ddim, x, ctx, uctx, 2.0, gens)
    assert {s for _, s, _, _ in seen} == set(range(settings["steps"]))
    assert len(seen) == len(int8_layers) * settings["steps"]
    fake_layers = quant_layers(fake.unet)
    assert any(fake_layers[n].smoothed for n in int8_layers) and any(len(set(fake_layers[n].bits.tolist())) > 1 for n in int8_layers)
    for name, step, x, y in seen:
        set_step(fake.unet, step)
        with torch.no_grad():
            expected = fake_layers[name](x)
        err = (expected - y).abs().max().item() / expected.abs().max().item()
        assert err <= BOUND, f"{name} at step {step}: {err:.2e}"


def test_int8_model_holds_its_quantized_weights_only_as_int8(quant_ckpts):
    model, _ = load_sampling_model(quant_ckpts["omq"])
    before = weight_bytes(model.unet)
    convert_to_int8(model)
    for m in model.unet.modules():
        if isinstance(m, Int8Layer):
            floats = [v for v in vars(m).values() if torch.is_tensor(v) and v.is_floating_point()]
            floats += [b for b in m.buffers()]
            assert all(t.dim() <= 1 for t in floats)  # scales, bias, smoothing, step parameters: no weight
    assert weight_bytes(model.unet) < 0.5 * before


def test_sample_py_int8_kernels_end_to_end(quant_ckpts, tmp_path):
    """sample.py --kernels int8 makes the same kind of images: each layer equals the float one to
    rounding, but over a chain a last-bit difference can flip an activation code at a rounding
    boundary (a whole quantization step), which then spreads; so images are compared as a whole."""
    common = ["--ckpt", quant_ckpts["all"].with_suffix(".packed.pt"), "--num-images", 16, "--no-png"]
    out = run_script("sample.py", *common, "--out", tmp_path / "int8", "--kernels", "int8").stdout
    run_script("sample.py", *common, "--out", tmp_path / "float")
    assert "int8 kernels: " in out
    a = np.load(tmp_path / "int8" / "samples.npz")["arr_0"].astype(float)
    b = np.load(tmp_path / "float" / "samples.npz")["arr_0"].astype(float)
    assert a.shape == b.shape == (16, 8, 8, 1)
    # this short chain gave identical images here; a flipped code moves a few pixels, while a layer
    # without its zero-point correction moved 8 % of them, by 3.8 grey levels on average
    assert (a == b).mean() >= 0.95 and np.abs(a - b).mean() < 1.0


def test_sample_py_int8_kernels_refuse_what_they_cannot_run(fp_ckpt, tmp_path):
    proc = run_script("sample.py", "--ckpt", fp_ckpt, "--kernels", "int8", "--out", tmp_path / "s", check=False)
    assert proc.returncode == 2 and "runs quantized layers" in proc.stderr and "Traceback" not in proc.stderr
    assert "CPU" in int8_unavailable("cuda")
    with pytest.raises(RuntimeError, match="CPU"):
        convert_to_int8(type("M", (), {"unet": nn.Linear(2, 2).to("meta")})())
