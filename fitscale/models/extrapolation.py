"""The release's sampling flags for RoPE extrapolation, as ModelConfig overrides.

whlzy/FiT `sample_fitv2_ddp.py` picks the RoPE of a run with `--interpolation`, `--decouple` and
`--ori-max-pe-len`, then builds the model with fixed frequencies for the requested grid
(`custom_freqs`, `decouple`, `ori_max_pe_len`, `max_pe_len_h/w` = the grid in tokens,
`online_rope=False`; `--interpolation no` means plain RoPE). It has no attention-scale flag: the
attention scale is part of `ntkpro1` / `ntkpro2`.

fitscale's per-image frequencies give every image exactly the release's fixed-frequency tables for
its own grid (fitscale.models.rope), so the overrides choose per-image frequencies: each size in a
packed batch is sampled as the release's script samples it alone, and one run can mix sizes.
"""

from __future__ import annotations

from fitscale.errors import UserError

# --interpolation value -> ModelConfig.rope_method (the release maps it to custom_freqs the same way).
INTERPOLATIONS = {
    "no": "none",
    "linear": "linear",
    "dynntk": "ntk",
    "partntk": "ntk_by_parts",
    "yarn": "yarn",
    "ntkpro1": "ntk_pro1",
    "ntkpro2": "ntk_pro2",
}


def release_sampling_overrides(
    interpolation: str, decouple: bool = False, ori_max_pe_len: int | None = None
) -> dict:
    """ModelConfig overrides for the release sampling script's `--interpolation`, `--decouple` and
    `--ori-max-pe-len` (the training grid edge L0 in tokens; None keeps the model's own).

    Raises ValueError naming the flag for an unknown interpolation, an L0 below 1, or L0 = 1 with
    ntkpro1/ntkpro2 (whose factor divides by ln L0).
    """
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"--interpolation {interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")
    method = INTERPOLATIONS[interpolation]
    overrides = {
        "rope_method": method,
        "rope_decoupled": bool(decouple),
        "rope_attn_scale": False,
        "rope_per_image": method != "none",
        "rope_target_grid": None,
    }
    if ori_max_pe_len is not None:
        if isinstance(ori_max_pe_len, bool) or not isinstance(ori_max_pe_len, int) or ori_max_pe_len < 1:
            raise UserError(
                f"--ori-max-pe-len {ori_max_pe_len!r}: give the training grid edge in tokens, "
                "an integer of 1 or more (16 for the 256-token models)"
            )
        if ori_max_pe_len == 1 and method in ("ntk_pro1", "ntk_pro2"):
            raise UserError(
                f"--ori-max-pe-len 1 with --interpolation {interpolation} divides by ln(1) = 0: use 2 or more"
            )
        overrides["rope_base_grid"] = ori_max_pe_len
    return overrides


__all__ = ["INTERPOLATIONS", "release_sampling_overrides"]
