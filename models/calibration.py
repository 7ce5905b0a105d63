"""Calibration data for quantize.py: the UNet inputs (x_t, t, context) that the full-precision model
sees along its own DDIM trajectories, and, from them, every layer's inputs at every step, recorded
by forward hooks (no model code is edited) a group of layers at a time within a memory budget."""
import torch

from models.trajectory import fp_trajectories

# the choice of which UNet inputs to keep draws from seed + KEEP_SEED_OFFSET, not from the
# trajectories' own seed
KEEP_SEED_OFFSET = 7


def unet_inputs_per_step(model, ddim, n, keep, batch_size, seed, guidance, device, progress=None):
    """{step: (x, t, context)} with `keep` of the UNet inputs of n FP trajectories at each step, on
    the CPU (an even share from every batch; with guidance, from both halves of the batch)."""
    kept = {i: [] for i in range(ddim.steps)}
    pick = torch.Generator().manual_seed(seed + KEEP_SEED_OFFSET)
    for i, (bx, bt, bc), _ in fp_trajectories(model, ddim, n, batch_size, seed, guidance, device):
        n_batch = min(batch_size, n - batch_size * len(kept[i]))  # trajectories in this batch
        sel = torch.randperm(len(bx), generator=pick)[:max(1, keep * n_batch // n)]
        kept[i].append((bx[sel].cpu(), bt[sel].cpu(), None if bc is None else bc[sel].cpu()))
        if progress:
            progress(n_batch)
    calib = {}
    for i, parts in kept.items():
        xs, ts, cs = zip(*parts)
        calib[i] = (torch.cat(xs)[:keep], torch.cat(ts)[:keep], None if cs[0] is None else torch.cat(cs)[:keep])
    return calib


@torch.no_grad()
def _record(model, calib, names, device, keep=lambda x: x.detach()):
    """{name: {step: keep(input)}} of the named UNet layers over the calibration data {step: inputs}."""
    modules = dict(model.unet.named_modules())
    store = {n: {} for n in names}
    current = [0]
    hooks = [modules[n].register_forward_hook(lambda m, inp, out, n=n: store[n].__setitem__(current[0], keep(inp[0])))
             for n in names]
    try:
        for i, (x, t, c) in calib.items():
            current[0] = i
            model.unet(x.to(device), t.to(device), None if c is None else c.to(device))
    finally:
        for h in hooks:
            h.remove()
    return store


def calibration_groups(model, calib, names, mem_bytes, device):
    """The named UNet layers in groups, each as large as fits in mem_bytes of recorded inputs
    (measured by one dry run on a single input), so that a 400 M-parameter UNet's activations over
    every step are never all held at once."""
    x0, t0, c0 = calib[0]
    dry = _record(model, {0: (x0[:1], t0[:1], None if c0 is None else c0[:1])}, names, device, keep=lambda x: x.numel())
    rows = sum(len(x) for x, _, _ in calib.values())
    need = {n: dry[n][0] * 4 * rows for n in names}  # float32 bytes of the layer's inputs over all steps
    groups, group, used = [], [], 0
    for n in names:
        if group and used + need[n] > mem_bytes:
            groups.append(group)
            group, used = [], 0
        group.append(n)
        used += need[n]
    return groups + [group]


def layer_inputs(model, calib, groups, device):
    """Yields (name, {step: that layer's FP input}) for the layers of calibration_groups(), in
    order: the inputs of one group at a time, recorded by running every calibration input again."""
    for group in groups:
        store = _record(model, calib, group, device)
        for n in group:
            yield n, store.pop(n)
