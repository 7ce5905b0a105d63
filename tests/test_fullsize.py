"""bench/fullsize.py: the full-size check runs end to end (here on its tiny smoke config) and reports
every stage; the checkpoint it builds uses the official names."""
import json
import subprocess
import sys

import torch

from models.ldm import UNET_PREFIX, load_ldm
from tests.conftest import ROOT


def test_fullsize_smoke_runs_every_stage_and_projects(tmp_path):
    # an --inception that is not there: the stand-in network, whatever clean-fid's cache on this machine holds
    proc = subprocess.run([sys.executable, "bench/fullsize.py", "--config", "smoke", "--device", "cpu",
                           "--inception", str(tmp_path / "absent" / "inception-2015-12-05.pt"),
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0].lstrip("| ").split(" ")[0] for row in table[1:]] == \
        ["quantize", "distill,", "distill,", "sample", "evaluate"]
    report = json.loads((tmp_path / "smoke" / "fullsize.json").read_text())
    assert report["distill_batch4"]["how"].startswith("projected linearly from batch 1 and 2")
    assert report["distill_batch4"]["peak_gib"] > 0 and report["sampling_seconds_per_image_step"] > 0
    assert all(r["seconds"] > 0 and r["peak_gib"] > 0 for r in report["rows"])
    assert "| evaluate (stand-in network" in proc.stdout
    assert "16000 updates" in proc.stdout and "sampling 50000 images" in proc.stdout
    # the checkpoint it built is an official-layout file that the official loader reads
    sd = torch.load(tmp_path / "smoke" / "model.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith(UNET_PREFIX) for k in sd) and not any(k.startswith("unet.") for k in sd)
    model = load_ldm(tmp_path / "smoke" / "model.ckpt", str(tmp_path / "smoke" / "model.yaml"))
    assert torch.equal(model.unet.out[2].weight, sd[UNET_PREFIX + "out.2.weight"])
