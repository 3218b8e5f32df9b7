"""Peak throughput of accelerators, the denominator of MFU (model FLOPs utilisation).

Dense (no sparsity) bf16 tensor-core peak per device in FLOP/s, from NVIDIA's data sheets.
Torch-free, so that planning commands (`fitscale sweep plan`) read it without importing torch.
"""

from __future__ import annotations

# Matched against torch.cuda.get_device_name in order, so specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 989e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("4090", 165e12),  # GeForce RTX 4090, bf16 with fp32 accumulation
    ("V100", 125e12),  # fp16; V100 has no bf16
)


def lookup_peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device name such as "NVIDIA H100 80GB HBM3"; None if not listed."""
    name = device_name.upper()
    for key, flops in PEAK_BF16_FLOPS:
        if key.upper() in name:
            return flops
    return None


H100_BF16_PEAK: float = dict(PEAK_BF16_FLOPS)["H100"]  # the reference GPU of the paper's runs (SXM)
