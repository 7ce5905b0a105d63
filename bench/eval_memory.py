"""Peak memory of sample.py and evaluate.py against the number of images: with shards and streamed
reading, memory should not grow with N beyond the features that evaluate.py keeps (N x feature
dims x 8 bytes) and the precision/recall blocks (--block x N x 4 bytes).

    python bench/eval_memory.py                      # 10,000 and 50,000 images
    python bench/eval_memory.py --counts 1000,5000   # a quicker look

The embedded default's UNet with random weights samples with 2 DDIM steps and no guidance, so that
50,000 images take minutes on a CPU; the in-domain digit
network is the feature network (a small stand-in for Inception: the same pipeline, other sizes).
Each script runs in its own process under /usr/bin/time (peak RSS).
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from models.checkpoint import fp_checkpoint  # noqa: E402
from models.files import save_atomic  # noqa: E402
from models.digits import DIGITS_CONFIG  # noqa: E402
from models.ldm import DiffusionModel  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="10000,50000", help="numbers of images")
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args(argv)

    def peak_rss(cmd):
        """(peak RSS in MB, wall seconds) of one command."""
        t0 = time.time()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, *map(str, cmd)], cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
        return int(proc.stderr.strip().splitlines()[-1]) / 1024, time.time() - t0

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        ckpt = tmp / "random.pt"
        save_atomic(fp_checkpoint(DiffusionModel(DIGITS_CONFIG).eval()), ckpt)
        rows = []
        for n in [int(c) for c in args.counts.split(",")]:
            out = tmp / f"s{n}"
            s_mb, s_sec = peak_rss(["sample.py", "--ckpt", ckpt, "--num-images", n, "--steps", 2, "--guidance", 1.0,
                                    "--batch-size", 500, "--shard-size", args.shard_size, "--no-png", "--out", out])
            npz = out / "samples.npz"
            e_mb, e_sec = peak_rss(["evaluate.py", npz, "--ref", npz, "--out", tmp / f"e{n}.json"])
            r = json.loads((tmp / f"e{n}.json").read_text())
            feature_mb = 2 * n * (128 + 10 + 128) * 8 / 2 ** 20  # samples' and reference's kept features, float64
            rows.append((n, s_mb, s_sec, e_mb, e_sec, feature_mb, npz.stat().st_size / 2 ** 20, r["fid"]))
            npz.unlink()

    print(f"CPU threads: {torch.get_num_threads()}, shard size {args.shard_size}")
    print("| images | sample.py peak RSS MB | sample.py s | evaluate.py peak RSS MB | evaluate.py s | features kept MB | samples.npz MB |")
    print("|---|---|---|---|---|---|---|")
    for n, s_mb, s_sec, e_mb, e_sec, f_mb, npz_mb, fid in rows:
        print(f"| {n} | {s_mb:.0f} | {s_sec:.0f} | {e_mb:.0f} | {e_sec:.0f} | {f_mb:.0f} | {npz_mb:.1f} |")


if __name__ == "__main__":
    main()
