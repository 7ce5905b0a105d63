"""models/: the LDM UNet and decoders against the official checkpoint format and outputs."""
import hashlib
from pathlib import Path

import pytest
import torch

from models.diffusion import DDIM, ddim_sample, randn_per_sample, sample_generators
from models.ldm import LDM_CONFIGS, DiffusionModel, _official_names, config_from_yaml, load_ldm

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "ldm"
MINI = SHARED / "mini"
need_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"reference material not found at {SHARED}")
need_mini = pytest.mark.skipif(not MINI.is_dir(), reason=f"official mini cases not found at {MINI}")

# sha256 of the sorted 'key [shape]' lines of the official manifests (../shared/ldm/<name>.keys.tsv),
# restricted to what sampling needs: UNet, class embedder, decoder side of the first stage
MANIFEST_DIGESTS = {
    "cin256-v2": "0f1a49fdaaa3939281673f89710adbaeeda5f02f7eae3b84ee56014dd9c0356b",
    "lsun_beds256": "256f45f2a784e539c4a0d2c3519dcd7f8ba0f463647bdb5ff0bde1b95401579b",
    "lsun_churches256": "61f049e8269d1a4dfb8306b02ca0a0b3e2adde9519e623bda6f60289c5214543",
}


def meta_model(config):
    with torch.device("meta"):
        return DiffusionModel(LDM_CONFIGS[config] if isinstance(config, str) else config)


def official_shapes(model):
    sd = model.state_dict()
    return {official: list(sd[mine].shape) for official, mine in _official_names(model).items()}


@pytest.mark.parametrize("name", sorted(LDM_CONFIGS))
def test_keys_and_shapes_digest(name):
    lines = sorted(f"{k} [{','.join(map(str, s))}]" for k, s in official_shapes(meta_model(name)).items())
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == MANIFEST_DIGESTS[name]


def read_manifest(name):
    rows = [line.rstrip("\n").split("\t") for line in open(SHARED / f"{name}.keys.tsv")]
    return {k: [int(v) for v in s.strip("[]").split(",") if v] for k, s, _ in rows}


@need_shared
@pytest.mark.parametrize("name", sorted(LDM_CONFIGS))
def test_keys_and_shapes_match_manifest(name):
    manifest = read_manifest(name)
    ours = official_shapes(meta_model(name))
    assert set(ours) <= set(manifest), sorted(set(ours) - set(manifest))[:5]
    for k, shape in ours.items():
        assert manifest[k] == shape, k
    skipped = {k for k in manifest if k not in ours}
    # everything we do not build is the encoder side, the EMA copy or a schedule/scale buffer
    assert all(k.startswith(("first_stage_model.encoder.", "first_stage_model.quant_conv.", "model_ema."))
               or "." not in k for k in skipped), sorted(skipped)[:5]


@need_shared
@pytest.mark.parametrize("name", sorted(LDM_CONFIGS))
def test_official_yaml_gives_builtin_config(name):
    cfg = config_from_yaml(SHARED / f"{name}.yaml")
    assert official_shapes(meta_model(cfg)) == official_shapes(meta_model(name))


@need_shared
@pytest.mark.parametrize("name", sorted(LDM_CONFIGS))
def test_load_full_size_checkpoint(name, tmp_path):
    """A Lightning checkpoint with exactly the manifest's names and shapes loads unchanged. The
    tensors are expanded views of one value, so the file is tiny; scale_factor comes from the file."""
    manifest = read_manifest(name)
    sd = {}
    for k, shape in manifest.items():
        if k == "alphas_cumprod":
            sd[k] = DiffusionModel.alphas_cumprod.fget(meta_model(name))
        elif k == "model_ema.num_updates":
            sd[k] = torch.tensor(0, dtype=torch.int32)
        else:
            sd[k] = torch.tensor(0.5 if k.startswith("model_ema.") else 0.25).expand(shape)
    if name == "lsun_churches256":
        sd["scale_factor"] = torch.tensor(0.22)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 1}, path)
    model = load_ldm(path, name)
    w = model.unet.input_blocks[1][0].in_layers[2].weight
    assert w.shape == torch.Size(manifest["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"])
    # LSUN checkpoints carry model_ema.*: those are the weights used
    assert w.flatten()[0].item() == (0.5 if any(k.startswith("model_ema.") for k in manifest) else 0.25)
    assert model.scale_factor == pytest.approx(0.22 if name == "lsun_churches256" else 1.0)


MINI_CASES = {"cin": ("cin256_unet", "vqf4_decoder"), "beds": ("beds256_unet", "vqf4_decoder"),
              "churches": ("churches256_unet", "klf8_decoder")}


def mini_checkpoint(case, tmp_path, ema=False):
    """An official-style checkpoint assembled from a mini UNet case and its first stage's mini case
    (their configs are the same file), with an encoder key and the schedule buffers added as a real
    checkpoint has them."""
    unet_case, dec_case = MINI_CASES[case]
    u = torch.load(MINI / f"{unet_case}_mini.pt", weights_only=True)
    d = torch.load(MINI / f"{dec_case}_mini.pt", weights_only=True)
    cfg = config_from_yaml(MINI / f"{unet_case}_mini.yaml")
    sd = {**u["state_dict"], **d["state_dict"]}
    sd["first_stage_model.encoder.conv_in.weight"] = torch.zeros(3)
    sd["alphas_cumprod"] = DiffusionModel.alphas_cumprod.fget(meta_model(cfg))
    if case == "churches":
        sd["scale_factor"] = torch.tensor(1.0)
    if ema:  # the EMA copy holds the true weights; the live weights are garbage
        for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
            sd["model_ema." + k[len("model."):].replace(".", "")] = sd[k]
            sd[k] = torch.randn(sd[k].shape)
        sd["model_ema.decay"] = torch.tensor(0.9999)
    path = tmp_path / f"{case}.ckpt"
    torch.save({"state_dict": sd}, path)
    return path, MINI / f"{unet_case}_mini.yaml", u, d


def rel_err(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@need_mini
@pytest.mark.parametrize("case", sorted(MINI_CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-9)])
def test_mini_cases_match_official_outputs(case, dtype, tol, tmp_path):
    path, yaml_path, u, d = mini_checkpoint(case, tmp_path, ema=(case == "beds"))
    model = load_ldm(path, str(yaml_path)).to(dtype)
    ref_key = "out" if dtype == torch.float32 else "out_f64"
    with torch.no_grad():
        context = model.cond_stage_model(u["y"]) if "y" in u else None
        out = model.unet(u["x"].to(dtype), u["t"], context)
        assert rel_err(out, u[ref_key]) < tol
        dec = model.first_stage_model(d["z"].to(dtype))
        assert rel_err(dec, d[ref_key]) < tol
        if "indices" in d:
            assert torch.equal(model.first_stage_model.quantize.indices(d["z"].to(dtype)), d["indices"])
            nq = model.first_stage_model(d["z"].to(dtype), quantize=False)
            assert rel_err(nq, d["out_noquant" if dtype == torch.float32 else "out_noquant_f64"]) < tol


@need_mini
def test_load_errors_name_the_problem(tmp_path):
    path, yaml_path, _, _ = mini_checkpoint("cin", tmp_path)
    sd = torch.load(path, weights_only=True)["state_dict"]
    with pytest.raises(ValueError, match="missing .*input_blocks|unexpected"):
        load_ldm(path, str(MINI / "beds256_unet_mini.yaml"))
    bad = dict(sd)
    bad.pop("model.diffusion_model.out.2.bias")
    torch.save({"state_dict": bad}, tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match=r"missing 1 keys: model\.diffusion_model\.out\.2\.bias"):
        load_ldm(tmp_path / "missing.ckpt", str(yaml_path))
    bad = dict(sd)
    bad["model.diffusion_model.out.2.weight"] = torch.zeros(3, 32, 3, 1)
    torch.save({"state_dict": bad}, tmp_path / "shape.ckpt")
    with pytest.raises(ValueError, match=r"out\.2\.weight expected shape \[3, 32, 3, 3\], found \[3, 32, 3, 1\]"):
        load_ldm(tmp_path / "shape.ckpt", str(yaml_path))
    torch.save({"hello": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a latent-diffusion checkpoint"):
        load_ldm(tmp_path / "other.pt", str(yaml_path))
    with pytest.raises(ValueError, match="unknown config"):
        load_ldm(path, "cin512")


@need_mini
def test_ddim_guidance_sampling_is_deterministic(tmp_path):
    path, yaml_path, _, _ = mini_checkpoint("cin", tmp_path)
    model = load_ldm(path, str(yaml_path))
    ddim = DDIM(model.alphas_cumprod, steps=4, eta=0.5)

    def run(seed):
        gens = sample_generators(seed, range(3))
        x_T = randn_per_sample(gens, model.latent_shape)
        ctx, uctx = model.context(torch.tensor([1, 2, 3]))
        z = ddim_sample(model.unet, ddim, x_T, ctx, uctx, guidance=3.0, generators=gens)
        return model.decode(z)

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 3, 128, 128) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_ddim_timesteps_and_schedule_match_ldm():
    from models.diffusion import ddim_timesteps, linear_alphas_cumprod
    assert list(ddim_timesteps(20)[:3]) == [1, 51, 101] and ddim_timesteps(20)[-1] == 951
    ac = linear_alphas_cumprod(1000, 0.0015, 0.0195)
    assert ac.dtype == torch.float32 and abs(ac[0].item() - (1 - 0.0015)) < 1e-7
    ddim = DDIM(ac, steps=20)
    assert ddim.timesteps[0] == 951 and ddim.timesteps[-1] == 1
    # eta = 0 is deterministic: no noise is drawn
    x = torch.randn(2, 3, 4, 4)
    eps = torch.randn_like(x)
    x_prev, x0 = ddim.step(x, eps, 0)
    a = ac[951]
    assert torch.allclose(x0, (x - (1 - a).sqrt() * eps) / a.sqrt())


# the official code's own count of quantized layers (quant_model.py: "265 for imagenet, 73 for
# lsun-bedroom, 109 for lsun-church"): it wraps Conv2d and Linear, skips 'skip'/'op' convs
OFFICIAL_LAYER_COUNTS = {"cin256-v2": 265, "lsun_beds256": 73, "lsun_churches256": 109}


def quantized_layer_count(config, **flags):
    from models.qmodel import wrap_unet

    model = meta_model(config)
    with torch.device("meta"):
        layers = wrap_unet(model.unet, 2, 4, 20, **flags)
    return sum(q.mode != "fp" for q in layers.values()), sum(q.mode == "w8a8" for q in layers.values())


@pytest.mark.parametrize("name", sorted(LDM_CONFIGS))
def test_quantized_layer_counts_match_the_official_code(name):
    assert quantized_layer_count(name) == (OFFICIAL_LAYER_COUNTS[name], 4)
    # the attention blocks' Conv1d qkv/proj_out (LSUN only) are quantized only when asked for
    extra = {"cin256-v2": 0, "lsun_beds256": 32, "lsun_churches256": 42}[name]
    assert quantized_layer_count(name, quantize_conv1d=True)[0] == OFFICIAL_LAYER_COUNTS[name] + extra


@need_shared
@pytest.mark.parametrize("name", sorted(LDM_CONFIGS))
def test_quantized_layer_counts_from_the_official_yaml(name):
    """The same counts for the model built from the official YAML, whose names and shapes are the
    manifest's (test_official_yaml_gives_builtin_config)."""
    assert quantized_layer_count(config_from_yaml(SHARED / f"{name}.yaml"))[0] == OFFICIAL_LAYER_COUNTS[name]


def official_ddim_timesteps(steps, T=1000):
    """make_ddim_timesteps('uniform', steps, T) of the official DDIMSampler, written out."""
    import numpy as np

    c = T // steps
    return np.asarray(list(range(0, T, c))) + 1


@pytest.mark.parametrize("steps", [20, 25, 50, 7, 30, 100, 250])
def test_ddim_timesteps_equal_the_official_schedule(steps):
    from models.diffusion import ddim_timesteps, linear_alphas_cumprod

    ref = official_ddim_timesteps(steps)
    assert list(ddim_timesteps(steps)) == list(ref)
    ddim = DDIM(linear_alphas_cumprod(), steps=steps)
    assert ddim.steps == len(ref) and ddim.requested == steps
    assert list(ddim.timesteps) == list(ref[::-1])
    if steps == 7:  # 8 steps from t = 995, as the official sampler runs them
        assert ddim.steps == 8 and ddim.timesteps[0] == 995


@pytest.mark.parametrize("steps", [3, 300])
def test_ddim_step_counts_the_official_schedule_cannot_do_are_refused(steps):
    from models.diffusion import ddim_timesteps

    with pytest.raises(ValueError, match="past the last timestep"):
        ddim_timesteps(steps)


def test_uint8_conversion_truncates_as_the_official_scripts():
    """255 * clamp((x + 1) / 2, 0, 1) cast to uint8 (latent-diffusion's and MPQ-DM's sampling
    scripts, through numpy): truncation, not rounding."""
    import numpy as np

    from models.diffusion import to_uint8

    torch.manual_seed(0)
    x = torch.cat([torch.rand(2, 3, 16, 16) * 2.4 - 1.2, torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)])
    official = (255. * torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0).permute(0, 2, 3, 1).numpy()).astype(np.uint8)
    ours = to_uint8(x)
    assert ours.dtype == torch.uint8 and ours.shape == (4, 16, 16, 3)
    assert np.array_equal(ours.numpy(), official)
    rounded = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert (rounded.int() - ours.int()).float().mean() > 0.4  # rounding is half a level brighter
    assert to_uint8(torch.tensor([0.999]).reshape(1, 1, 1, 1)).item() == 254  # 254.87 truncates


@need_mini
def test_kl_decoding_scales_as_the_official_code(tmp_path):
    """In float64 the KL-f8 decoder reproduces the official output to float64 rounding, and decode()
    applies the scale as the official decode_first_stage does (1 / scale_factor * z, which differs
    from z / scale_factor in the last bit)."""
    path, yaml_path, _, d = mini_checkpoint("churches", tmp_path)
    model = load_ldm(path, str(yaml_path)).double()
    z = d["z"].double()
    with torch.no_grad():
        out = model.first_stage_model(z)
        # float64 rounding of this CPU's kernels only (bit for bit on some CPUs, 9e-15 seen on others);
        # any float32 step or wrong op leaves errors above 1e-7
        assert (out - d["out_f64"]).abs().max().item() < 1e-12
        assert torch.equal(model.decode(z), out.clamp(-1, 1))  # scale_factor 1 here
        s = 0.22765929  # a scale_by_std value like churches'
        model.scale_factor = s
        z_s = z * s
        assert not torch.equal(z_s / s, 1.0 / s * z_s)  # the two orders differ on these inputs
        assert torch.equal(model.decode(z_s), model.first_stage_model(1.0 / s * z_s).clamp(-1, 1))
