"""The photograph model's data and configs: a latent diffusion model of 32x32 RGB patches of ten real
photographs (data/photos.npz, made by data/make_photos.py from the photographs scikit-image and
scikit-learn ship; each one's source and licence are in the file's `meta`). The class is the source
photograph.

Patches are random square crops of 32 to 64 pixels (several scales), resized to 32x32 with an
antialiased bilinear filter and flipped left-right half the time. The last quarter of every
photograph's columns is held out: training crops lie left of it, the evaluation classifier's test
crops inside it.

The model has LDM-4's structure at a size this CPU can train: a KL autoencoder with f = 4 (32x32x3
pixels -> 8x8x3 latents, the official Encoder/Decoder) and a class-conditional UNet on the latents
with self-attention and cross-attention to the class embedding (cin256-v2's layout at reduced width;
every quantized layer at least 64 channels wide) and classifier-free guidance through an extra
unconditional class.
"""
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
PHOTOS_PATH = ROOT / "data" / "photos.npz"
PHOTO_AUTOENCODER = ROOT / "checkpoints" / "photo_autoencoder.pt"
PHOTO_CHECKPOINT = ROOT / "checkpoints" / "photo_unet.pt"
PHOTO_CLASSIFIER = ROOT / "checkpoints" / "photo_classifier.pt"
PATCH = 32
CROP_SIZES = (32, 64)  # smallest and largest crop side, in the stored photographs' pixels

# KL-f4 (LDM's kl-f4 first stage at reduced width: z = 3 channels, two halvings)
AUTOENCODER_CONFIG = dict(embed_dim=3, ddconfig=dict(double_z=True, z_channels=3, resolution=PATCH, in_channels=3,
                                                     out_ch=3, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1,
                                                     attn_resolutions=[]))

# cin256-v2's UNet layout at reduced width on 8x8x3 latents. Scale-shift norm (as lsun_churches256)
# because GroupNorm(32) on 64 channels holds two channels per group and would remove most of an
# additive time embedding.
PHOTO_CONFIG = dict(
    unet=dict(image_size=8, in_channels=3, out_channels=3, model_channels=64, attention_resolutions=[2],
              num_res_blocks=1, channel_mult=[1, 2], num_heads=1, use_spatial_transformer=True,
              transformer_depth=1, context_dim=128, use_scale_shift_norm=True),
    cond_stage=dict(n_classes=11, embed_dim=128),  # 10 photographs + the unconditional class 10
    first_stage=dict(kind="kl", **AUTOENCODER_CONFIG),
    schedule=dict(timesteps=1000, linear_start=0.0015, linear_end=0.0195),
    scale_factor=None,  # 1 / std of the training latents, set by train.py --net unet --data photos
)


def load_photos(path=PHOTOS_PATH):
    """(list of uint8 tensors [3, H, W], meta dict)."""
    with np.load(path) as d:
        meta = json.loads(str(d["meta"]))
        photos = [torch.from_numpy(np.ascontiguousarray(d[f"photo_{i}"].transpose(2, 0, 1)))
                  for i in range(len(meta["photos"]))]
    return photos, meta


def split_column(photo, heldout_fraction):
    """The first held-out column of a photograph [3, H, W]."""
    return photo.shape[2] - round(photo.shape[2] * heldout_fraction)


def sample_patches(photos, meta, n, gen, region="train", labels=None):
    """n patches [n, 3, 32, 32] in [-1, 1] and their classes, every random choice from `gen`.
    region 'train': crops left of the held-out columns; 'heldout': crops inside them (their largest
    side is the held-out width). labels: the classes to crop (default: uniform)."""
    if region not in ("train", "heldout"):
        raise ValueError(f"region must be 'train' or 'heldout', got {region!r}")
    if labels is None:
        labels = torch.randint(len(photos), (n,), generator=gen)
    out = torch.empty(n, 3, PATCH, PATCH)
    for i, c in enumerate(labels.tolist()):
        photo = photos[c]
        h, w = photo.shape[1:]
        split = split_column(photo, meta["heldout_fraction"])
        lo, hi = (0, split) if region == "train" else (split, w)
        largest = min(CROP_SIZES[1], hi - lo, h)
        size = int(torch.randint(CROP_SIZES[0], largest + 1, (1,), generator=gen))
        top = int(torch.randint(0, h - size + 1, (1,), generator=gen))
        left = lo + int(torch.randint(0, hi - lo - size + 1, (1,), generator=gen))
        crop = photo[:, top:top + size, left:left + size].float()[None] / 127.5 - 1.0
        if size != PATCH:
            crop = F.interpolate(crop, size=(PATCH, PATCH), mode="bilinear", antialias=True, align_corners=False)
        if torch.rand(1, generator=gen).item() < 0.5:
            crop = crop.flip(3)
        out[i] = crop[0].clamp(-1, 1)
    return out, labels
