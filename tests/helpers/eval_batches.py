"""Helpers of the evaluation tests: small picture batches with structure, and `fitscale` run as a
command (a fresh process, as a user runs it)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from PIL import Image


def smooth_pictures(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """(count, size, size, 3) uint8 pictures with structure (upsampled 8 x 8 noise, varied
    brightness), not white noise."""
    coarse = rng.integers(0, 256, (count, 3, 8, 8)).astype(np.float32)
    coarse *= rng.uniform(0.3, 1.0, (count, 1, 1, 1))
    pictures = [
        np.asarray(Image.fromarray(c.transpose(1, 2, 0).astype(np.uint8)).resize((size, size), Image.BICUBIC))
        for c in coarse
    ]
    return np.stack(pictures)


def fitscale(*argv, env: dict | None = None, prefix: tuple = (), timeout: float = 900) -> str:
    """stdout of `[prefix...] python -m fitscale.cli ARGV` (os.environ updated by `env`); asserts
    exit status 0 and shows stderr otherwise. `prefix` runs it under another command (srun)."""
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "fitscale.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
