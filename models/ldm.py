"""A diffusion model as the scripts see it (UNet + optional class embedder + optional first-stage
decoder + noise schedule), the configs of the released LDM checkpoints, and the loader of the
official checkpoint files.

Config form (a plain dict, stored in every checkpoint this project writes):
    unet:         UNetModel keyword arguments (the official `unet_config.params` names)
    cond_stage:   {n_classes, embed_dim} for class-conditional models (last class = unconditional), or None
    first_stage:  {kind: 'vq'|'kl', embed_dim, n_embed, ddconfig} for latent models, or None (pixel space)
    schedule:     {timesteps, linear_start, linear_end}
    scale_factor: latent scale (a float; churches' real value is read from its checkpoint)
"""
import copy

import torch
import torch.nn as nn

from models.autoencoder import FirstStageDecoder
from models.diffusion import linear_alphas_cumprod
from models.safe_load import load_torch_file
from models.unet import ClassEmbedder, UNetModel

_VQF4 = dict(kind="vq", embed_dim=3, n_embed=8192,
             ddconfig=dict(double_z=False, z_channels=3, resolution=256, in_channels=3, out_ch=3, ch=128,
                           ch_mult=[1, 2, 4], num_res_blocks=2, attn_resolutions=[]))

# Facts from the official YAML files (CompVis/latent-diffusion): cin256-v2.yaml and the configs shipped
# beside the LSUN checkpoints. Only what the forward pass needs.
LDM_CONFIGS = {
    "cin256-v2": dict(
        unet=dict(image_size=64, in_channels=3, out_channels=3, model_channels=192, attention_resolutions=[8, 4, 2],
                  num_res_blocks=2, channel_mult=[1, 2, 3, 5], num_heads=1, use_spatial_transformer=True,
                  transformer_depth=1, context_dim=512),
        cond_stage=dict(n_classes=1001, embed_dim=512),
        first_stage=_VQF4,
        schedule=dict(timesteps=1000, linear_start=0.0015, linear_end=0.0195),
        scale_factor=1.0),
    "lsun_beds256": dict(
        unet=dict(image_size=64, in_channels=3, out_channels=3, model_channels=224, attention_resolutions=[8, 4, 2],
                  num_res_blocks=2, channel_mult=[1, 2, 3, 4], num_head_channels=32),
        cond_stage=None,
        first_stage=_VQF4,
        schedule=dict(timesteps=1000, linear_start=0.0015, linear_end=0.0195),
        scale_factor=1.0),
    "lsun_churches256": dict(
        unet=dict(image_size=32, in_channels=4, out_channels=4, model_channels=192, attention_resolutions=[1, 2, 4, 8],
                  num_res_blocks=2, channel_mult=[1, 2, 2, 4, 4], num_heads=8, use_scale_shift_norm=True,
                  resblock_updown=True),
        cond_stage=None,
        first_stage=dict(kind="kl", embed_dim=4,
                         ddconfig=dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                                       ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[])),
        schedule=dict(timesteps=1000, linear_start=0.0015, linear_end=0.0155),
        scale_factor=None),  # a buffer in the checkpoint (scale_by_std)
}

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."


class DiffusionModel(nn.Module):
    """Parameters live under `unet.*`, `cond_stage_model.*` and `first_stage_model.*`."""

    def __init__(self, config):
        super().__init__()
        self.config = copy.deepcopy(config)
        self.unet = UNetModel(**config["unet"])
        cond, first = config.get("cond_stage"), config.get("first_stage")
        self.cond_stage_model = ClassEmbedder(**cond) if cond else None
        self.first_stage_model = FirstStageDecoder(**first) if first else None
        self.scale_factor = float(config.get("scale_factor") or 1.0)
        self.quant_settings = None  # a quantized model's settings (models.qmodel.build_quant_model)

    @property
    def alphas_cumprod(self):
        """The training noise schedule (float32, on the CPU; cheap to recompute, never stored)."""
        return linear_alphas_cumprod(**self.config["schedule"])

    @property
    def num_classes(self):
        """Real classes (the unconditional class excluded), or 0 for an unconditional model."""
        return 0 if self.cond_stage_model is None else self.cond_stage_model.null_class

    @property
    def latent_shape(self):
        u = self.config["unet"]
        return (u["in_channels"], u["image_size"], u["image_size"])

    def context(self, y):
        """The UNet context for class labels y, and the unconditional context of the same batch."""
        if self.cond_stage_model is None:
            return None, None
        null = torch.full_like(y, self.cond_stage_model.null_class)
        return self.cond_stage_model(y), self.cond_stage_model(null)

    @torch.no_grad()
    def decode(self, z):
        """Latents (or pixels) to images in [-1, 1]."""
        if self.first_stage_model is None:
            return z.clamp(-1, 1)
        # 1 / scale_factor * z, as the official decode_first_stage: z / scale_factor can differ in the last bit
        return self.first_stage_model(1.0 / self.scale_factor * z).clamp(-1, 1)


def config_from_yaml(path):
    """Reads an official latent-diffusion YAML config (e.g. cin256-v2.yaml) into this project's form."""
    import yaml  # only needed for this path

    with open(path) as f:
        params = yaml.safe_load(f)["model"]["params"]
    unet = dict(params["unet_config"]["params"])
    for k in ("use_checkpoint", "use_fp16"):
        unet.pop(k, None)
    cond = params.get("cond_stage_config")
    if isinstance(cond, dict):
        if not cond["target"].endswith("ClassEmbedder"):
            raise ValueError(f"{path}: only class-conditional (ClassEmbedder) or unconditional models are supported, "
                             f"got cond_stage {cond['target']}")
        cp = cond.get("params", {})
        cond = dict(n_classes=cp.get("n_classes", 1000), embed_dim=cp["embed_dim"])
    else:
        cond = None
    fs = params["first_stage_config"]
    fp = fs["params"]
    kind = {"VQModelInterface": "vq", "VQModel": "vq", "AutoencoderKL": "kl"}[fs["target"].rsplit(".", 1)[-1]]
    first = dict(kind=kind, embed_dim=fp["embed_dim"], ddconfig=dict(fp["ddconfig"]))
    if kind == "vq":
        first["n_embed"] = fp["n_embed"]
    schedule = dict(timesteps=params.get("timesteps", 1000), linear_start=params.get("linear_start", 0.0015),
                    linear_end=params.get("linear_end", 0.0195))
    scale = None if params.get("scale_by_std") else float(params.get("scale_factor", 1.0))
    return dict(unet=unet, cond_stage=cond, first_stage=first, schedule=schedule, scale_factor=scale)


def resolve_config(config):
    """A config dict, a released model's name (see LDM_CONFIGS) or an official YAML path."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if config in LDM_CONFIGS:
        return copy.deepcopy(LDM_CONFIGS[config])
    if str(config).endswith((".yaml", ".yml")):
        return config_from_yaml(config)
    raise ValueError(f"unknown config {config!r}: give one of {sorted(LDM_CONFIGS)} or an official YAML path")


def _official_names(model):
    """Map official checkpoint key -> this model's state_dict key."""
    names = {}
    for k in model.state_dict():
        if k.startswith("unet."):
            names[UNET_PREFIX + k[len("unet."):]] = k
        else:
            names[k] = k  # cond_stage_model.* and first_stage_model.* keep their names
    return names


def _describe(keys, n=5):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def official_state_dict(sd, model, config_name="the given config"):
    """Turns an official LatentDiffusion state_dict into one for `model`: the EMA weights replace the
    UNet's when present (their names are the UNet names with every dot removed), the schedule
    buffers are checked against the config, encoder-side keys are dropped on purpose, and the
    scale_factor buffer is returned. Raises on missing/unexpected keys and wrong shapes."""
    names = _official_names(model)
    sd = dict(sd)
    ema = {k[len(EMA_PREFIX):]: v for k, v in sd.items() if k.startswith(EMA_PREFIX)}
    if ema:  # sample with the EMA weights, as the official LSUN sampling does
        for official in [k for k in names if k.startswith(UNET_PREFIX)]:
            ema_name = official[len("model."):].replace(".", "")
            if ema_name not in ema:
                raise ValueError(f"checkpoint has EMA weights but none for {official} ({EMA_PREFIX}{ema_name})")
            sd[official] = ema[ema_name]
    scale_factor = sd.pop("scale_factor", None)
    # keys the decode-only model does not need: the encoder side of the first stage, the EMA copy,
    # and the schedule buffers (recomputed from the config and compared below)
    ignored = ("first_stage_model.encoder.", "first_stage_model.quant_conv.", "first_stage_model.loss.", EMA_PREFIX)
    schedule = {k: sd.pop(k) for k in list(sd) if "." not in k}
    unexpected = [k for k in sd if k not in names and not k.startswith(ignored)]
    missing = [k for k in names if k not in sd]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match {config_name}: "
                         + (f"missing {len(missing)} keys: {_describe(missing)}; " if missing else "")
                         + (f"unexpected {len(unexpected)} keys: {_describe(unexpected)}" if unexpected else "")
                         + ". Is this a checkpoint of another model? Pass its config (a name or YAML path).")
    own = model.state_dict()
    out = {}
    for official, mine in names.items():
        if tuple(sd[official].shape) != tuple(own[mine].shape):
            raise ValueError(f"checkpoint does not match {config_name}: layer {official} expected shape "
                             f"{list(own[mine].shape)}, found {list(sd[official].shape)}")
        out[mine] = sd[official]
    if "alphas_cumprod" in schedule:
        ref = model.alphas_cumprod
        found = schedule["alphas_cumprod"].float()
        if found.shape != ref.shape or not torch.allclose(found, ref, rtol=1e-5, atol=1e-7):
            raise ValueError(f"checkpoint's noise schedule (alphas_cumprod) differs from {config_name}'s "
                             f"linear_start/linear_end")
    return out, (None if scale_factor is None else float(scale_factor))


def load_ldm(ckpt_path, config, ckpt=None):
    """Loads an official latent-diffusion checkpoint (a Lightning .ckpt with weights under
    'state_dict', or a bare state_dict) into a DiffusionModel. `config` is a released model's name
    ('cin256-v2', 'lsun_beds256', 'lsun_churches256'), an official YAML path, or a config dict.
    `ckpt`: the file's contents when the caller has already read it."""
    name = config if isinstance(config, str) else "the given config"
    config = resolve_config(config)
    if ckpt is None:
        ckpt = load_torch_file(ckpt_path)  # weights only: a Lightning file's few class names get inert stand-ins
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith(UNET_PREFIX) for k in sd):
        raise ValueError(f"{ckpt_path} is not a latent-diffusion checkpoint: no '{UNET_PREFIX}*' weights found")
    with torch.device("meta"):  # no random init, no second copy of the weights
        model = DiffusionModel(config)
    weights, scale_factor = official_state_dict(sd, model, name)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, assign=True)
    if scale_factor is not None:
        model.scale_factor = scale_factor
        model.config["scale_factor"] = scale_factor
    elif config.get("scale_factor") is None:
        raise ValueError(f"{name} scales its latents by a value stored in the checkpoint (scale_factor), "
                         f"but {ckpt_path} has none")
    return model.eval()


def guess_ldm_config(sd):
    """The released config whose UNet has exactly the names and shapes of this official state_dict,
    or None."""
    found = {k: tuple(v.shape) for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    for name, cfg in LDM_CONFIGS.items():
        with torch.device("meta"):
            unet = DiffusionModel(cfg).unet
        if found == {UNET_PREFIX + k: tuple(v.shape) for k, v in unet.state_dict().items()}:
            return name
    return None
