"""Checkpoint files: plain torch.save dicts with a `format` tag, a format `version` and the config
needed to rebuild the model, written atomically (a killed run never leaves a half-written file).
This file is the format layer: tags, versions, atomic writes and the version check. Building a model
from a file is models.checkpoint's (diffusion models) and models.classifier's (the feature networks).

Formats and versions:
  mpq-dm/fp-model          1  a full-precision DiffusionModel (config + state_dict)
  mpq-dm/digit-classifier  2  evaluate.py's in-domain feature network; `arch` names the network
                              ('digits' or 'photos', models.classifier.CLASSIFIERS). Version 1 (no
                              arch) is a digits one: it loads.
  mpq-dm/autoencoder       1  the photograph model's KL autoencoder (config + state_dict)
  mpq-dm/quantized         2  quantize.py / distill.py: the FP model (embedded, or path + sha256), the
                              quantized UNet's state_dict and the settings. Version 1 has the same
                              tensors and settings (and a `modes` table, unused): it loads.
  mpq-dm/packed            2  --pack: the weights bit-packed at their bit-widths (models.pack). Version
                              1 named the UNet's tensors 'unet.unet.*': it is refused with what to rerun.
"""
import hashlib
import json
import os
from pathlib import Path

import torch

from models.safe_load import load_torch_file

FP_FORMAT = "mpq-dm/fp-model"
CLASSIFIER_FORMAT = "mpq-dm/digit-classifier"
QUANT_FORMAT = "mpq-dm/quantized"
PACKED_FORMAT = "mpq-dm/packed"
AUTOENCODER_FORMAT = "mpq-dm/autoencoder"
VERSIONS = {FP_FORMAT: 1, CLASSIFIER_FORMAT: 2, QUANT_FORMAT: 2, PACKED_FORMAT: 2,
            AUTOENCODER_FORMAT: 1}  # what this code writes
OLDEST_READ = {FP_FORMAT: 1, CLASSIFIER_FORMAT: 1, QUANT_FORMAT: 1, PACKED_FORMAT: 2, AUTOENCODER_FORMAT: 1}

def save_atomic(obj, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_with_report(ckpt, path, report):
    """Writes a checkpoint and its JSON report (<path>.json) so that an interrupted run never leaves
    a new checkpoint beside an old report: the old report goes first, then each file is written
    atomically."""
    path = Path(path)
    json_path = path.with_suffix(".json")
    json_path.unlink(missing_ok=True)
    save_atomic(ckpt, path)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, json_path)


def load_file(path):
    """A checkpoint's contents, read without running code from it (models.safe_load)."""
    return load_torch_file(path)


def sha256_file(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_format(ckpt, path, fmt, rerun):
    """Raises ValueError unless ckpt is a `fmt` file of a version this code reads; `rerun` says what
    makes the file again."""
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    if found != fmt:
        raise ValueError(f"{path} is a {found or 'foreign'} checkpoint; expected {fmt}")
    version = ckpt.get("version", 0)
    if version > VERSIONS[fmt]:
        raise ValueError(f"{path} has {fmt} format version {version}; this code reads up to {VERSIONS[fmt]}: "
                         f"update this code")
    if version < OLDEST_READ[fmt]:
        raise ValueError(f"{path} has {fmt} format version {version}, which this code no longer reads "
                         f"(it reads {OLDEST_READ[fmt]}..{VERSIONS[fmt]}); {rerun} to make it again")
