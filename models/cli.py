"""Command-line checks shared by the scripts, so that bad input never costs work or data: every
argument is checked before any work starts, with a one-line error that says what to do; outputs
are never written over unless asked (--force) and never over an input; Ctrl-C ends with one line
and exit code 130; a NaN or Inf stops a run before anything is written."""
import argparse
import math
import os
import signal
import sys
from pathlib import Path

import torch


# ---- argparse types: a bad value is an argparse error (one line, exit code 2), never a traceback
def finite_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def positive_float(text):
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return v


def nonneg_float(text):
    v = finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return v


def unit_float(text):
    """A number in [0, 1)."""
    v = finite_float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


def positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return v


def auto_or(kind):
    """'auto', or a value of the given type."""
    def parse(text):
        return "auto" if text == "auto" else kind(text)
    return parse


def int_list(text):
    """Comma-separated whole numbers, e.g. '3,5,7'."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None


# ---- devices and paths
def plain_args(args):
    """The parsed arguments as plain values (paths as strings), so that a checkpoint recording
    them opens with the weights-only unpickler and a report serialises to JSON."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def add_trust_flag(parser):
    """--trust-checkpoint: the explicit opt-in to open old pickles that hold other objects than
    tensors and plain values (models.safe_load); off by default, named in the refusal message."""
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="open checkpoints with full unpickling, which can run code from the file: only for "
                             "files you made or trust (default: weights only)")


def check_device(parser, name):
    """A torch.device that exists here, or a parser error saying what does."""
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name!r} is not a device; use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        parser.error(f"--device {name}: this code runs on cpu or cuda")
    return device


def init_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): joins the process group (NCCL on GPUs, gloo on the CPU), each
    rank on its own GPU from LOCAL_RANK. Returns (device, rank, world size); (device, 0, 1) in a plain
    run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return device, 0, 1
    import torch.distributed as dist

    if device.type == "cuda":  # each rank its own GPU, before NCCL binds to the current one
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), world


def check_folder(parser, folder, flag="--out"):
    """Creates the folder (and its parents) now, so that a bad path fails before the work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"{flag}: cannot create the folder {folder} ({e.strerror or e})")
    if not os.access(folder, os.W_OK):
        parser.error(f"{flag}: the folder {folder} is not writable")


def check_output(parser, path, inputs=(), force=False, flag="--out"):
    """An output file that is not an input, does not exist unless --force, and can be written."""
    path = Path(path)
    for other in inputs:
        if other is not None and Path(other).resolve() == path.resolve():
            parser.error(f"{flag} {path} is also an input of this run; choose another output path")
    if path.is_dir():
        parser.error(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not force:
        parser.error(f"{flag} {path} exists; pass --force to replace it, or choose another {flag}")
    check_folder(parser, path.parent, flag)
    return path


def check_steps(parser, steps, train_timesteps=1000, flag="--steps"):
    """A DDIM step count the official schedule can run."""
    from models.diffusion import ddim_timesteps

    try:
        ddim_timesteps(steps, train_timesteps)
    except ValueError as e:
        parser.error(f"{flag}: {e}")


def load_resume_state(parser, state_path, fingerprint, labels=None, missing=None):
    """The training state at state_path, if it was made with the same settings (fingerprint: every
    setting that shapes the run); otherwise a parser error naming each setting that differs.
    labels: how to name a key that is not an option (e.g. an input file's hash); missing: the value
    of a key that states written before it existed stand for."""
    from models.files import load_file

    try:
        state = load_file(state_path)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--resume: {e}")
    old = {**(missing or {}), **((state.get("fingerprint") or {}) if isinstance(state, dict) else {})}
    if differ := [k for k in fingerprint if old.get(k) != fingerprint[k]]:
        labels = labels or {}
        what = ", ".join(labels.get(k) or f"--{k.replace('_', '-')} {old.get(k)} (now {fingerprint[k]})" for k in differ)
        parser.error(f"--resume: {state_path} was made with other settings: {what}. Resume with the same "
                     f"settings, or start over without --resume")
    return state


# ---- interrupts and numbers
def exit_on_interrupt(what="the run"):
    """Ctrl-C: one line and exit code 130 instead of a traceback. Files are written atomically, so
    whatever was there before is intact."""
    def handler(signum, frame):
        print(f"\ninterrupted: {what} stopped; no partial output was written", file=sys.stderr)
        raise SystemExit(130)
    signal.signal(signal.SIGINT, handler)


def check_finite(what, *tensors, hint="check the checkpoint and the settings"):
    """Raises SystemExit naming `what` if any tensor holds a NaN or Inf."""
    for t in tensors:
        if t is not None and not torch.isfinite(t).all():
            raise SystemExit(f"error: {what} is NaN or Inf; stopped, nothing was written: {hint}")
