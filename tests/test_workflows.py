"""Whole workflows: the unguided one of the LSUN models (no classes, no guidance) end to end, and a
short distillation of the embedded default that must lower the held-out error."""
import json

import numpy as np
import torch

from models.checkpoint import fp_checkpoint
from models.files import save_atomic
from models.digits import DEFAULT_CHECKPOINT
from models.ldm import DiffusionModel
from tests.conftest import QUICK, run_script

# the LSUN models' shape of UNet: unconditional, attention blocks (no transformer, no context)
UNCONDITIONAL = dict(
    unet=dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2],
              num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16),
    cond_stage=None, first_stage=None, schedule=dict(timesteps=1000, linear_start=0.0015, linear_end=0.0195),
    scale_factor=1.0,
)


def test_unguided_workflow_quantize_distill_sample(tmp_path):
    torch.manual_seed(0)
    model = DiffusionModel(UNCONDITIONAL).eval()
    with torch.no_grad():  # no zero-initialised output layers: every layer takes part
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    save_atomic(fp_checkpoint(model), tmp_path / "fp.pt")
    # each script in a process of its own, as a user runs them (the rest of the suite runs them in the test
    # process): what a fresh interpreter imports and starts with is enough
    run_script("quantize.py", "--ckpt", tmp_path / "fp.pt", "--out", tmp_path / "q.pt", *QUICK, isolated=True)
    out = run_script("distill.py", "--qckpt", tmp_path / "q.pt", "--out", tmp_path / "d.pt", "--iters", 2,
                     "--batch-size", 2, "--eval-samples", 2, "--lora-rank", 2, isolated=True).stdout
    report = json.loads((tmp_path / "d.json").read_text())
    # no guidance: the MSE covers the one UNet output, so --lam auto has no factor 2 (100 x feature HW / eps CHW)
    assert report["distill"]["lam"] == 100.0 * 8 * 8 / (3 * 8 * 8)
    assert "eps MSE vs FP" in out
    run_script("sample.py", "--ckpt", tmp_path / "d.pt", "--num-images", 5, "--out", tmp_path / "s", isolated=True)
    samples = np.load(tmp_path / "s" / "samples.npz")
    assert samples["arr_0"].shape == (5, 8, 8, 3) and (samples["labels"] == -1).all()
    assert samples["arr_0"].std() > 0
    meta = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert meta["model"] == "quantized"


def test_short_distillation_lowers_the_held_out_error(tmp_path):
    """The embedded default at W2A4, 60 updates of MSE + TRD at the rate its search chose: the held-out
    eps MSE (trajectories no update saw) must end at most 0.8 x where quantization left it, and the
    MSE and relation losses must fall. A sign error in the update, or a loss that does not reach the
    quantized model, climbs or stays instead."""
    run_script("quantize.py", "--ckpt", DEFAULT_CHECKPOINT, "--out", tmp_path / "q.pt", *QUICK)
    run_script("distill.py", "--qckpt", tmp_path / "q.pt", "--out", tmp_path / "d.pt", "--iters", 15, "--batch-size", 4,
               "--eval-samples", 8, "--lr-mult", 64)
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["eps_mse_after"] <= 0.8 * report["eps_mse_before"], report
    h = report["history"]
    first, last = h[:3], h[-3:]
    for loss in ("mse", "trd"):
        assert sum(r[loss] for r in last) < sum(r[loss] for r in first), [r[loss] for r in h]
