"""The quantization core (models/core/) is the unit to copy: copied alone under another name, with
nothing of this repository on the path, it quantizes a plain torch.nn model with OMQ and sends TRD's
relation-loss gradient into the quantized layers."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import copy, json, sys
sys.path.insert(0, sys.argv[1])
import torch, torch.nn as nn
import mpqcore as core
assert not any(m == "models" or m.startswith("models.") for m in sys.modules), "the core imported the repository"

torch.manual_seed(0)
fp = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
                   nn.Conv2d(64, 3, 3, padding=1)).eval()
outliers = [5, 17, 40, 41, 50, 63]
with torch.no_grad():  # a few outlier-heavy output channels: one large weight each
    for c in outliers:
        fp[2].weight[c, c % 64, 1, 1] = 12 * fp[2].weight[c].abs().max()
x = torch.randn(64, 3, 8, 8)

# record each conv's full-precision inputs (one "step": a plain model has no sampling steps)
inputs, hooks = {}, []
for name, m in fp.named_children():
    if isinstance(m, nn.Conv2d):
        hooks.append(m.register_forward_hook(lambda m, a, o, name=name: inputs.__setitem__(name, a[0].detach())))
with torch.no_grad():
    feat_fp = fp[:4](x)
    y_fp = fp(x)
for h in hooks:
    h.remove()

def quantized(method, calibrate=True):
    q = copy.deepcopy(fp)
    reports = {}
    for name in inputs:
        layer = core.QuantLayer(getattr(q, name), "quant", wbits=2, abits=4, n_steps=1)
        setattr(q, name, layer)
        if calibrate:
            reports[name] = core.calibrate_layer(layer, {0: inputs[name]}, method=method, smooth_alphas=(0.0, 0.5))
    core.refresh_weights(q)
    return q, reports

def rel_err(q):
    with torch.no_grad():
        return ((q(x) - y_fp).pow(2).mean() / y_fp.pow(2).mean()).item()

omq, reports = quantized("omq")
uniform, _ = quantized("uniform")
raw, _ = quantized("omq", calibrate=False)
layers = core.quant_layers(omq)
kurt = core.kurtosis(layers["2"].smoothed_weight().detach())
bits = layers["2"].bits
out = dict(
    mean_bits={n: l.bits.float().mean().item() for n, l in layers.items()},
    mse=[(r["mse_chosen"], r["mse_uniform"]) for r in reports.values()],
    split=reports["2"]["split"],
    outliers_top=sorted(torch.argsort(kurt, descending=True)[:len(outliers)].tolist()) == outliers,
    high_kurt_min=kurt[bits == 3].min().item() if (bits == 3).any() else None,
    rest_kurt_max=kurt[bits < 3].max().item(),
    err=dict(omq=rel_err(omq), uniform=rel_err(uniform), raw=rel_err(raw)))

# TRD: the relation loss between FP and quantized features reaches the quantizer scales
for l in layers.values():
    l.w_scale.requires_grad_(True)
core.refresh_weights(omq)  # with autograd: the fake-quantized weights carry the graph
loss = core.relation_kl(feat_fp, omq[:4](x))
loss.backward()
out["grad"] = [l.w_scale.grad.abs().sum().item() if l.w_scale.grad is not None else 0.0 for n, l in layers.items()
               if n in ("0", "2")]
out["loss"] = loss.item()
print(json.dumps(out))
"""


def test_core_copies_alone_and_quantizes_a_plain_model(tmp_path):
    shutil.copytree(ROOT / "models" / "core", tmp_path / "mpqcore", ignore=shutil.ignore_patterns("__pycache__"))
    # -I: no PYTHONPATH, no current directory on the path: only the copied folder and site-packages
    r = subprocess.run([sys.executable, "-I", "-c", SCRIPT, str(tmp_path)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # OMQ keeps every layer's mean at exactly n bits
    assert all(b == 2.0 for b in out["mean_bits"].values()), out["mean_bits"]
    # the split search includes the uniform split, so the chosen error is never above it
    assert all(chosen <= uniform for chosen, uniform in out["mse"]), out["mse"]
    # the planted outlier channels rank highest by kurtosis; the channels given n+1 bits are the top ones
    assert out["outliers_top"]
    assert out["split"] > 0, "OMQ kept the outlier-heavy layer uniform"
    assert out["high_kurt_min"] >= out["rest_kurt_max"]
    # calibration matters: the calibrated model is far closer to FP than one with the initial ranges
    assert out["err"]["omq"] < 0.5 * out["err"]["raw"], out["err"]
    # the relation loss is positive and its gradient reaches the quantizer scales of the layers before the features
    assert out["loss"] > 0
    assert all(g > 0 for g in out["grad"]), out["grad"]


SCRIPTS = ["quantize.py", "distill.py", "sample.py", "evaluate.py", "train.py", "data/make_photos.py",
           *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*.py")
                   if p.name not in ("__init__.py", "runs.py", "int8_cases.py"))]

CALL_MAIN = r"""
import contextlib, importlib.util, io, sys
sys.path.insert(0, sys.argv[1])
for path in sys.argv[2:]:
    spec = importlib.util.spec_from_file_location("script_under_test", path)
    module = importlib.util.module_from_spec(spec)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        spec.loader.exec_module(module)  # importing runs nothing
        assert out.getvalue() == "", f"{path} printed on import: {out.getvalue()[:200]}"
        try:
            module.main(["--help"]) if path != "bench/int8_layer_error.py" else None
        except SystemExit as e:
            assert e.code == 0, (path, e.code)
    assert path == "bench/int8_layer_error.py" or "usage:" in out.getvalue(), path
print("ok")
"""


def test_every_script_is_a_main_that_a_host_project_can_call():
    """Importing a script runs nothing; its main(argv) takes the command line as a list."""
    r = subprocess.run([sys.executable, "-c", CALL_MAIN, str(ROOT), *SCRIPTS], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
