"""Reading a torch file without running code from it.

A full unpickle (torch.load without weights_only) creates arbitrary objects, and unpickling can call any function
the file names: whoever hands a user a checkpoint could run code on the user's machine. Every file
this project reads goes through `load_torch_file`, which uses PyTorch's weights-only unpickler
(tensors, dicts, lists, strings, numbers). Our own checkpoints hold nothing else.

Official latent-diffusion `model.ckpt` files are PyTorch Lightning checkpoints: beside the
`state_dict` they name a few Lightning classes (the ModelCheckpoint callback is the key of their
`callbacks` entry). Those names, and only those, resolve to inert stand-ins below: a class with no
behaviour, never called with the file's data. The loaders read nothing but `state_dict` from such a
file. Any other global is refused before anything is created, naming what the file wanted.

`allow_pickle(True)` (the scripts' `--trust-checkpoint`) is the explicit opt-in for an old pickle
that holds other objects: a full unpickle, for files the user made or trusts.
"""
import pickle
from pathlib import Path

import torch


class _LightningStandIn:
    """Takes the place of a Lightning class a checkpoint names; has no behaviour."""


def _stand_in(qualified_name):
    module, name = qualified_name.rsplit(".", 1)
    return type(name, (_LightningStandIn,), {"__module__": module, "__qualname__": name}), qualified_name


# the Lightning names official latent-diffusion checkpoints are known to carry (the callback state)
LIGHTNING_NAMES = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)
LIGHTNING_STAND_INS = [_stand_in(n) for n in LIGHTNING_NAMES]

_ALLOW_PICKLE = False


class UnsafeCheckpointError(ValueError):
    """A file that asks to create objects a weights-only load does not allow."""


def allow_pickle(flag):
    """Opt in (the scripts' --trust-checkpoint) to full unpickling for the rest of the process."""
    global _ALLOW_PICKLE
    _ALLOW_PICKLE = bool(flag)


def load_torch_file(path):
    """The contents of a torch.save file, on the CPU, read with the weights-only unpickler (unless
    allow_pickle(True)). Raises FileNotFoundError, UnsafeCheckpointError (the file names a global
    outside the allowlist: nothing was created) or ValueError (not a torch file, or truncated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(LIGHTNING_STAND_INS):
            return torch.load(path, map_location="cpu", weights_only=not _ALLOW_PICKLE)
    except pickle.UnpicklingError as e:
        try:  # read the pickle's opcodes (nothing is executed) to name what it wanted
            wanted = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in LIGHTNING_NAMES]
        except Exception:
            wanted = []
        if not wanted:
            raise ValueError(f"{path} is not a readable torch checkpoint: {str(e).splitlines()[-1]}") from None
        raise UnsafeCheckpointError(
            f"{path} asks to create {', '.join(wanted)} when opened, which a weights-only load does not allow: "
            f"the file may be unsafe (opening it could run code). Nothing was loaded. If you made it yourself or "
            f"trust its source, pass --trust-checkpoint") from None
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable torch checkpoint: {e}") from None
