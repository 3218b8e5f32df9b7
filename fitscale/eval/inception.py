"""ADM's Inception-v3 features in PyTorch: torch-fidelity's port of TensorFlow's 2015-12-05 graph
(`classify_image_graph_def.pb`, the graph ADM's evaluator loads), from a local weights file.

Per image, as ADM's `_create_feature_graph` / `_create_softmax_graph` take them:
- `pool` (2048,): `pool_3:0`, torch-fidelity's '2048' feature.
- `spatial` (2023,): `mixed_6/conv:0` cut to its first 7 channels (`spatial[..., :7]`) and flattened
  in TensorFlow's NHWC order (17 x 17 x 7). TensorFlow's `mixed`, `mixed_1`, `mixed_2` are
  torch-fidelity's Mixed_5b/c/d, `mixed_3` is Mixed_6a and `mixed_4` .. `mixed_7` are Mixed_6b .. 6e,
  so `mixed_6/conv` is Mixed_6d's 1x1 branch after its batch norm and ReLU (torch-fidelity's weight
  conversion maps `mixed_6/conv/conv2d_params` to `Mixed_6d.branch1x1.conv`); read with a forward hook.
- `softmax` (1008,): softmax of pool x W, W the weight of `softmax/logits/MatMul` without the bias,
  torch-fidelity's 'logits_unbiased'.
The network takes uint8 NCHW pictures of any size and resizes them to 299 x 299 with TensorFlow 1's
bilinear resize inside, as the graph does from ADM's float [0, 255] input.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fitscale.errors import UserError

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
# torch.hub's convention (the file name carries the first 8 hex digits of its sha256), checked here.
WEIGHTS_SHA256_PREFIX = "6726825d"
WEIGHTS_ENV = "FITSCALE_INCEPTION_WEIGHTS"
SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7]
FEATURE_WIDTHS = {"pool": 2048, "spatial": 17 * 17 * SPATIAL_CHANNELS, "softmax": 1008}


def weights_path(path: str | Path | None = None) -> Path:
    """The Inception weights file: `path`, else $FITSCALE_INCEPTION_WEIGHTS, else torch hub's cache
    (where torch-fidelity keeps it). FileNotFoundError naming the file and where to get it."""
    chosen = Path(path) if path else Path(os.environ.get(WEIGHTS_ENV) or _hub_cache())
    if not chosen.is_file():
        raise FileNotFoundError(
            f"Inception weights {chosen} not found; download {WEIGHTS_URL} (nothing is downloaded here) and "
            f"pass --inception-weights PATH or set {WEIGHTS_ENV}"
        )
    return chosen


def _hub_cache() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_weights(path: Path, expected_sha256: str | None = WEIGHTS_SHA256_PREFIX) -> str:
    """The file's sha256, after checking it starts with `expected_sha256` (default: the TF FID
    Inception's; None skips the check). ValueError naming the file, both hashes and what to do."""
    digest = file_sha256(path)
    if expected_sha256 is not None and not digest.startswith(expected_sha256.lower()):
        raise UserError(
            f"Inception weights {path}: sha256 {digest[:16]}... is not the expected {expected_sha256}...; "
            f"download {WEIGHTS_URL} again, or pass --inception-sha256 {digest[:16]} to use this file "
            "(its numbers then do not compare with published ones)"
        )
    return digest


@dataclass
class Features:
    """Features of a batch of N images, float32: pool (N, 2048), spatial (N, 2023), softmax (N, 1008)."""

    pool: np.ndarray
    spatial: np.ndarray
    softmax: np.ndarray


class InceptionFeatures:
    """torch-fidelity's FeatureExtractorInceptionV3 with a hook on Mixed_6d.branch1x1 (mixed_6/conv).

    `weights` is a local file (never downloaded); `expected_sha256` as `check_weights`.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        expected_sha256: str | None = WEIGHTS_SHA256_PREFIX,
        device: str | torch.device = "cpu",
    ):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as error:
            raise ImportError("evaluation needs torch-fidelity: pip install 'fitscale[sample]'") from error
        self.path = weights_path(weights)
        self.sha256 = check_weights(self.path, expected_sha256)
        self.comparable = self.sha256.startswith(WEIGHTS_SHA256_PREFIX)
        self.device = torch.device(device)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(self.path)
        ).to(self.device)
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, _module, _inputs, output: torch.Tensor) -> None:
        # (N, 192, 17, 17) -> TF's NHWC [..., :7] flattened: (N, 17 * 17 * 7)
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1)

    @torch.no_grad()
    def __call__(self, pictures: np.ndarray) -> Features:
        """Features of (N, H, W, 3) uint8 pictures (one batch through the network)."""
        images = torch.from_numpy(np.array(pictures, copy=True)).permute(0, 3, 1, 2).to(self.device)
        pool, logits = self.net(images)
        softmax = torch.softmax(logits, dim=1)
        return Features(
            pool.float().cpu().numpy(),
            self._spatial.float().cpu().numpy(),
            softmax.float().cpu().numpy(),
        )


def save_random_weights(path: str | Path, seed: int = 0) -> str:
    """Write a randomly initialised network of the same architecture to `path` (tests, benchmarks:
    the whole path without the real weights); returns its sha256 to pass as `expected_sha256`.
    The batch norms are calibrated on 9 random pictures, so the features vary from picture to
    picture instead of collapsing to a constant."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(seed)

    class Random(FeatureExtractorInceptionV3):
        def load_state_dict(self, *_args, **_kwargs):  # keep the random initialisation
            return None

    torch.save({}, path)  # the constructor reads a file; this one is replaced below
    net = Random("random", ["2048"], feature_extractor_weights_path=str(path))
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics = the calibration batch's
    net.train()
    generator = torch.Generator().manual_seed(seed)
    batches = [
        torch.randint(0, 256, (3, 3, n, n), generator=generator, dtype=torch.uint8) for n in (8, 32, 64)
    ]
    with torch.no_grad():
        for pictures in batches:  # smooth (upsampled) and noisy pictures
            net(pictures)
        net.eval()
        pictures = torch.cat(
            [torch.nn.functional.interpolate(p.float(), size=64).to(torch.uint8) for p in batches]
        )
        # Pool features of the real network's size (mean ~0.4: float16 distances stay finite) and
        # logits of a few units (no softmax entry rounds to 0): rescale the last block and the fc.
        pool = net(pictures)[0]
        for module in net.Mixed_7c.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.mul_(0.4 / pool.mean())
                module.bias.mul_(0.4 / pool.mean())
        pool = net(pictures)[0]
        net.fc.weight.mul_(2.0 / (pool @ net.fc.weight.T).std())
    torch.save(net.state_dict(), path)
    return file_sha256(Path(path))
