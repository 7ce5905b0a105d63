"""Code that only runs at LDM-4 size, run on the small model: the weight fake-quantization recomputed
in backward, distill.py --recompute, the row-blocked relation loss, calibration in several memory
groups. Each is compared with the path the tests' small models take anyway."""
import torch
import torch.nn.functional as F

import models.core.quant
from models.diffusion import DDIM, combine_guidance
from models.core.quant import quant_layers, refresh_weights, set_step
from models.trajectory import fp_trajectory
from models.core.trd import relation_kl
from tests.conftest import QUICK, run_script
from tests.test_distill import QUICK_DISTILL, student


def lora_and_quantizer_grads(quant_ckpt, recompute_min_weights=None, recompute_activations=False):
    """One MSE update's gradients on every trainable tensor, with the given LDM-scale switches."""
    fp_model, qmodel, ckpt = student(quant_ckpt)
    layers = {n: m for n, m in quant_layers(qmodel.unet).items() if m.mode != "fp"}
    params = {f"{n}.{p}": getattr(m, p) for n, m in layers.items() for p in ("lora_A", "lora_B", "w_scale", "a_scale", "a_zero")}
    for p in params.values():
        p.requires_grad_(True)
    for m in layers.values():
        m.recompute = recompute_activations
    ddim = DDIM(fp_model.alphas_cumprod, steps=ckpt["settings"]["steps"])
    i, inputs, out_fp = next(fp_trajectory(fp_model, ddim, range(3), 0, 2.0, torch.device("cpu")))
    saved, checkpoint = models.core.quant.RECOMPUTE_MIN_WEIGHTS, models.core.quant.checkpoint
    recomputed = []  # the weights whose fake-quantization went through torch.utils.checkpoint

    def counted(fn, *a, **kw):
        recomputed.append(fn)
        return checkpoint(fn, *a, **kw)

    models.core.quant.checkpoint = counted
    if recompute_min_weights is not None:
        models.core.quant.RECOMPUTE_MIN_WEIGHTS = recompute_min_weights
    try:
        qmodel.unet.train()
        refresh_weights(qmodel.unet)
        n_weights = len(recomputed)
        set_step(qmodel.unet, i)
        loss = F.mse_loss(combine_guidance(qmodel.unet(*inputs), 2.0), combine_guidance(out_fp, 2.0))
        loss.backward()
    finally:
        models.core.quant.RECOMPUTE_MIN_WEIGHTS, models.core.quant.checkpoint = saved, checkpoint
    return {k: p.grad.clone() for k, p in params.items()}, n_weights


def assert_same_grads(a, b):
    """Exact on any CPU: a recomputed forward runs the same kernels on the same tensors as the stored
    one, so backward sees the same bits."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_weight_fake_quant_recomputed_in_backward_gives_the_stored_gradients(quant_ckpts):
    stored, n_stored = lora_and_quantizer_grads(quant_ckpts["omq"])
    recomputed, n_recomputed = lora_and_quantizer_grads(quant_ckpts["omq"], recompute_min_weights=0)
    assert n_stored == 0 and n_recomputed > 100  # every quantized layer took the LDM-4 path
    assert_same_grads(stored, recomputed)


def test_activation_recompute_gives_the_stored_gradients(quant_ckpts):
    assert_same_grads(lora_and_quantizer_grads(quant_ckpts["omq"])[0],
                      lora_and_quantizer_grads(quant_ckpts["omq"], recompute_activations=True)[0])


def test_distill_recompute_makes_the_same_updates(quant_ckpts, tmp_path):
    run_script("distill.py", "--qckpt", quant_ckpts["omq"], "--out", tmp_path / "a.pt", *QUICK_DISTILL)
    run_script("distill.py", "--qckpt", quant_ckpts["omq"], "--out", tmp_path / "b.pt", *QUICK_DISTILL, "--recompute")
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in "ab")
    # exact on any CPU: backward recomputes each layer's forward with the same kernels on the same
    # tensors, so every gradient, and so every update, is the same bits
    for k, v in a["unet_state_dict"].items():
        assert torch.equal(v, b["unet_state_dict"][k]), k
    assert a["history"] == b["history"]


def test_row_blocked_relation_loss_equals_the_one_piece_loss():
    """LDM-4's 64 x 64 features (4,096 relation rows) take the blocked path; here 12 x 12 features
    (144 rows) in blocks of 32 rows (the last one short) against the same maps in one piece."""
    g = torch.Generator().manual_seed(0)
    f_fp = torch.randn(2, 16, 12, 12, generator=g, dtype=torch.float64)
    f_q = (f_fp + 0.3 * torch.randn(f_fp.shape, generator=g, dtype=torch.float64)).requires_grad_()
    one = relation_kl(f_fp, f_q, temperature=0.5, block_rows=10 ** 6)
    (g_one,) = torch.autograd.grad(one, f_q)
    blocked = relation_kl(f_fp, f_q, temperature=0.5, block_rows=32)
    (g_blocked,) = torch.autograd.grad(blocked, f_q)
    assert one.item() > 1e-3
    assert torch.allclose(one, blocked, rtol=1e-12) and torch.allclose(g_one, g_blocked, rtol=1e-10, atol=1e-15)


def test_calibration_in_several_memory_groups_gives_one_groups_quantizers(fp_ckpt, tmp_path):
    """--calib-mem-gb small enough that the layers are calibrated a few at a time (their inputs
    recorded again for each group): the same quantizer parameters as all layers at once."""
    one = run_script("quantize.py", "--ckpt", fp_ckpt, "--out", tmp_path / "one.pt", *QUICK).stdout
    many = run_script("quantize.py", "--ckpt", fp_ckpt, "--out", tmp_path / "many.pt", *QUICK,
                      "--calib-mem-gb", 0.0005).stdout
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True)["unet_state_dict"] for n in ("one", "many"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert "inputs in 1 group within" in one
    n_groups = int(many.split("inputs in ")[1].split()[0])
    assert n_groups > 3, many[-1500:]
