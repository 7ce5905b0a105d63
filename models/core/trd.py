"""TRD, time-smoothed relation distillation: the relation loss between the features of the
full-precision and the quantized UNet, and the smoothing of features over sampling steps."""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def relation_log_probs(f, temperature=1.0):
    """[B, C, H, W] features -> log row-softmax of each sample's HW x HW cosine-similarity map."""
    f = F.normalize(f.flatten(2).transpose(1, 2), dim=-1)  # [B, HW, C]: a unit vector per pixel
    return F.log_softmax(f @ f.transpose(1, 2) / temperature, dim=-1)


def _rows_kl(u_fp, u_q, start, rows, temperature):
    """KL of relation rows start..start+rows, summed over each row's distribution: [B, rows]."""
    lp = F.log_softmax(u_fp[:, start:start + rows] @ u_fp.transpose(1, 2) / temperature, dim=-1)
    lq = F.log_softmax(u_q[:, start:start + rows] @ u_q.transpose(1, 2) / temperature, dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def relation_kl(f_fp, f_q, temperature=1.0, block_rows=1024):
    """KL(P_fp || P_q) of the relation maps: summed over each row's distribution, averaged over rows
    and samples (so its scale depends on neither the batch nor the image size). The HW x HW maps
    are made block_rows rows at a time and remade in backward instead of kept: at LDM-4's 64 x 64
    features a sample's map has 16.8 M entries, and keeping every intermediate of every map cost
    more memory than the student's activations."""
    if f_fp.shape[2] * f_fp.shape[3] <= block_rows:  # small maps: in one piece
        lp, lq = relation_log_probs(f_fp, temperature), relation_log_probs(f_q, temperature)
        return (lp.exp() * (lp - lq)).sum(-1).mean()
    u_fp, u_q = (F.normalize(f.flatten(2).transpose(1, 2), dim=-1) for f in (f_fp, f_q))  # [B, HW, C]
    hw = u_fp.shape[1]
    parts = [checkpoint(_rows_kl, u_fp, u_q, r, block_rows, temperature, use_reentrant=False)
             for r in range(0, hw, block_rows)]
    return torch.cat(parts, dim=1).mean()


class WindowSmoother:
    """Mean of the features over non-overlapping windows of `window` sampling steps, the window so
    far at each step. Past steps enter detached: their update has been made, and keeping their graph
    would need a second backward through it. The current step's features stay in the graph, so the
    relation loss sends a gradient into the quantized model at every step (the official code
    detaches all features, so its relation loss trains nothing)."""

    def __init__(self, window):
        self.window = window
        self.past = []

    def __call__(self, step, f):
        if step % self.window == 0:
            self.past = []
        smoothed = torch.stack(self.past + [f]).mean(0)
        self.past.append(f.detach())
        return smoothed
