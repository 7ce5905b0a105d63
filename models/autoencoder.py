"""First stages of latent diffusion: the decoders of VQ-f4 (cin256-v2, lsun_beds256) and KL-f8
(lsun_churches256), and a whole KL autoencoder (encoder + decoder) for training one (the photograph
model's first stage, train.py --net autoencoder). Parameter names are the official ones
(ldm.modules.diffusionmodules.model.Encoder/Decoder, ldm.models.autoencoder.AutoencoderKL). Sampling
needs only the decode path (`FirstStageDecoder`, under `first_stage_model.*`), so an official
checkpoint's encoder keys are skipped on load.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def Normalize(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)  # every autoencoder norm uses eps 1e-6


def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention with 1x1 convs (the decoder's middle block)."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, c, h * w).transpose(1, 2)
        k = self.k(y).reshape(b, c, h * w)
        v = self.v(y).reshape(b, c, h * w)
        attn = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric (0, 1, 0, 1) zero pad, as the official encoder."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Encoder(nn.Module):
    """The official encoder: len(ch_mult) - 1 halvings; 2 * z_channels outputs when double_z (a KL
    latent's mean and log-variance)."""

    def __init__(self, ch, ch_mult, num_res_blocks, in_channels, z_channels, double_z=True, attn_resolutions=(), **_):
        super().__init__()
        if attn_resolutions:
            raise ValueError("encoder attention at resolutions other than the middle is not supported")
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(len(ch_mult)):
            level = nn.Module()
            blocks, block_in = [], ch * in_mult[i_level]
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[i_level]))
                block_in = ch * ch_mult[i_level]
            level.block = nn.ModuleList(blocks)
            level.attn = nn.ModuleList()
            if i_level != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i_level != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, out_ch, ch_mult, num_res_blocks, z_channels, attn_resolutions=(), **_):
        super().__init__()
        if attn_resolutions:
            raise ValueError("decoder attention at resolutions other than the middle is not in the released configs")
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        # `up` is stored lowest level first (up.0 is the highest resolution) but run from the top down
        levels = []
        for i_level in reversed(range(len(ch_mult))):
            level = nn.Module()
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[i_level]))
                block_in = ch * ch_mult[i_level]
            level.block = nn.ModuleList(blocks)
            level.attn = nn.ModuleList()
            if i_level != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(len(self.up))):
            for block in self.up[i_level].block:
                h = block(h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed, embed_dim):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def indices(self, z):
        """Nearest codebook row (L2) for each position of z [B, C, H, W], flattened over (b, h, w)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        e = self.embedding.weight
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return d.argmin(dim=1)

    def forward(self, z):
        b, c, h, w = z.shape
        return self.embedding(self.indices(z)).reshape(b, h, w, c).permute(0, 3, 1, 2)


class FirstStageDecoder(nn.Module):
    """`kind` 'vq' quantises the latent to the codebook before decoding (as LDM's decode_first_stage
    does); 'kl' decodes it directly. `scale_factor` is applied by the caller (see models.ldm)."""

    def __init__(self, kind, embed_dim, ddconfig, n_embed=None):
        super().__init__()
        if kind not in ("vq", "kl"):
            raise ValueError(f"first stage kind must be 'vq' or 'kl', got {kind!r}")
        self.kind = kind
        self.decoder = Decoder(**ddconfig)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if kind == "vq":
            self.quantize = VectorQuantizer(n_embed, embed_dim)

    def forward(self, z, quantize=True):
        if self.kind == "vq" and quantize:
            z = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))


class AutoencoderKL(nn.Module):
    """A KL-regularised autoencoder with the official AutoencoderKL's names (encoder.*, quant_conv.*,
    decoder.*, post_quant_conv.*). `decoder_state_dict()` gives the weights a FirstStageDecoder of
    kind 'kl' loads."""

    def __init__(self, embed_dim, ddconfig):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("a KL autoencoder needs double_z: its encoder outputs a mean and a log-variance")
        self.encoder = Encoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.decoder = Decoder(**ddconfig)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x):
        """Images in [-1, 1] -> the posterior's (mean, std), each [B, embed_dim, H/f, W/f]. The
        log-variance is clamped to [-30, 20], as the official DiagonalGaussianDistribution does."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def decoder_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
