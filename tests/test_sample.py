"""sample.py and models/pack.py: packed checkpoints of real size, exact unpacking, torchrun."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import load_packed_model, load_quant_model, write_packed
from models.pack import fp32_bytes, pack_codes, pack_model, unpack_codes, unpack_model
from models.core.quant import quant_layers
from tests.conftest import ROOT, kill_when, run_script


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


def test_unpacked_weights_equal_fake_quantized_weights(quant_ckpts):
    _, qmodel, _ = load_quant_model(quant_ckpts["omq"])
    sd = unpack_model(pack_model(qmodel))
    layers = {n: q for n, q in quant_layers(qmodel).items() if q.mode != "fp"}
    assert any(len(set(q.bits.tolist())) > 1 for q in layers.values())  # mixed layers are covered
    for name, q in layers.items():
        assert torch.equal(sd[f"{name}.layer.weight"], q.w_q), name
    own = qmodel.state_dict()
    packed_weights = {f"{n}.layer.weight" for n in layers}
    assert set(sd) == set(own)
    for k, v in sd.items():  # and everything else comes back as it was
        if k not in packed_weights:
            assert torch.equal(v, own[k]), k


@pytest.fixture(scope="module")
def packed(quant_ckpts, tmp_path_factory):
    path = tmp_path_factory.mktemp("packed") / "omq.packed.pt"
    _, qmodel, ckpt = load_quant_model(quant_ckpts["omq"])
    write_packed(qmodel, path)
    return path, qmodel


def test_packed_w2a4_file_is_about_two_bits_a_weight(quant_ckpts):
    """With every layer quantized (--quantize-all; by default skip and downsampling convs stay FP32
    and the first/last convs and time embedding W8A8), the file is 2 bits a weight plus at most 5 %
    of the FP32 size for per-channel/per-step parameters, biases and norms, plus the names."""
    path = quant_ckpts["all"].with_suffix(".packed.pt")
    model, ckpt = load_packed_model(path)
    assert all(q.frozen for q in quant_layers(model.unet).values() if q.mode != "fp")
    assert path.stat().st_size <= (2 / 32 + 0.05) * fp32_bytes(model) + 16_000


def sample(ckpt, out, *extra):
    run_script("sample.py", "--ckpt", ckpt, "--num-images", 6, "--batch-size", 4, "--out", out, *extra)
    return np.load(out / "samples.npz")


def test_packed_and_unpacked_checkpoints_sample_the_same_images(quant_ckpts, packed, tmp_path):
    a = sample(quant_ckpts["omq"], tmp_path / "unpacked")
    b = sample(packed[0], tmp_path / "packed")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert a["arr_0"].shape == (6, 8, 8, 1) and list(a["labels"]) == [0, 1, 2, 3, 4, 5]
    assert (tmp_path / "packed" / "grid.png").exists() and len(list((tmp_path / "packed" / "images").glob("*.png"))) == 6


def test_sample_set_does_not_depend_on_batch_size(fp_ckpt, tmp_path):
    """Exact where the kernels compute each sample without regard to its batch-mates, which PyTorch's
    CPU convolutions and matmuls did on every kernel set and thread count of docs/portability.md but
    do not promise: this (and the torchrun test below) is the suite's one stated assumption about the
    kernels. A kernel that blocks the batch differently for another batch size would move some
    samples by float rounding, which truncation to uint8 could show as one grey level."""
    a = sample(fp_ckpt, tmp_path / "a")
    run_script("sample.py", "--ckpt", fp_ckpt, "--num-images", 6, "--batch-size", 5, "--out", tmp_path / "b")
    assert np.array_equal(a["arr_0"], np.load(tmp_path / "b" / "samples.npz")["arr_0"])


def test_quantized_model_refuses_another_step_count(quant_ckpts, tmp_path):
    proc = run_script("sample.py", "--ckpt", quant_ckpts["omq"], "--steps", 10, "--out", tmp_path, check=False)
    assert proc.returncode != 0 and "calibrated for 4 DDIM steps" in proc.stderr


def test_torchrun_two_processes_match_one(quant_ckpts, tmp_path):
    """Each process samples its images in batches of its own size: exact under the assumption that
    test_sample_set_does_not_depend_on_batch_size states."""
    torchrun = Path(sys.executable).parent / "torchrun"  # installed with torch, beside this python
    one = sample(quant_ckpts["omq"], tmp_path / "one")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "sample.py", "--ckpt",  # a free port
                           str(quant_ckpts["omq"]), "--num-images", "6", "--batch-size", "4", "--out", str(tmp_path / "two")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = np.load(tmp_path / "two" / "samples.npz")
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["labels"], two["labels"])


def test_checkpoints_of_earlier_format_versions_load_or_are_refused_clearly(quant_ckpts, packed, tmp_path):
    """Quantized version 1 (before the settings were stored whole and the UNet lost its wrapper)
    held the same tensors and settings plus an unused 'modes' table: it loads and gives the same
    model. Packed version 1 named its tensors 'unet.unet.*': it is refused, naming the version and
    what to rerun; so is a file from a newer version of this code."""
    ckpt = torch.load(quant_ckpts["omq"], weights_only=False)
    _, qmodel, _ = load_quant_model(quant_ckpts["omq"])
    v1 = dict(ckpt, version=1, modes={n: q.mode for n, q in quant_layers(qmodel.unet).items()})
    torch.save(v1, tmp_path / "v1.pt")
    _, old, _ = load_quant_model(tmp_path / "v1.pt")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 901])
    ctx, _ = qmodel.context(torch.tensor([3, 10]))
    with torch.no_grad():
        assert torch.equal(old.unet(x, t, ctx), qmodel.unet(x, t, ctx))

    p = torch.load(packed[0], weights_only=False)
    torch.save(dict(p, version=1), tmp_path / "v1.packed.pt")
    proc = run_script("sample.py", "--ckpt", tmp_path / "v1.packed.pt", "--out", tmp_path / "s1", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "mpq-dm/packed format version 1" in proc.stderr and "rerun quantize.py or distill.py with --pack" in proc.stderr
    torch.save(dict(ckpt, version=3), tmp_path / "v3.pt")
    proc = run_script("sample.py", "--ckpt", tmp_path / "v3.pt", "--out", tmp_path / "s3", check=False)
    assert proc.returncode == 2 and "format version 3; this code reads up to 2" in proc.stderr
    assert not (tmp_path / "s1" / "samples.npz").exists() and not (tmp_path / "s3" / "samples.npz").exists()


def test_killed_sample_run_resumes_to_a_byte_identical_npz(quant_ckpts, tmp_path):
    """Shards are written as they are made; a run killed after some of them and resumed gives the
    same samples.npz, byte for byte, as a run that was never interrupted."""
    flags = ["--ckpt", quant_ckpts["omq"], "--num-images", 24, "--shard-size", 2, "--batch-size", 1]
    run_script("sample.py", *flags, "--out", tmp_path / "straight")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "sample.py", *map(str, flags), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, (out / "shards" / "shard_000001.npz").exists)
    done = sorted(p.name for p in (out / "shards").glob("shard_*.npz"))
    assert 2 <= len(done) < 12 and not (out / "samples.npz").exists(), done
    refused = run_script("sample.py", *flags, "--out", out, check=False)  # neither --resume nor --force
    assert refused.returncode == 2 and "--resume to continue" in refused.stderr
    other = run_script("sample.py", *flags, "--seed", 1, "--out", out, "--resume", check=False)
    assert other.returncode == 2 and "--seed 0 (now 1)" in other.stderr
    resumed = run_script("sample.py", *flags, "--out", out, "--resume")
    assert f"{len(done)} of 12 shards are done" in resumed.stdout
    assert (out / "samples.npz").read_bytes() == (tmp_path / "straight" / "samples.npz").read_bytes()
    assert not (out / "shards").exists()
    assert len(list((out / "images").glob("*.png"))) == 24
