"""The REPA miniature (recipes/demo_repa.yaml): a stand-in for DINOv2 that fitscale trains itself.

DINOv2 has never seen 8x8 handwritten digits drawn at 32..64 pixels, and the demo downloads
nothing, so the frozen encoder of the miniature is a small timm ViT (4-pixel patches, width 64,
4 blocks) trained here once, in under a minute on a CPU core (600 steps of 64), as a classifier of scikit-learn's 1,797
real digits, each drawn at a random grid of the demo's sizes exactly as the dataset's pixels are
(fitscale.data.pixels.digit_picture). A classifier, not self-supervision: with ten classes and
1,797 images, supervision is the fastest way to patch features that tell the digits apart, which
is what class-conditional generation needs; DINO-style self-supervision would need augmentations
and far more steps for the same separation. It recognises 91-93% of held-out digits.

`prepare_repa_demo` (hooks.before) writes the digits dataset with its pixels and trains the
encoder into `train.repa.encoder_weights` unless the file is there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fitscale.data.pixels import DIGITS_PIXELS_PER_TOKEN, PIXELS_META, digit_picture, write_digit_pixels
from fitscale.flow.repa_encoder import create_encoder, encoder_input, encoder_patch_size, normalisation
from fitscale.sample.demo import prepare_digits


def prepare_repa_demo(config) -> None:
    """`hooks.before`: the digits dataset (with pixels) and the stand-in encoder, each unless present."""

    prepare_digits(config)
    if not (Path(config.data.path) / PIXELS_META).is_file():  # a digits dataset written before pixels were
        write_digit_pixels(config.data.path)
    repa = config.train.repa
    if not Path(repa.encoder_weights).is_file():
        print(
            f"fitscale train: training the stand-in encoder into {repa.encoder_weights} (hooks.before)",
            flush=True,
        )
        accuracy = train_digits_encoder(repa, repa.encoder_weights)
        print(f"fitscale train: the encoder recognises {accuracy:.1%} of held-out digits", flush=True)


def train_digits_encoder(
    repa, out: str | Path, min_side: int = 4, max_side: int = 8, steps: int = 600, seed: int = 0
) -> float:
    """Train `repa.encoder` (with `repa.encoder_args`) as a digit classifier on pixels drawn like the
    dataset's; save its state dict without the head to `out` (.safetensors); return the accuracy on
    the held-out fifth of the digits (trained on the other four fifths)."""
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    digits = load_digits()
    order = rng.permutation(len(digits.images))
    held_out, train = order[: len(order) // 5], order[len(order) // 5 :]
    model = create_encoder(repa, "cpu", num_classes=10)
    patch = encoder_patch_size(model)
    mean, std = normalisation(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)

    def batch(indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        pictures = np.stack(
            [digit_picture(digits.images[i], rows, cols, DIGITS_PIXELS_PER_TOKEN) for i in indices]
        )
        pixels = torch.from_numpy(np.repeat(pictures[..., None], 3, axis=-1))
        return encoder_input(pixels, rows, cols, patch, mean, std), torch.from_numpy(digits.target[indices])

    model.train()
    for _ in range(steps):
        images, labels = batch(rng.choice(train, size=64))
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for chunk in np.array_split(held_out, 8):
            images, labels = batch(chunk)
            correct += int((model(images).argmax(1) == labels).sum())
    model.reset_classifier(0)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return correct / len(held_out)
