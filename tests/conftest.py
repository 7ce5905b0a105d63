import contextlib
import io
import os
import runpy
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from models.checkpoint import fp_checkpoint
from models.files import save_atomic
from models.digits import DIGITS_CONFIG
from models.ldm import DiffusionModel
from models import safe_load

ROOT = Path(__file__).resolve().parents[1]


def run_script(script, *args, check=True, isolated=False):
    """Runs one of the scripts as a user would (`python script args...` in the repository root) and returns
    a CompletedProcess: its exit code, stdout and stderr. By default it runs in this process, as __main__
    (what `python script` runs), which spares each run the start of a new interpreter and torch (about
    1.5 s, most of the suite's time otherwise); the scripts keep no state between runs that outlives
    main() but reused scratch memory and their own seeding. isolated=True starts a new process: for a
    run whose environment, threads or imports must be its own."""
    argv = [str(ROOT / script), *map(str, args)]
    if isolated:
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    else:
        proc = _run_in_process(argv)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _run_in_process(argv):
    """runpy's `python argv[0] argv[1:]` with the exit code, output and traceback a process would give;
    the working directory, SIGINT handler, torch's thread count, sys.argv / sys.path and the scripts' one
    process-wide switch (--trust-checkpoint: models.safe_load.allow_pickle) are restored."""
    out, err = io.StringIO(), io.StringIO()
    saved = (os.getcwd(), list(sys.argv), list(sys.path), signal.getsignal(signal.SIGINT), torch.get_num_threads(),
             safe_load._ALLOW_PICKLE)
    code = 0
    try:
        os.chdir(ROOT)
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).parent))  # as `python script` puts the script's folder first
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(argv[0], run_name="__main__")
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:  # SystemExit("message"): Python prints it and exits with 1
                    print(e.code, file=sys.stderr)
                    code = 1
            except KeyboardInterrupt:
                traceback.print_exc()
                code = 130
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        cwd, sys.argv, sys.path[:], handler, threads, safe_load._ALLOW_PICKLE = saved
        os.chdir(cwd)
        signal.signal(signal.SIGINT, handler)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def kill_when(proc, ready, timeout=300):
    """SIGKILLs proc as soon as ready() holds (polled every 5 ms: a file the test needs was written),
    or when it ends or the timeout passes; the caller asserts what it needs of the files left. The
    runs killed this way have several iterations or shards left after ready() holds, so the kill
    lands before they finish."""
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def random_digits_model(seed=0):
    """The embedded default's architecture with every weight random (no zero-initialised output
    layers), so that quantization has something to get wrong."""
    torch.manual_seed(seed)
    model = DiffusionModel(DIGITS_CONFIG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            elif name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def fp_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp") / "fp.pt"
    save_atomic(fp_checkpoint(random_digits_model()), path)
    return path


# small settings for the scripts: a few seconds each
QUICK = ["--steps", 4, "--calib-samples", 8, "--calib-keep", 4, "--eval-samples", 4, "--batch-size", 8]


@pytest.fixture(scope="session")
def quant_ckpts(fp_ckpt, tmp_path_factory):
    """quantize.py run end to end on the random model at W2A4: OMQ, uniform, and OMQ with every
    layer quantized (--quantize-all, also written packed)."""
    out = tmp_path_factory.mktemp("quant")
    paths = {}
    for key, flags in {"omq": [], "uniform": ["--method", "uniform"], "all": ["--quantize-all", "--pack"]}.items():
        paths[key] = out / f"{key}.pt"
        run_script("quantize.py", "--ckpt", fp_ckpt, "--out", paths[key], *flags, *QUICK)
    return paths
