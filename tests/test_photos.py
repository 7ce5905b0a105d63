"""The photograph model: its data (crops that respect the held-out columns), its first stage (the
official encoder/decoder names, a reconstruction bound), the shipped checkpoints (they load, and the
diffusion model's decoder is the autoencoder's), training from a fresh clone, and every script on it."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.autoencoder import AutoencoderKL
from models.checkpoint import load_autoencoder, load_fp_model
from models.classifier import load_classifier
from models.diffusion import to_uint8
from models.paired import psnr
from models.photos import (PHOTO_AUTOENCODER, PHOTO_CHECKPOINT, PHOTO_CLASSIFIER, PHOTO_CONFIG, load_photos,
                           sample_patches, split_column)
from models.qmodel import layer_mode
from tests.conftest import QUICK, run_script

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "ldm"
HELD_OUT_SEED = 1234  # train.py draws its held-out patches from this seed

# Quality floors of the shipped files on the held-out columns (train.py prints the measured figures;
# docs/photos.md has them). A broken load, a key mapping that drops a layer or a data change
# falls far below them; float rounding across CPUs moves them by far less than their margins.
AUTOENCODER_PSNR_FLOOR = 28.0  # dB; the shipped file measured 30.24 on 1,000 held-out patches
CLASSIFIER_ACCURACY_FLOOR = 0.7  # the shipped file measured 0.812 on 1,000 held-out patches


def synthetic_photos():
    """Two 'photographs' whose training columns are -1 and whose held-out columns are +1."""
    photos = []
    for w in (160, 200):
        p = torch.zeros(3, 64, w, dtype=torch.uint8)
        p[:, :, split_column(p, 0.25):] = 255
        photos.append(p)
    return photos, {"heldout_fraction": 0.25}


def test_training_crops_never_touch_the_held_out_columns_and_held_out_crops_lie_inside_them():
    photos, meta = synthetic_photos()
    x, y = sample_patches(photos, meta, 400, torch.Generator().manual_seed(0))
    assert x.shape == (400, 3, 32, 32) and set(y.tolist()) == {0, 1}
    assert x.max().item() <= -1 + 1e-6  # one held-out column in a crop would lift its edge pixels
    h, _ = sample_patches(photos, meta, 400, torch.Generator().manual_seed(0), region="heldout")
    assert h.min().item() >= 1 - 1e-6
    again, _ = sample_patches(photos, meta, 400, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)  # every random choice comes from the generator


def test_shipped_photographs_carry_their_sources_and_licences():
    photos, meta = load_photos()
    assert len(photos) == 10 and meta["heldout_fraction"] == 0.25
    for p, m in zip(photos, meta["photos"]):
        assert p.shape[0] == 3 and min(p.shape[1:]) == meta["short_side"]
        assert m["licence"] and m["package"] in ("scikit-image", "scikit-learn") and m["file"]
        # the held-out columns are wide enough for the smallest crop
        assert p.shape[2] - split_column(p, meta["heldout_fraction"]) >= 32


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"reference material not found at {SHARED}")
def test_autoencoder_has_the_official_names_and_shapes():
    """AutoencoderKL built with lsun_churches256's first-stage config has exactly the official
    checkpoint's first_stage_model.* names and shapes (encoder included)."""
    from models.ldm import LDM_CONFIGS

    fs = LDM_CONFIGS["lsun_churches256"]["first_stage"]
    with torch.device("meta"):
        ae = AutoencoderKL(fs["embed_dim"], fs["ddconfig"])
    mine = {f"first_stage_model.{k}": list(v.shape) for k, v in ae.state_dict().items()}
    official = {}
    for line in (SHARED / "lsun_churches256.keys.tsv").read_text().splitlines():
        key, shape = line.split("\t")[:2]
        if key.startswith("first_stage_model.") and not key.startswith("first_stage_model.loss."):
            official[key] = json.loads(shape)
    assert mine == official


def test_shipped_autoencoder_reconstructs_held_out_patches():
    ae, config = load_autoencoder(PHOTO_AUTOENCODER)
    photos, meta = load_photos()
    x, _ = sample_patches(photos, meta, 300, torch.Generator().manual_seed(HELD_OUT_SEED), region="heldout")
    with torch.no_grad():
        mean, std = ae.encode(x)
        recon = ae.decode(mean)
    assert mean.shape == (300, 3, 8, 8)  # f = 4
    value = psnr(to_uint8(recon).numpy(), to_uint8(x).numpy()).mean()
    assert value >= AUTOENCODER_PSNR_FLOOR, value


def test_shipped_photo_model_loads_with_the_autoencoders_decoder_and_is_wide_enough():
    model = load_fp_model(PHOTO_CHECKPOINT)
    ae, _ = load_autoencoder(PHOTO_AUTOENCODER)
    assert model.config["first_stage"]["kind"] == "kl" and model.latent_shape == (3, 8, 8)
    assert model.config["unet"] == PHOTO_CONFIG["unet"]
    mine = model.first_stage_model.state_dict()
    for k, v in ae.decoder_state_dict().items():
        assert torch.equal(mine[k], v), k
    assert 0.1 < model.scale_factor < 10  # 1 / std of the latents, set from the data
    # every layer quantize.py puts at low bits is at least 64 channels wide
    for name, m in model.unet.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and layer_mode(name, m) == "quant":
            assert min(m.weight.shape[:2]) >= 64, (name, tuple(m.weight.shape))
    # a sample decodes to a 32x32 RGB patch
    z = torch.randn(2, *model.latent_shape)
    assert model.decode(z).shape == (2, 3, 32, 32)


def test_shipped_photo_files_round_trip(tmp_path):
    """Loaded and written again with this code's own writers, each shipped file loads to the same
    tensors (nothing the writer needs is missing from what the loader gives)."""
    from models.checkpoint import autoencoder_checkpoint, fp_checkpoint
    from models.files import save_atomic
    from models.classifier import classifier_checkpoint

    model = load_fp_model(PHOTO_CHECKPOINT)
    save_atomic(fp_checkpoint(model), tmp_path / "fp.pt")
    again = load_fp_model(tmp_path / "fp.pt")
    assert again.config == model.config and again.scale_factor == model.scale_factor
    ae, config = load_autoencoder(PHOTO_AUTOENCODER)
    save_atomic(autoencoder_checkpoint(ae, config), tmp_path / "ae.pt")
    clf = load_classifier(PHOTO_CLASSIFIER)
    save_atomic(classifier_checkpoint(clf, "photos"), tmp_path / "clf.pt")
    for a, b in [(model, again), (ae, load_autoencoder(tmp_path / "ae.pt")[0]),
                 (clf, load_classifier(tmp_path / "clf.pt"))]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_evaluate_refuses_the_other_models_classifier(tmp_path):
    from models.digits import DEFAULT_CLASSIFIER

    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 32, 32, 3), dtype=np.uint8))
    proc = run_script("evaluate.py", tmp_path / "s.npz", "--classifier", DEFAULT_CLASSIFIER, check=False)
    assert proc.returncode != 0 and "is the digits network, not the photos one" in proc.stderr


def test_shipped_photo_classifier_recognises_held_out_patches():
    clf, arch = load_classifier(PHOTO_CLASSIFIER, with_arch=True)
    assert arch == "photos"
    photos, meta = load_photos()
    x, y = sample_patches(photos, meta, 500, torch.Generator().manual_seed(HELD_OUT_SEED), region="heldout")
    with torch.no_grad():
        acc = (clf(x).argmax(1) == y).float().mean().item()
    assert acc >= CLASSIFIER_ACCURACY_FLOOR, acc


def test_train_photos_autoencoder_then_unet_from_scratch_and_resume(tmp_path):
    """train.py's photo path end to end at a few steps: the autoencoder, then a UNet on its latents
    whose decoder is that autoencoder's; a resumed run with other settings is refused."""
    ae_path, unet_path = tmp_path / "ae.pt", tmp_path / "unet.pt"
    run_script("train.py", "--data", "photos", "--net", "autoencoder", "--steps", 2, "--batch-size", 4,
               "--eval-samples", 8, "--out", ae_path, "--run-dir", tmp_path / "ae_run")
    ae, _ = load_autoencoder(ae_path)
    run_script("train.py", "--data", "photos", "--net", "unet", "--autoencoder", ae_path, "--steps", 2, "--batch-size", 4,
               "--bank", 16, "--eval-samples", 4, "--out", unet_path, "--run-dir", tmp_path / "unet_run")
    model = load_fp_model(unet_path)
    for k, v in ae.decoder_state_dict().items():
        assert torch.equal(model.first_stage_model.state_dict()[k], v), k
    bad = run_script("train.py", "--data", "photos", "--net", "unet", "--autoencoder", ae_path, "--steps", 3,
                     "--batch-size", 4, "--bank", 16, "--out", tmp_path / "u2.pt", "--run-dir", tmp_path / "unet_run",
                     "--resume", check=False)
    assert bad.returncode == 2 and "--steps 2 (now 3)" in bad.stderr
    bad = run_script("train.py", "--net", "autoencoder", "--out", tmp_path / "x.pt", check=False)
    assert bad.returncode == 2 and "--data photos" in bad.stderr


def test_every_script_runs_on_the_photo_model(tmp_path):
    """quantize -> distill (--pack) -> sample (float, int8 kernels, packed) -> evaluate (in-domain photo
    features, paired against the FP samples), at a few steps."""
    q, d = tmp_path / "q.pt", tmp_path / "d.pt"
    run_script("quantize.py", "--ckpt", PHOTO_CHECKPOINT, "--out", q, *QUICK)
    run_script("distill.py", "--qckpt", q, "--out", d, "--iters", 1, "--batch-size", 2, "--eval-samples", 2,
               "--lora-rank", 2, "--pack")
    sets = {}
    for name, ckpt, flags in [("fp", PHOTO_CHECKPOINT, ["--steps", 4]), ("float", d, []),
                              ("int8", d, ["--kernels", "int8"]), ("packed", d.with_suffix(".packed.pt"), [])]:
        run_script("sample.py", "--ckpt", ckpt, "--num-images", 6, "--out", tmp_path / name, *flags)
        sets[name] = np.load(tmp_path / name / "samples.npz")["arr_0"]
        assert sets[name].shape == (6, 32, 32, 3) and sets[name].std() > 0
    assert np.array_equal(sets["float"], sets["packed"])  # the packed file holds the same weights
    out = run_script("evaluate.py", tmp_path / "float" / "samples.npz", "--against",
                     tmp_path / "fp" / "samples.npz").stdout
    assert "in-domain FID_photos" in out and "paired with" in out
    r = json.loads((tmp_path / "float" / "samples.eval.json").read_text())
    assert r["feature_network"] == "photos" and r["n_reference"] == 2000 and "photos" in r["reference"]
    assert np.isfinite(r["fid"]) and np.isfinite(r["paired"]["psnr"]["mean"])
