"""distill.py and models/core/trd.py: the relation loss trains, resume is exact, merging is exact."""
import json
import subprocess
import sys

import pytest
import torch

from models.checkpoint import load_quant_model
from models.core.quant import quant_layers, refresh_weights, set_step
from models.trajectory import fp_trajectory
from models.diffusion import DDIM
from models.core.trd import WindowSmoother, relation_kl
from tests.conftest import ROOT, kill_when, run_script

QUICK_DISTILL = ["--iters", 3, "--batch-size", 2, "--eval-samples", 2, "--lora-rank", 2, "--ckpt-every", 1]


def student(quant_ckpt, seed=0):
    """The quantized model with LoRA whose B is non-zero (as after some training), so that every
    LoRA parameter can receive a gradient."""
    fp_model, qmodel, ckpt = load_quant_model(quant_ckpt)
    g = torch.Generator().manual_seed(seed)
    for m in quant_layers(qmodel.unet).values():
        if m.mode != "fp":
            m.add_lora(2, g)
            with torch.no_grad():
                m.lora_B.copy_(0.01 * torch.randn(m.lora_B.shape, generator=g))
    return fp_model, qmodel, ckpt


def lora_grads(quant_ckpt, loss_fn):
    """Gradients on every LoRA parameter of loss_fn(fp_features, q_features) of the last output block."""
    fp_model, qmodel, ckpt = student(quant_ckpt)
    feats = {}
    fp_model.unet.output_blocks[-1].register_forward_hook(lambda m, i, o: feats.__setitem__("fp", o))
    qmodel.unet.output_blocks[-1].register_forward_hook(lambda m, i, o: feats.__setitem__("q", o))
    ddim = DDIM(fp_model.alphas_cumprod, steps=ckpt["settings"]["steps"])
    _, inputs, _ = next(fp_trajectory(fp_model, ddim, range(3), 0, 2.0, torch.device("cpu")))  # FP features: step 0's
    refresh_weights(qmodel.unet)
    set_step(qmodel.unet, 0)
    qmodel.unet(*inputs)
    loss_fn(feats["fp"], feats["q"]).backward()
    nonzero = lambda g: g is not None and g.abs().max().item() > 0
    return {n: (nonzero(m.lora_A.grad), nonzero(m.lora_B.grad))
            for n, m in quant_layers(qmodel.unet).items() if m.mode != "fp"}


def test_relation_loss_alone_reaches_every_upstream_lora_parameter(quant_ckpts):
    # the layers upstream of the feature block: those the features depend on at all
    upstream = lora_grads(quant_ckpts["omq"], lambda f_fp, f_q: f_q.pow(2).sum())
    upstream = {n for n, (a, b) in upstream.items() if a and b}
    trd = lora_grads(quant_ckpts["omq"], lambda f_fp, f_q: 1.0 * relation_kl(f_fp, f_q))
    assert {n for n, (a, b) in trd.items() if a and b} == upstream
    # not upstream: the final conv, and the cross-attention query/key, which with a one-token class
    # context always gets softmax weight 1 (true of cin256-v2 too)
    assert set(trd) - upstream == {"out.2"} | {n for n in trd if "attn2.to_q" in n or "attn2.to_k" in n}
    zero = lora_grads(quant_ckpts["omq"], lambda f_fp, f_q: 0.0 * relation_kl(f_fp, f_q))
    assert not any(a or b for a, b in zero.values())


def test_relation_loss_of_identical_features_is_zero_and_positive_otherwise():
    f = torch.randn(2, 8, 4, 4)
    assert relation_kl(f, f.clone()).item() == 0  # the same values through the same kernels: the same bits
    assert relation_kl(f, f + 0.5 * torch.randn_like(f)).item() > 1e-4
    # invariant to a per-pixel rescaling of the features (cosine similarity), to rounding: the KL is at
    # most max |lp - lq| (p sums to 1), log-softmax moves by at most twice its inputs' largest change,
    # and the similarities of unit vectors (C = 8 terms) differ by the normalisation's and the dot
    # product's rounding, at most (C + 4) units of 2^-24 each side
    assert abs(relation_kl(f, f * 3.0).item()) <= 2 * 2 * (8 + 4) * 2.0 ** -24


def test_window_smoother_means_the_window_and_keeps_only_the_current_step_in_the_graph():
    s = WindowSmoother(2)
    a = torch.ones(1, requires_grad=True)
    b = torch.full((1,), 3.0, requires_grad=True)
    c = torch.full((1,), 5.0, requires_grad=True)
    assert s(0, a).item() == 1.0
    out = s(1, b)
    assert out.item() == 2.0
    out.backward()
    assert a.grad is None and b.grad.item() == 0.5
    assert s(2, c).item() == 5.0  # a new window starts


def test_resume_after_kill_reproduces_the_uninterrupted_run(quant_ckpts, tmp_path):
    flags = [*QUICK_DISTILL[2:], "--iters", 6]  # 5 iterations left after the first state: the kill lands before the end
    straight = tmp_path / "straight.pt"
    run_script("distill.py", "--qckpt", quant_ckpts["omq"], "--out", straight, *flags)
    resumed = tmp_path / "resumed.pt"
    state = tmp_path / "resumed.pt.state.pt"
    proc = subprocess.Popen([sys.executable, "distill.py", "--qckpt", quant_ckpts["omq"], "--out", resumed,
                             *map(str, flags)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, state.exists)
    assert state.exists() and not resumed.exists(), "the run was not interrupted between checkpoints"
    out = run_script("distill.py", "--qckpt", quant_ckpts["omq"], "--out", resumed, *flags, "--resume")
    assert "resumed" in out.stdout
    a = torch.load(straight, weights_only=False)
    b = torch.load(resumed, weights_only=False)
    assert a["unet_state_dict"].keys() == b["unet_state_dict"].keys()
    for k in a["unet_state_dict"]:
        assert torch.equal(a["unet_state_dict"][k], b["unet_state_dict"][k]), k
    assert a["history"] == b["history"]
    assert not state.exists()  # cleaned up after the run completed


def test_merged_model_equals_unmerged(quant_ckpts):
    fp_model, qmodel, _ = student(quant_ckpts["omq"])
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([5, 500, 900])
    ctx, _ = fp_model.context(torch.tensor([1, 2, 10]))
    set_step(qmodel.unet, 1)
    with torch.no_grad():
        refresh_weights(qmodel.unet)
        before = qmodel.unet(x, t, ctx)
        for m in quant_layers(qmodel.unet).values():
            if m.mode != "fp":
                m.merge_lora()
        assert all(m.lora_A is None for m in quant_layers(qmodel.unet).values())
        assert torch.equal(before, qmodel.unet(x, t, ctx))


def test_distilled_checkpoint_is_a_plain_quantized_model(quant_ckpts, tmp_path):
    out = tmp_path / "d.pt"
    proc = run_script("distill.py", "--qckpt", quant_ckpts["uniform"], "--trd", "off", "--out", out, *QUICK_DISTILL)
    assert "before" in proc.stdout and "after" in proc.stdout
    fp_model, qmodel, ckpt = load_quant_model(out)
    assert ckpt["distill"]["trd"] == "off" and ckpt["distill"]["lam"] is None
    assert not any("lora" in k for k in ckpt["unet_state_dict"])
    # the weights moved away from the quantize.py checkpoint's
    q0 = torch.load(quant_ckpts["uniform"], weights_only=False)["unet_state_dict"]
    changed = [k for k, v in ckpt["unet_state_dict"].items() if k.endswith("layer.weight") and not torch.equal(v, q0[k])]
    assert changed


def test_relation_loss_in_row_blocks_equals_the_whole_map():
    """Large feature maps are compared a block of relation rows at a time (remade in backward):
    the same loss and gradient as the whole HW x HW map at once."""
    from models.core.trd import relation_log_probs

    torch.manual_seed(0)
    f_fp = torch.randn(2, 8, 12, 12)
    f_q = (f_fp + 0.3 * torch.randn_like(f_fp)).requires_grad_(True)
    lp, lq = relation_log_probs(f_fp), relation_log_probs(f_q)
    whole = (lp.exp() * (lp - lq)).sum(-1).mean()
    (g_whole,) = torch.autograd.grad(whole, f_q)
    blocks = relation_kl(f_fp, f_q, block_rows=50)  # 144 rows: blocks of 50, 50, 44
    (g_blocks,) = torch.autograd.grad(blocks, f_q)
    # the two differ only in how the similarity matmul is blocked: each similarity (a C = 8 term dot
    # product of unit vectors) may round differently, by at most (C + 2) 2^-24, which moves a
    # log-probability by at most twice that and the KL (a p-weighted mean of their differences) too
    assert abs(blocks - whole).item() <= 2 * 2 * (8 + 2) * 2.0 ** -24 + 1e-6 * whole.item() and blocks > 0
    # a gradient entry sums about HW + C = 152 such terms in another grouping: at most 152 * 2^-24 of
    # the sum of their sizes, which here stays within 64 times the largest entry (1e-3 of it in all)
    assert torch.allclose(g_blocks, g_whole, rtol=0, atol=1e-3 * g_whole.abs().max().item()) and g_whole.abs().max() > 0


def test_lora_learning_rate_is_each_layers_own_and_w8a8_layers_stay_frozen(quant_ckpts, tmp_path):
    """Per layer, the LoRA rate comes from that layer's own quantizer: a layer quantized the same way
    by OMQ (which smooths or splits other layers) and by uniform bits trains at the same rate, while
    one global rate would differ between the two runs. With --freeze-w8a8 the W8A8 layers get no
    LoRA and come out as they went in."""
    rates, layers = {}, {}
    for key in ("omq", "uniform"):
        out = tmp_path / f"{key}.pt"
        run_script("distill.py", "--qckpt", quant_ckpts[key], "--out", out, *QUICK_DISTILL, "--iters", 1, "--trd", "off",
                   "--freeze-w8a8")
        rates[key] = json.loads(out.with_suffix(".json").read_text())["lr_lora_per_layer"]
        layers[key] = quant_layers(load_quant_model(quant_ckpts[key])[1].unet)
        distilled = quant_layers(load_quant_model(out)[1].unet)
        for name, q in layers[key].items():
            if q.mode == "w8a8":
                assert name not in rates[key] and torch.equal(distilled[name].layer.weight, q.layer.weight), name
    same = [n for n, q in layers["omq"].items() if q.mode == "quant" and all(
        torch.equal(getattr(q, k), getattr(layers["uniform"][n], k)) for k in ("bits", "w_scale", "smooth"))]
    smoothed = [n for n, q in layers["omq"].items() if q.mode == "quant" and not (q.smooth == 1).all()]
    assert same and smoothed  # layers quantized alike, beside others that OMQ smoothed
    for n in same:
        assert rates["omq"][n] == rates["uniform"][n], n
    for n in smoothed:  # the rate is the step size of W (before smoothing): w_scale / s
        q = layers["omq"][n]
        want = (q.w_scale.double().abs()[:, None] / q.smooth.double()[None]).mean().item() / 2500
        # distill.py takes float32 means of n_out and n_in positive terms and multiplies them: at most
        # (n_out + n_in + 4) 2^-24 relative error, on any summation order
        assert abs(rates["omq"][n] - want) <= (q.w_scale.numel() + q.smooth.numel() + 4) * 2.0 ** -24 * want
    # by default the W8A8 layers train as well, each at its own rate too
    out = tmp_path / "default.pt"
    run_script("distill.py", "--qckpt", quant_ckpts["omq"], "--out", out, *QUICK_DISTILL, "--iters", 1, "--trd", "off")
    default = json.loads(out.with_suffix(".json").read_text())["lr_lora_per_layer"]
    w8a8 = {n for n, q in layers["omq"].items() if q.mode == "w8a8"}
    assert w8a8 and set(default) == set(rates["omq"]) | w8a8
    assert all(default[n] == rates["omq"][n] for n in rates["omq"])
    # the rule this replaced: one rate for every layer, the mean step size over all of them
    global_rate = {k: torch.cat([q.w_scale.abs() for q in layers[k].values() if q.mode != "fp"]).mean().item() / 2500
                   for k in layers}
    assert global_rate["omq"] != global_rate["uniform"]


def test_relation_loss_once_per_window_by_default_and_it_trains_the_quantized_model(quant_ckpts, tmp_path):
    """The official TRD schedule: the relation term at each window's last step (4 steps, windows of
    2: steps 1 and 3), on the window's mean features; --trd-every step adds it at every step. The
    term must change what the quantized model learns: a run with it ends with other weights than
    the same run without it (with the official code's detached features they would be equal)."""
    def distill(name, *flags):
        out = tmp_path / f"{name}.pt"
        run_script("distill.py", "--qckpt", quant_ckpts["omq"], "--out", out, *QUICK_DISTILL, "--iters", 1, *flags)
        return json.loads(out.with_suffix(".json").read_text())["distill"], quant_layers(load_quant_model(out)[1].unet)

    window, w_layers = distill("window", "--lam", 1000)
    assert window["trd_every"] == "window" and window["relation_steps"] == [1, 3]
    assert distill("every", "--trd-every", "step")[0]["relation_steps"] == [0, 1, 2, 3]
    assert distill("w3", "--window", 3)[0]["relation_steps"] == [2, 3]  # a last, shorter window too
    off, off_layers = distill("off", "--trd", "off")
    assert off["relation_steps"] == []
    changed = [n for n, q in w_layers.items() if q.mode != "fp" and not torch.equal(q.layer.weight, off_layers[n].layer.weight)]
    assert len(changed) > len(w_layers) // 2, changed


def test_mse_matches_the_guided_eps_by_default(quant_ckpts, tmp_path):
    """--mse-target guided (official) and halves train differently, and --lam auto keeps the official
    summed weighting for each: the KL sums over both guidance halves' features, the guided MSE over
    one eps, so lambda doubles."""
    reports, layers = {}, {}
    for target in ("guided", "halves"):
        out = tmp_path / f"{target}.pt"
        run_script("distill.py", "--qckpt", quant_ckpts["omq"], "--out", out, *QUICK_DISTILL, "--iters", 1,
                   *(["--mse-target", target] if target == "halves" else []))
        reports[target] = json.loads(out.with_suffix(".json").read_text())["distill"]
        layers[target] = quant_layers(load_quant_model(out)[1].unet)
    assert reports["guided"]["mse_target"] == "guided" and reports["guided"]["lam"] == 2 * reports["halves"]["lam"] == 200
    assert any(not torch.equal(q.layer.weight, layers["halves"][n].layer.weight) for n, q in layers["guided"].items())


def test_fake_quant_node_has_the_spelled_out_straight_through_gradients():
    """models.core.quant.FakeQuant against the quantizer written out in autograd (round_ste, torch.clamp
    with tensor bounds): the same values, and in float64 the same gradients for x, the scale and
    the zero-point, per output channel (weights, mixed bit-widths) and per tensor (activations)."""
    from models.core.quant import fake_quant, round_ste

    def spelled_out(x, scale, zero, qmax):
        qmax = torch.as_tensor(qmax, dtype=x.dtype)
        q = torch.clamp(round_ste(x / scale + zero), torch.zeros_like(qmax), qmax)
        return (q - zero) * scale

    g = torch.Generator().manual_seed(0)
    d = dict(dtype=torch.float64)
    weight = (torch.randn(16, 8, 3, 3, generator=g, **d), torch.rand(16, 1, 1, 1, generator=g, **d) * 0.3 + 0.05,
              torch.rand(16, 1, 1, 1, generator=g, **d) * 3, 2.0 ** torch.randint(1, 4, (16, 1, 1, 1), generator=g).double() - 1)
    act = (torch.randn(4, 8, 5, 5, generator=g, **d) * 2, torch.tensor(0.3, **d), torch.tensor(7.0, **d), torch.tensor(15.0, **d))
    act_real_zero = (act[0], act[1], torch.tensor(6.6, **d), 15.0)  # zero rounded to 7 by round_zero, qmax a float
    for (x, scale, zero, qmax), round_zero in ((weight, False), (act, False), (act_real_zero, True)):
        leaves = [t.clone().requires_grad_() for t in (x, scale, zero)]
        upstream = torch.randn(x.shape, generator=g, **d)
        ours = fake_quant(*leaves, qmax, round_zero=round_zero)
        want = spelled_out(*leaves[:2], round_ste(leaves[2]) if round_zero else leaves[2], qmax)
        assert torch.equal(ours, want)
        with torch.no_grad():  # the path without a gradient gives the same values
            assert torch.equal(fake_quant(*leaves, qmax, round_zero=round_zero), want)
        r = (x / scale + zero.round() if round_zero else x / scale + zero).round()
        assert ((r == 0) | (r == qmax)).any() and ((r < 0) | (r > qmax)).any()  # ties and clipping both occur
        for a, b in zip(torch.autograd.grad(ours, leaves, upstream), torch.autograd.grad(want, leaves, upstream)):
            # float64: the scale and zero-point gradients are sums of at most 16 * 8 * 9 = 1,152 terms of
            # order 1, which another order of summation moves by at most 1152 * 2^-53 of their absolute sum
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("chunk", [1 << 17, 3000])
def test_weight_refresher_equals_refresh_weights(quant_ckpts, monkeypatch, chunk):
    """distill.py's WeightRefresher (the small layers stacked by fan-in, in pieces, each fake-quantized
    at once) gives every layer exactly refresh_weights' weight, and the LoRA and weight-scale
    gradients to float rounding; a layer it did not bank (frozen) refreshes as before. A small chunk
    cuts a fan-in's layers into several pieces."""
    import models.core.quant
    from models.core.quant import WeightRefresher
    monkeypatch.setattr(models.core.quant, "BANK_CHUNK", chunk)
    _, qmodel, _ = student(quant_ckpts["all"])
    layers = [m for m in quant_layers(qmodel.unet).values() if m.mode != "fp"]
    layers[0].frozen = True  # a packed layer: refreshed by itself, not banked
    params = [p for m in layers[1:] for p in (m.lora_A, m.lora_B, m.w_scale)]
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layers[2].smooth.copy_(torch.rand(layers[2].smooth.shape, generator=g) + 0.5)  # one smoothed layer
    upstream = [torch.randn(m.layer.weight.shape, generator=g) for m in layers]
    refresher = WeightRefresher(qmodel.unet)
    assert layers[0] in refresher.rest and len(refresher.bank) == len(layers) - 1
    fan_ins = {m.layer.weight[0].numel() for m in refresher.bank}
    assert len(refresher.pieces) >= len(fan_ins) and (chunk > 3000 or len(refresher.pieces) > len(fan_ins))
    assert any(smooth is not None for _, _, smooth, _, _ in refresher.pieces)  # the smoothing is exercised
    results = []
    for refresh in (lambda: refresh_weights(qmodel.unet), refresher):
        refresh()
        weights = [m.w_q.detach().clone() for m in layers]
        loss = sum((m.w_q * u).sum() for m, u in zip(layers[1:], upstream[1:]))
        results.append((weights, torch.autograd.grad(loss, params)))
    (w_layer, g_layer), (w_bank, g_bank) = results
    assert all(torch.equal(a, b) for a, b in zip(w_layer, w_bank))
    assert any(t.abs().max() > 0 for t in g_bank)
    for a, b in zip(g_layer, g_bank):
        # the w_scale gradients are float32 sums over each channel's fan-in (at most 1,152 terms) in another
        # grouping: at most 1152 * 2^-24 = 7e-5 of the terms' absolute sum, itself within a few times the
        # largest gradient here; the LoRA gradients are matmuls of the same kind
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3 * a.abs().max().item())


def test_eval_every_logs_the_held_out_error_without_changing_the_run(quant_ckpts, tmp_path):
    run_script("distill.py", "--qckpt", quant_ckpts["omq"], "--out", tmp_path / "plain.pt", *QUICK_DISTILL)
    run_script("distill.py", "--qckpt", quant_ckpts["omq"], "--out", tmp_path / "eval.pt", *QUICK_DISTILL, "--eval-every", 1)
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("plain", "eval"))
    for k, v in a["unet_state_dict"].items():
        assert torch.equal(v, b["unet_state_dict"][k]), k  # measuring does not touch training
    assert [{k: v for k, v in h.items() if not k.startswith("eps_mse_held_out")} for h in b["history"]] == a["history"]
    held_out = [h["eps_mse_held_out"] for h in b["history"]]
    for h in b["history"]:  # each guidance half's error, whose mean is the one figure, and the guided eps's
        # the same squared errors summed in float32 per batch and step, whole or by half: at most
        # 2 * 2 * 64 = 256 positive terms a sum, so at most 256 * 2^-24 = 1.5e-5 relative apart
        assert h["eps_mse_held_out"] == pytest.approx((h["eps_mse_held_out_cond"] + h["eps_mse_held_out_uncond"]) / 2, rel=256 * 2.0 ** -24)
        assert h["eps_mse_held_out_guided"] > 0
    assert len(held_out) == 3 and "eps_mse_held_out" not in a["history"][0]
    # the last one is the final model's figure before LoRA merging and float16 rounding of the quantizer parameters
    assert abs(held_out[-1] - b["eps_mse"]) <= 0.05 * b["eps_mse"]
    assert all(h["mse_mean"] > 0 for h in b["history"])


def test_teacher_cache_is_shared_across_quantized_models_and_changes_nothing(quant_ckpts, tmp_path):
    """Runs of one training seed share the FP teacher's trajectories bit for bit, whatever the
    quantized model; another guidance or another seed never reads them (training seeds are only
    independent if each walks its own trajectories)."""
    cache = tmp_path / "teacher"
    # the uniform model's MSE-only run computes the teacher's batches; the OMQ model's TRD run reads them
    run_script("distill.py", "--qckpt", quant_ckpts["uniform"], "--trd", "off", "--out", tmp_path / "writer.pt",
               *QUICK_DISTILL, "--teacher-cache", cache)
    run_script("distill.py", "--qckpt", quant_ckpts["omq"], "--out", tmp_path / "cached.pt", *QUICK_DISTILL,
               "--teacher-cache", cache)
    run_script("distill.py", "--qckpt", quant_ckpts["omq"], "--out", tmp_path / "plain.pt", *QUICK_DISTILL)
    writer, cached = (json.loads((tmp_path / f"{n}.json").read_text())["teacher_cache"] for n in ("writer", "cached"))
    assert (writer["batches_read"], writer["batches_computed"]) == (0, 3)
    assert (cached["batches_read"], cached["batches_computed"]) == (3, 0)
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("plain", "cached"))
    for k, v in a["unet_state_dict"].items():
        assert torch.equal(v, b["unet_state_dict"][k]), k  # features included: the relation loss trained alike
    assert a["history"] == b["history"]
    # another guidance scale is another teacher: computed, not read
    run_script("distill.py", "--qckpt", quant_ckpts["omq"], "--out", tmp_path / "other.pt", *QUICK_DISTILL,
               "--guidance", 1.5, "--teacher-cache", cache)
    other = json.loads((tmp_path / "other.json").read_text())["teacher_cache"]
    assert (other["batches_read"], other["batches_computed"]) == (0, 3)
    # another training seed walks its own trajectories: it computes them, and trains as without a cache
    for name, flags in (("seed1", ["--teacher-cache", cache]), ("seed1_plain", [])):
        run_script("distill.py", "--qckpt", quant_ckpts["omq"], "--out", tmp_path / f"{name}.pt", *QUICK_DISTILL,
                   "--seed", 1, *flags)
    seed1 = json.loads((tmp_path / "seed1.json").read_text())["teacher_cache"]
    assert (seed1["batches_read"], seed1["batches_computed"]) == (0, 3)
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("seed1", "seed1_plain"))
    for k, v in a["unet_state_dict"].items():
        assert torch.equal(v, b["unet_state_dict"][k]), k
    assert a["history"] == b["history"]

