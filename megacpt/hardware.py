"""Device facts used for MFU: dense bf16 peak FLOP/s by device name (one source of truth).

MFU = achieved model FLOP/s (from `ModelConfig.flops_per_token`) / this peak. The table holds
dense (not sparse) tensor-core bf16 peaks from the vendors' data sheets.
"""
from __future__ import annotations

# substring of torch.cuda.get_device_name() -> dense bf16 FLOP/s
_PEAKS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
]


def peak_bf16_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak for a device name, or None when unknown (e.g. a CPU)."""
    if not device_name:
        return None
    for key, peak in _PEAKS:
        if key in device_name:
            return peak
    return None


def current_device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"
