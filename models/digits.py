"""The embedded default's data and model config: 8x8 handwritten digits (UCI 'Optical Recognition of
Handwritten Digits', the copy that scikit-learn ships, CC BY 4.0), stored in data/digits.npz as
uint8 images scaled from 0..16 to 0..255, with their labels."""
from pathlib import Path

import numpy as np
import torch

DATA_PATH = Path(__file__).resolve().parents[1] / "data" / "digits.npz"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "digits_unet.pt"
DEFAULT_CLASSIFIER = Path(__file__).resolve().parents[1] / "checkpoints" / "digits_classifier.pt"

# A pixel-space class-conditional LDM UNet on the same code paths as cin256-v2 (ResBlocks, spatial
# transformers with cross-attention to a class embedding, classifier-free guidance through an extra
# 'unconditional' class). Scale-shift norm because at 32 channels GroupNorm(32) holds one channel
# per group and would otherwise remove the additive time embedding exactly.
DIGITS_CONFIG = dict(
    unet=dict(image_size=8, in_channels=1, out_channels=1, model_channels=32, attention_resolutions=[1, 2],
              num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
              transformer_depth=1, context_dim=32, use_scale_shift_norm=True),
    cond_stage=dict(n_classes=11, embed_dim=32),  # 10 digits + the unconditional class 10
    first_stage=None,
    schedule=dict(timesteps=1000, linear_start=0.0015, linear_end=0.0195),
    scale_factor=1.0,
)


def load_digits():
    """(images uint8 [N, 1, 8, 8] in 0..255, labels int64 [N])."""
    d = np.load(DATA_PATH)
    return torch.from_numpy(d["images"][:, None].copy()), torch.from_numpy(d["labels"].astype(np.int64))


def to_model_range(images_uint8):
    return images_uint8.float() / 127.5 - 1.0

