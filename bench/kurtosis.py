"""What the embedded defaults' weights look like to OMQ: per-output-channel weight kurtosis over the
layers quantize.py puts at low bits (its default layer policy: models/qmodel.py), and, from
quantize.py reports, the share of those layers whose OMQ search chose a mixed split (some channels at
n+1 and n-1 bits) over uniform bits. A Gaussian's kurtosis is 3; outlier-heavy channels score high.

    python quantize.py --wbits 2 --out runs/kurt/digits_w2.pt
    python quantize.py --ckpt checkpoints/photo_unet.pt --wbits 2 --out runs/kurt/photos_w2.pt
    python bench/kurtosis.py --report digits=runs/kurt/digits_w2.json --report photos=runs/kurt/photos_w2.json
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models.core.allocate import kurtosis  # noqa: E402
from models.checkpoint import load_fp_model  # noqa: E402
from models.digits import DEFAULT_CHECKPOINT  # noqa: E402
from models.photos import PHOTO_CHECKPOINT  # noqa: E402
from models.qmodel import layer_mode  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=None,
                        help=f"NAME=CKPT (default: digits={DEFAULT_CHECKPOINT.relative_to(ROOT)}, "
                             f"photos={PHOTO_CHECKPOINT.relative_to(ROOT)})")
    parser.add_argument("--report", action="append", default=[], help="NAME=quantize.py report (.json) of that model")
    args = parser.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.model) if args.model else {"digits": DEFAULT_CHECKPOINT,
                                                                            "photos": PHOTO_CHECKPOINT}

    print("| model | low-bit layers | their weights | out channels (min-max) | kurtosis median | 90th pct | "
          "99th pct | max | channels > 10 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, path in models.items():
        unet = load_fp_model(path).unet
        kurts, outs, n_weights = [], [], 0
        for lname, module in unet.named_modules():
            if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)) and layer_mode(lname, module) == "quant":
                kurts.append(kurtosis(module.weight.detach()).numpy())
                outs.append(module.weight.shape[0])
                n_weights += module.weight.numel()
        k = np.concatenate(kurts)
        p = np.percentile(k, [50, 90, 99])
        print(f"| {name} | {len(kurts)} | {n_weights / 1e6:.2f} M | {min(outs)}-{max(outs)} | {p[0]:.2f} | {p[1]:.2f} | "
              f"{p[2]:.2f} | {k.max():.2f} | {(k > 10).mean():.1%} |")

    if args.report:
        print("\n| model | W | method | low-bit layers | mixed split chosen | of which smoothing kept | mean share of "
              "channels at n+1 bits (mixed layers) |")
        print("|---|---|---|---|---|---|---|")
    for item in args.report:
        name, path = item.split("=", 1)
        report = json.loads(Path(path).read_text())
        low = [r for r in report["layers"].values() if r["mode"] == "quant"]
        mixed = [r for r in low if r["high"] > 0]
        share = np.mean([r["high"] / r["out_channels"] for r in mixed]) if mixed else 0.0
        print(f"| {name} | {report['settings']['wbits']} | {report['settings']['method']} | {len(low)} | "
              f"{len(mixed)} ({len(mixed) / len(low):.0%}) | {sum(r['smooth_alpha'] > 0 for r in mixed)} | {share:.1%} |")


if __name__ == "__main__":
    main()
