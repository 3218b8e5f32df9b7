"""Failing-test candidates found by breaking the FiT v1 / DDPM work (expected behaviour, not yet built).

A ddpm model with one latent channel can be guided: the release's `forward_with_cfg` guides
model_out[:, :3 p^2], i.e. every value of a 1-channel token; `fitscale sample --sampler ddpm`
forces guidance_channels=3 and refuses with "guidance_channels=3 does not fit tokens of 4 values".
"""

from __future__ import annotations

import pytest
import torch

from fitscale.flow.guidance import guide


@pytest.mark.xfail(strict=True, reason="guide() refuses 3 channels on tokens of fewer values")
def test_release_guidance_of_a_one_channel_model_guides_every_value():
    cond, uncond = torch.ones(5, 4), torch.zeros(5, 4)  # p = 2, C = 1: 4 values per token
    # the release: C_cfg = 3 * p * p = 12; model_out[:, :12] is all 4 values
    assert torch.equal(guide(cond, uncond, 3.0, guidance_channels=3, patch_size=2), torch.full((5, 4), 3.0))
