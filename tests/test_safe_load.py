"""Opening a checkpoint never runs code from it: every file is read with the weights-only unpickler;
official Lightning checkpoints load through inert stand-ins for the Lightning names they carry."""
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.conftest import run_script
from models.checkpoint import load_fp_model, load_quant_model
from models.ldm import load_ldm
from models.safe_load import LIGHTNING_NAMES, UnsafeCheckpointError, load_torch_file

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "ldm"
MINI = SHARED / "mini"
need_mini = pytest.mark.skipif(not MINI.is_dir(), reason=f"official mini cases not found at {MINI}")


class CreatesFile:
    """Unpickling this object creates the file at `path` (as a hostile checkpoint would run code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def hostile(tmp_path, contents):
    """A torch.save file holding `contents` and, inside it, an object whose unpickling creates
    tmp_path / 'pwned'; returns (file, the marker path)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pt"
    torch.save(contents(CreatesFile(marker)), path)
    assert not marker.exists()
    return path, marker


def assert_refused(proc, marker):
    assert proc.returncode != 0
    assert "may be unsafe" in proc.stderr and "--trust-checkpoint" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists(), "the checkpoint's code ran"


FP_LOOKING = lambda evil: {"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(1), "x": evil}}
QUANT_LOOKING = lambda evil: {"format": "mpq-dm/quantized", "version": 2, "settings": evil}


@pytest.mark.parametrize("contents", [FP_LOOKING, QUANT_LOOKING], ids=["fp-looking", "quantized-looking"])
def test_sample_refuses_a_hostile_checkpoint(contents, tmp_path):
    path, marker = hostile(tmp_path, contents)
    assert_refused(run_script("sample.py", "--ckpt", path, "--out", tmp_path / "s", check=False), marker)
    assert not any((tmp_path / "s").rglob("*"))  # the output folder is made before loading, and stays empty


def test_quantize_refuses_a_hostile_checkpoint(tmp_path):
    path, marker = hostile(tmp_path, FP_LOOKING)
    assert_refused(run_script("quantize.py", "--ckpt", path, "--out", tmp_path / "q.pt", check=False), marker)
    assert not (tmp_path / "q.pt").exists()


def test_distill_refuses_a_hostile_checkpoint_and_resume_state(quant_ckpts, tmp_path):
    path, marker = hostile(tmp_path, QUANT_LOOKING)
    assert_refused(run_script("distill.py", "--qckpt", path, "--out", tmp_path / "d.pt", check=False), marker)
    out = tmp_path / "r.pt"
    state, marker = hostile(tmp_path, lambda evil: {"fingerprint": {}, "iter": 1, "trainable": evil})
    state.rename(tmp_path / "r.pt.state.pt")
    proc = run_script("distill.py", "--qckpt", quant_ckpts["omq"], "--out", out, "--resume", "--iters", 1, check=False)
    assert_refused(proc, marker)
    assert not out.exists()


def test_evaluate_refuses_a_hostile_classifier(tmp_path):
    path, marker = hostile(tmp_path, lambda evil: {"format": "mpq-dm/digit-classifier", "version": 1, "state_dict": evil})
    import numpy as np
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    proc = run_script("evaluate.py", tmp_path / "samples.npz", "--classifier", path, check=False)
    assert_refused(proc, marker)


def test_trust_checkpoint_is_the_explicit_opt_in(tmp_path):
    path, marker = hostile(tmp_path, FP_LOOKING)
    proc = run_script("sample.py", "--ckpt", path, "--out", tmp_path / "s", "--trust-checkpoint", check=False)
    assert marker.exists()  # full unpickling, as asked; the file is then refused for what it is
    assert proc.returncode != 0 and "UNet matches none of" in proc.stderr


def test_our_own_checkpoints_need_no_pickle(fp_ckpt, quant_ckpts):
    """Every format this project writes opens weights-only (quantized with its report, packed, the
    shipped FP model and classifier)."""
    root = Path(__file__).resolve().parents[1]
    for path in [fp_ckpt, *quant_ckpts.values(), quant_ckpts["all"].with_suffix(".packed.pt"),
                 root / "checkpoints" / "digits_unet.pt", root / "checkpoints" / "digits_classifier.pt"]:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], path
        torch.load(path, weights_only=True)
    load_quant_model(quant_ckpts["omq"])


def lightning_module(name):
    """Registers an importable stand-in class under a Lightning name (Lightning itself is not
    installed), as a Lightning run would have had at save time; returns it."""
    module_name, cls_name = name.rsplit(".", 1)
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    cls = type(cls_name, (), {"__module__": module_name, "__qualname__": cls_name})
    setattr(sys.modules[module_name], cls_name, cls)
    return cls


def lightning_checkpoint(tmp_path, sd, callback_name):
    cls = lightning_module(callback_name)
    path = tmp_path / "model.ckpt"
    try:
        torch.save({"epoch": 7, "global_step": 2_000_000, "pytorch-lightning_version": "1.4.2", "state_dict": sd,
                    "callbacks": {cls: {"monitor": None, "best_model_score": None, "dirpath": "logs/checkpoints"}},
                    "optimizer_states": [], "lr_schedulers": []}, path)
    finally:
        for m in [m for m in sys.modules if m.split(".")[0] == "pytorch_lightning"]:
            del sys.modules[m]
    return path


@need_mini
def test_lightning_checkpoint_loads_weights_only(tmp_path):
    from tests.test_ldm import mini_checkpoint

    bare, yaml_path, _, _ = mini_checkpoint("cin", tmp_path)
    sd = torch.load(bare, weights_only=True)["state_dict"]
    path = lightning_checkpoint(tmp_path, sd, LIGHTNING_NAMES[0])
    with pytest.raises(Exception, match="ModelCheckpoint"):  # plain weights-only torch.load refuses it
        torch.load(path, weights_only=True)
    assert "pytorch_lightning" not in sys.modules
    ckpt = load_torch_file(path)
    assert ckpt["global_step"] == 2_000_000
    want = load_ldm(bare, str(yaml_path)).unet.state_dict()
    for model in (load_ldm(path, str(yaml_path)), load_fp_model(path, str(yaml_path))):
        got = model.unet.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@need_mini
def test_other_lightning_globals_are_refused(tmp_path):
    from tests.test_ldm import mini_checkpoint

    bare, yaml_path, _, _ = mini_checkpoint("cin", tmp_path)
    sd = torch.load(bare, weights_only=True)["state_dict"]
    path = lightning_checkpoint(tmp_path, sd, "pytorch_lightning.trainer.trainer.Trainer")
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_lightning\.trainer\.trainer\.Trainer.*may be unsafe"):
        load_ldm(path, str(yaml_path))
    proc = run_script("sample.py", "--ckpt", path, "--config", yaml_path, "--out", tmp_path / "s", check=False)
    assert proc.returncode != 0 and "Trainer" in proc.stderr and "Traceback" not in proc.stderr
