"""TRD, time-smoothed relation distillation: the relation loss between the features of the
full-precision and the quantized UNet, and the smoothing of features over sampling steps."""
import torch
import torch.nn.functional as F


def relation_log_probs(f, temperature=1.0):
    """[B, C, H, W] features -> log row-softmax of each sample's HW x HW cosine-similarity map."""
    f = F.normalize(f.flatten(2).transpose(1, 2), dim=-1)  # [B, HW, C]: a unit vector per pixel
    return F.log_softmax(f @ f.transpose(1, 2) / temperature, dim=-1)


def relation_kl(f_fp, f_q, temperature=1.0):
    """KL(P_fp || P_q) of the relation maps: summed over each row's distribution, averaged over rows
    and samples (so its scale depends on neither the batch nor the image size)."""
    lp, lq = relation_log_probs(f_fp, temperature), relation_log_probs(f_q, temperature)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


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
