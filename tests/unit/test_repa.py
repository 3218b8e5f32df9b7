"""REPA (fitscale.flow.repa): the alignment loss of a packed batch, its inputs and their refusals.

The invariance tests use the real tiny FiT with its projector and real timm encoders (random
weights written to a local file); nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fitscale.config.errors import ConfigError
from fitscale.config.repa import RepaConfig
from fitscale.data.batch import pack_images
from fitscale.data.pixels import PixelStore, write_pixels
from fitscale.flow.repa import attach_projector, repa_loss
from fitscale.models import build_model

TINY_VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
GRIDS = [(3, 5), (4, 4), (2, 6), (5, 3)]


def tiny_repa(tmp_path, **fields) -> RepaConfig:
    """A 1-block timm ViT with 4-pixel patches and its random weights in a local file."""
    import timm
    from safetensors.torch import save_file

    path = tmp_path / "encoder.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    values = {
        "encoder": "vit_tiny_patch16_224",
        "encoder_weights": str(path),
        "encoder_args": TINY_VIT,
        "block": 1,
    }
    return RepaConfig(**{**values, **fields})


def model_with_projector(encoder_dim: int = 24):
    torch.manual_seed(0)
    model = build_model("tiny", attn_backend="reference")
    attach_projector(
        model, RepaConfig(encoder="x", encoder_weights="x", block=1, projector_width=32), encoder_dim
    )
    return model


def packed(indices, grids=GRIDS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(r * c, 16, generator=generator) for r, c in grids]
    features = [torch.randn(r * c, 24, generator=generator) for r, c in grids]
    batch = pack_images(
        [images[i] for i in indices], [grids[i] for i in indices], [i for i in indices], list(indices)
    )
    return batch, torch.cat([features[i] for i in indices])


def alignment(model, indices, global_images):
    batch, target = packed(indices)
    t = torch.full((batch.num_segments,), 0.5)
    _, hidden = model(
        batch.tokens, t, batch.labels, batch.pos, batch.cu_seqlens, sizes=batch.sizes, hidden_after=1
    )
    return repa_loss(hidden, target, batch, global_images)


def test_packed_loss_is_the_mean_of_each_image_alone_whatever_the_split():
    model = model_with_projector()
    everything, per_image = alignment(model, [0, 1, 2, 3], 4)
    alone = torch.stack([alignment(model, [i], 1)[0] for i in range(4)])
    torch.testing.assert_close(everything, alone.mean(), rtol=0, atol=1e-6)
    torch.testing.assert_close(per_image, alone.detach(), rtol=0, atol=1e-6)
    # two micro-batches (or two ranks, whose shares the gradient reduction sums), other order
    split = alignment(model, [3, 0], 4)[0] + alignment(model, [2, 1], 4)[0]
    torch.testing.assert_close(split, everything, rtol=0, atol=1e-6)
    assert -1.0 <= float(everything.detach()) <= 1.0


def test_padding_tokens_do_not_count():
    model = model_with_projector()
    batch, target = packed([0, 1])
    padded = pack_images(
        [batch.tokens[:15], batch.tokens[15:]],
        [GRIDS[0], GRIDS[1]],
        [0, 1],
        [0, 1],
        token_budget=64,
        null_class=10,
    )
    target_padded = torch.cat([target, torch.randn(64 - 31, 24)])
    t = torch.full((padded.num_segments,), 0.5)
    _, hidden = model(
        padded.tokens, t, padded.labels, padded.pos, padded.cu_seqlens, sizes=padded.sizes, hidden_after=1
    )
    loss, _ = repa_loss(hidden, target_padded, padded, 2)
    torch.testing.assert_close(loss, alignment(model, [0, 1], 2)[0], rtol=0, atol=1e-6)


def test_default_forward_is_unchanged_and_hidden_after_checks_the_block():
    torch.manual_seed(0)
    plain = build_model("tiny", attn_backend="reference")
    model = model_with_projector()
    model.load_state_dict(
        {**plain.state_dict(), **{k: v for k, v in model.state_dict().items() if "hidden_head" in k}}
    )
    batch, _ = packed([0, 1])
    args = (batch.tokens, torch.full((2,), 0.3), batch.labels, batch.pos, batch.cu_seqlens)
    out = plain(*args)
    torch.testing.assert_close(model(*args), out, rtol=0, atol=0)
    velocity, hidden = model(*args, hidden_after=2)
    torch.testing.assert_close(velocity, out, rtol=0, atol=0)
    assert hidden.shape == (batch.num_tokens, 24)
    assert not any("hidden_head" in name for name in plain.state_dict())
    with pytest.raises(ValueError, match="hidden_after=3: the model has blocks 1..2"):
        model(*args, hidden_after=3)


def test_pixel_variants_are_the_centre_crop_and_the_mirror_of_the_stored_image(tmp_path):
    image = np.arange(4 * 8 * 6 * 8 * 3, dtype=np.int64).reshape(4 * 8, 6 * 8, 3) % 251
    image = image.astype(np.uint8)
    write_pixels(tmp_path, [(3, image, None)], pixels_per_token=8)
    store = PixelStore(tmp_path)
    np.testing.assert_array_equal(store.image(3, 4, 6), image)
    np.testing.assert_array_equal(store.image(3, 4, 6, flip=True), image[:, ::-1])
    np.testing.assert_array_equal(store.image(3, 2, 4), image[8:24, 8:40])
    with pytest.raises(ValueError, match="sample 0 has no pixels"):
        store.image(0, 2, 2)
    with pytest.raises(FileExistsError, match="has pixels already"):
        write_pixels(tmp_path, [(3, image, None)], pixels_per_token=8)


def test_encoder_features_follow_each_images_grid_and_flip(tmp_path):
    from fitscale.flow.repa_encoder import FrozenEncoder

    repa = tiny_repa(tmp_path)
    rng = np.random.default_rng(0)
    pictures = {i: rng.integers(0, 256, (r * 8, c * 8, 3), dtype=np.uint8) for i, (r, c) in enumerate(GRIDS)}
    (tmp_path / "data").mkdir()
    write_pixels(tmp_path / "data", [(i, picture, None) for i, picture in pictures.items()], 8)
    store = PixelStore(tmp_path / "data")
    encoder = FrozenEncoder(repa, torch.device("cpu"), store.pixels_per_token)
    batch, _ = packed([0, 1, 2, 3])
    batch.flips = torch.tensor([0, 1, 0, 0])
    features = encoder.features(batch, store)
    assert features.shape == (batch.num_tokens, 32)
    start = batch.cu_seqlens.tolist()
    for index, (rows, cols) in enumerate(GRIDS):
        picture = pictures[index][:, ::-1] if index == 1 else pictures[index]
        alone = encoder.encode(torch.from_numpy(np.ascontiguousarray(picture))[None], rows, cols)[0]
        torch.testing.assert_close(features[start[index] : start[index + 1]], alone, rtol=1e-5, atol=1e-5)
    assert encoder.take_seconds() > 0 and encoder.take_seconds() == 0


def test_bad_inputs_are_refused_with_one_line_naming_the_field(tmp_path):
    from fitscale.config import load_config
    from fitscale.flow.repa_encoder import FrozenEncoder, encoder_dim

    repa = tiny_repa(tmp_path)
    cases = [
        (
            tiny_repa(tmp_path, encoder="vit_nonexistent"),
            "train.repa.encoder: 'vit_nonexistent' is not a timm model",
        ),
        (
            tiny_repa(tmp_path, encoder_args={**TINY_VIT, "embed_dim": 48, "num_heads": 3}),
            "does not match encoder",
        ),
        (
            tiny_repa(tmp_path, encoder="resnet18", encoder_args={}),
            "resnet18' cannot be built .* must be a timm ViT",
        ),
        (
            tiny_repa(tmp_path, encoder_args={**TINY_VIT, "patch_size": [4, 2]}),
            "has no square patch embedding",
        ),
    ]
    for config, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            FrozenEncoder(config, torch.device("cpu"))
        assert "\n" not in str(error.value) and "train.repa." in str(error.value)
    with pytest.raises(ConfigError, match="pixels would be upsampled|each patch would be upsampled"):
        FrozenEncoder(repa, torch.device("cpu"), pixels_per_token=2)
    assert encoder_dim(repa) == 32
    with pytest.raises(ConfigError, match=r"train.repa.block=3 is outside the model's blocks 1..2"):
        load_config(None, ["model.name=tiny", "data.path=d", "data.num_classes=10", "train.repa.encoder=x",
                           "train.repa.encoder_weights=x", "train.repa.block=3"])  # fmt: skip
    with pytest.raises(
        ConfigError, match="train.repa.encoder_weights: encoder 'x' needs a local weights file"
    ):
        RepaConfig(encoder="x")


def test_a_dataset_without_pixels_is_refused_with_the_command_to_run(tmp_path):
    from fitscale.config import load_config
    from fitscale.train.repa import RepaTerm

    repa = tiny_repa(tmp_path)
    config = load_config(None, [
        "model.name=tiny", "data.num_classes=10", f"data.path={tmp_path}", f"train.repa.encoder={repa.encoder}",
        f"train.repa.encoder_weights={repa.encoder_weights}", "train.repa.block=1",
    ] + [f"train.repa.encoder_args.{k}={v}" for k, v in TINY_VIT.items()])  # fmt: skip
    with pytest.raises(
        ConfigError, match=rf"data.path={tmp_path} has no pixels .*run `fitscale data pixels {tmp_path}`"
    ):
        RepaTerm(config, torch.device("cpu"))


def test_weight_schedule_turns_the_loss_off_after_until_step():
    repa = RepaConfig(encoder="x", encoder_weights="x", weight=0.5, until_step=100)
    assert [repa.weight_at(s) for s in (0, 99, 100, 5000)] == [0.5, 0.5, 0.0, 0.0]
    assert RepaConfig(encoder="x", encoder_weights="x").weight_at(10**6) == 0.5


def test_resume_refuses_a_change_of_the_projectors_shape_and_takes_a_new_weight_or_schedule():
    from fitscale.train.resume import fixed_reason

    for field in ("train.repa.encoder", "train.repa.projector_width", "train.repa.encoder_args.embed_dim"):
        assert "projector" in fixed_reason(field, {})
    for field in (
        "train.repa.weight",
        "train.repa.until_step",
        "train.repa.block",
        "train.repa.encoder_weights",
    ):
        assert fixed_reason(field, {}) is None


def test_demo_repa_recipe_is_the_demo_with_alignment():
    from fitscale.config import load_config

    demo, repa = load_config("recipes/demo.yaml"), load_config("recipes/demo_repa.yaml")
    assert repa.train.repa.enabled and not demo.train.repa.enabled
    assert repa.train.repa.block <= repa.model_config().depth and repa.train.repa.weight == 0.5
    for section in ("model", "data", "optim", "parallel"):
        assert getattr(repa, section) == getattr(demo, section), section
    assert (repa.train.steps, repa.train.seed) == (demo.train.steps, demo.train.seed)
