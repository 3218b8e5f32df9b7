"""Counter-based randomness: draws that are pure functions of (seed, step or epoch, sample id, ...).

An image's noise, timestep, label dropout and data variant (crop, flip) are drawn from values
computed here from its own coordinates, never from a rank's RNG stream, so an image gets the
same draw wherever it lands (rank, micro-batch, world size) and a resumed run draws what an
uninterrupted one would.

Every draw is built on splitmix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014; the constants of Vigna's reference `splitmix64.c`): `mix64` is its
finaliser, so `mix64(k * GOLDEN_GAMMA)` is the k-th output of splitmix64 seeded with 0.
The values these functions return are part of a run's reproducibility: changing them changes
which noise and which variants a run sees.
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment: 2**64 / golden ratio, odd
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB


def mix64(x: int) -> int:
    """splitmix64's finaliser of a 64-bit value (a bijection on [0, 2**64) that mixes every bit)."""
    x = (x ^ (x >> 30)) * MIX1 & MASK64
    x = (x ^ (x >> 27)) * MIX2 & MASK64
    return x ^ (x >> 31)


def mix64_array(x: np.ndarray) -> np.ndarray:
    """`mix64` of every element of a uint64 array, bit for bit (uint64 arithmetic wraps mod 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(MIX1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(MIX2)
    return x ^ (x >> np.uint64(31))


def image_seed(seed: int, step: int, sample_id: int) -> int:
    """A well-mixed 63-bit seed (a `torch.Generator` seed) for one image at one step.

    Folds the three values into splitmix64 one after the other. Callers separate streams by
    offsetting `seed` or `step` (label dropout, validation noise, sampling steps).
    """
    value = 0
    for part in (seed, step, sample_id):
        value = mix64((value ^ (part & MASK64)) + GOLDEN_GAMMA & MASK64)
    return value & ((1 << 63) - 1)


def _uniform_key(seed: int, epoch: int, purpose: int) -> int:
    return (seed * GOLDEN_GAMMA + epoch * MIX1 + purpose) & MASK64


def sample_uniform(seed: int, epoch: int, sample: int, purpose: int) -> float:
    """A uniform [0, 1) float64 draw for one dataset sample in one epoch, one per `purpose`
    (the data pipeline's crop and flip choices): two rounds of `mix64`, top 53 bits."""
    x = mix64(mix64((_uniform_key(seed, epoch, purpose) + sample * MIX2) & MASK64))
    return (x >> 11) / float(1 << 53)


def sample_uniforms(seed: int, epoch: int, samples: np.ndarray, purpose: int) -> np.ndarray:
    """`sample_uniform` of many samples (int array, any shape) at once, bit for bit: float64 array."""
    x = samples.astype(np.uint64) * np.uint64(MIX2) + np.uint64(_uniform_key(seed, epoch, purpose))
    x = mix64_array(mix64_array(x))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
