"""How the scripts tie their random draws to seeds, in one place. Every sample (a calibration or
distillation trajectory, a held-out trajectory, an evaluation image) draws all of its noise, its x_T,
its class and each step's noise, from one generator seeded by (seed, sample index); each role has a
seed of its own. Two roles share a draw exactly where their generator seeds overlap, which
bench/reproduce.py and tests/test_splits.py check. No torch here: reproduce.py reads it without
loading torch."""

# sample i of seed s draws from generator s * SEED_STRIDE + i: seeds that differ by one share no
# generator for the first SEED_STRIDE samples (a prime, so that no regular pattern of seeds collides)
SEED_STRIDE = 1_000_003

# the eps-MSE check of quantize.py and distill.py runs on the trajectories of seed + HELD_OUT_SEED_OFFSET,
# which neither calibration nor distillation (seed) draws from
HELD_OUT_SEED_OFFSET = 10_000


def generator_seeds(seed, indices):
    """The generator seeds of samples `indices` of `seed`."""
    return [int(seed) * SEED_STRIDE + int(i) for i in indices]
