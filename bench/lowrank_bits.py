"""What a float low-rank branch (quantize.py --lowrank R) costs in memory: the stored bits per weight of
the whole UNet (models/core/bits.py: every conv/linear weight at its stored width, under quantize.py's
default policy the first/last conv and time embedding at W8A8 and skip and downsampling convs in full
precision, with the quantizer parameters of 20 sampling steps and the float16 branch), for the embedded
defaults and the official LDM models. Built on the meta device: no weights are needed or made; no
layer is counted as smoothed.

    python bench/lowrank_bits.py                     # digits, photos, cin256-v2, lsun_beds256, lsun_churches256
    python bench/lowrank_bits.py --ranks 1,2,4,8,32 --wbits 2,3,4
    python bench/lowrank_bits.py --parts             # where the bits go, without a branch
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models.digits import DIGITS_CONFIG  # noqa: E402
from models.photos import PHOTO_CONFIG  # noqa: E402
from models.ldm import LDM_CONFIGS, DiffusionModel  # noqa: E402
from models.core.bits import bits_per_weight, layer_bits, stored_bits  # noqa: E402
from models.qmodel import build_quant_model  # noqa: E402
from models.core.quant import quant_layers  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits,photos," + ",".join(LDM_CONFIGS))
    parser.add_argument("--ranks", default="0,1,2,4,8,32")
    parser.add_argument("--wbits", default="2")
    parser.add_argument("--parts", action="store_true",
                        help="instead: where each model's bits go without a branch (low-bit codes, the W8A8 and FP "
                             "layers' codes, quantizer parameters)")
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.parts:
        return parts(args)

    print("| model | low-bit layers | their weights | smallest min(out, fan_in) | W | "
          + " | ".join(f"R = {r}" for r in ranks) + " |")
    print("|---|---|---|---|---|" + "---|" * len(ranks))
    for name in args.models.split(","):
        config = {"digits": DIGITS_CONFIG, "photos": PHOTO_CONFIG}.get(name) or LDM_CONFIGS[name]
        with torch.device("meta"):
            fp = DiffusionModel(config)
        for n in [int(b) for b in args.wbits.split(",")]:
            row = []
            for r in ranks:
                with torch.device("meta"):
                    q = build_quant_model(fp, dict(wbits=n, abits=4, steps=20, quantize_all=False, lowrank=r))
                layers = {k: m for k, m in quant_layers(q.unet).items() if m.mode == "quant"}
                row.append(f"{bits_per_weight(q.unet):.2f}")
            shapes = [(m.layer.weight.shape[0], m.layer.weight[0].numel()) for m in layers.values()]
            print(f"| {name} | {len(layers)} | {sum(o * f for o, f in shapes) / 1e6:.2f} M | {min(min(s) for s in shapes)} | "
                  f"{n} | " + " | ".join(row) + " |")


def parts(args):
    print("| model | W | low-bit codes | W8A8 and FP layers | quantizer parameters | bits per weight |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        config = {"digits": DIGITS_CONFIG, "photos": PHOTO_CONFIG}.get(name) or LDM_CONFIGS[name]
        for n in [int(b) for b in args.wbits.split(",")]:
            with torch.device("meta"):
                q = build_quant_model(DiffusionModel(config), dict(wbits=n, abits=4, steps=20, quantize_all=False, lowrank=0))
            total = stored_bits(q.unet)
            low = sum(layer_bits(m)["codes"] for m in quant_layers(q.unet).values() if m.mode == "quant")
            w = total["weights"]
            print(f"| {name} | {n} | {low / w:.2f} | {(total['codes'] - low) / w:.2f} | {total['quantizer'] / w:.2f} | "
                  f"{total['bits_per_weight']:.2f} |")


if __name__ == "__main__":
    main()
