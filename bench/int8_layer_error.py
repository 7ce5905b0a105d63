"""The int8 kernels' worst error against the fake-quant float layer, on the made-up layers that
tests/test_int8.py checks (bench/int8_cases.py: every layer kind, bit mix, step and input shape):
max |int8 - fake| / max |fake|, the figure whose bound (1e-5) that test asserts. Run it under other
kernel sets to see how the margin moves, e.g.

    python bench/int8_layer_error.py
    ONEDNN_MAX_CPU_ISA=AVX2 python bench/int8_layer_error.py     # oneDNN as on a CPU without VNNI
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.int8 import Int8Layer  # noqa: E402
from bench.int8_cases import LAYERS, made_up_layer  # noqa: E402


def main():
    worst = 0.0
    for kind, (make, shape, other_shape) in LAYERS.items():
        for bits in [(1, 2, 3), (4,), (8,)]:
            torch.manual_seed(0)  # the test's layers and inputs
            fake = made_up_layer(make(), bits)
            int8 = Int8Layer(fake)
            for step in (0, 1):
                fake.step = int8.step = step
                for x in (torch.randn(shape) * 1.5, torch.randn(other_shape)):
                    with torch.no_grad():
                        a, b = fake(x), int8(x)
                    worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
    print(f"worst int8 layer error: {worst:.2e} of the layer's largest output (the test allows 1e-5)")


if __name__ == "__main__":
    main()
