"""Summary quantization for the summary store: int8 with per-token scales, bf16, or none.

``quantize_int8``/``dequantize_int8`` accept numpy or jax arrays (a cache build may quantize
on device); ``encode``/``decode`` turn float32 summaries into the values a store keeps and
back, for each of ``QUANTIZATIONS``.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

QUANTIZATIONS = ("int8", "bf16", "none")
STORED_DTYPE = {  # quantization -> dtype of the stored summary values
    "int8": np.dtype(np.int8),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "none": np.dtype(np.float32),
}


def _namespace(x: Any):
    """numpy, or jax.numpy for jax arrays, so a cache build can quantize on device."""
    if type(x).__module__.startswith("jax"):
        import jax.numpy as jnp  # noqa: PLC0415 - keep jax optional for host-only readers

        return jnp
    return np


def quantize_int8(x_KxD):
    """Symmetric int8 with one scale per token: x [..., K, D] -> (q int8, scale f32 [..., K]).

    scale = max|x| / 127 over a token's D values, so |x - q * scale| <= scale / 2. All-zero
    tokens get scale 1 (no division by zero) and still dequantize to exactly 0.
    """
    xp = _namespace(x_KxD)
    x = xp.asarray(x_KxD, dtype=xp.float32)
    amax = xp.max(xp.abs(x), axis=-1)
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    q = xp.clip(xp.round(x / scale[..., None]), -127, 127).astype(xp.int8)
    return q, scale


def dequantize_int8(q_KxD, scale_K):
    """Inverse of `quantize_int8`: q [..., K, D] int8, scale [..., K] -> float32."""
    xp = _namespace(q_KxD)
    return q_KxD.astype(xp.float32) * xp.asarray(scale_K, dtype=xp.float32)[..., None]


def encode(summaries: np.ndarray, quantization: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Summaries f32 -> (stored values, scale or None) for the given quantization."""
    if quantization == "int8":
        return quantize_int8(summaries)
    return np.asarray(summaries).astype(STORED_DTYPE[quantization]), None


def decode(stored: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Stored values (and the int8 scale, if any) -> float32 summaries."""
    if scale is not None:
        return dequantize_int8(stored, scale)
    return stored.astype(np.float32)
