"""MXFP4 dequantisation of the GPT-OSS expert weights (NumPy, chunked), bit-exact with transformers.

MXFP4 (OCP microscaling): blocks of 32 FP4 E2M1 values share one power-of-two scale stored as a biased uint8
exponent (bias 127). Each uint8 of `*_blocks` packs two FP4 codes, the low nibble first. The checkpoint layout is

    blocks uint8 [..., R, G, 16]  (R output rows, G = in_features / 32 groups, 16 bytes = 32 values)
    scales uint8 [..., R, G]

and transformers' `convert_moe_packed_tensors` returns values[..., R, G * 32] transposed on its last two axes,
i.e. [..., G * 32, R] = [E, in_features, out_features], the layout of `GptOssExperts.gate_up_proj` /
`down_proj`. `dequantize_mxfp4` reproduces that (with `transpose=True`, the default).

Arithmetic, as in the reference (`torch.ldexp`): value = ldexp(lut[code], scale - 127), computed exactly (in
float64), then rounded to `dtype`; results beyond the dtype's range become +-inf, zeros stay (signed) zeros.
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np

# FP4 E2M1 code -> value; bit 3 is the sign.
FP4_VALUES = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
SCALE_BIAS = 127
BLOCK_BYTES = 16  # 32 FP4 values per scale
# 2 ** (scale - 127) for every uint8 scale, exact in float64.
_POW2 = np.ldexp(np.float64(1.0), np.arange(256) - SCALE_BIAS)
_LUT64 = FP4_VALUES.astype(np.float64)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray, dtype=ml_dtypes.bfloat16, *,
                     transpose: bool = True, rows_per_chunk: int = 1 << 16) -> np.ndarray:
    """Dequantises MXFP4 blocks.

    Args:
      blocks: uint8 [..., R, G, 16], two FP4 codes per byte (low nibble = even element).
      scales: uint8 [..., R, G], biased exponents (bias 127).
      dtype: output dtype (default bfloat16).
      transpose: swap the last two output axes, as transformers does: [..., G*32, R] (True, default) or
        [..., R, G*32] (False).
      rows_per_chunk: how many (R, G) rows to decode at once; bounds the temporary float32 memory.
    Returns:
      [..., G*32, R] (transpose=True) or [..., R, G*32] array of `dtype`.
    """
    blocks = np.asarray(blocks)
    scales = np.asarray(scales)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.ndim < 3 or blocks.shape[-1] != BLOCK_BYTES:
        raise ValueError(f"MXFP4 blocks must be [..., R, G, {BLOCK_BYTES}], got {blocks.shape}")
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {blocks.shape} do not match scales {scales.shape}")

    *lead, r, g, _ = blocks.shape
    n_lead = math.prod(lead)
    cols = g * 2 * BLOCK_BYTES
    out = np.empty((n_lead, cols, r) if transpose else (n_lead, r, cols), dtype=dtype)
    b3 = blocks.reshape(n_lead, r, g, BLOCK_BYTES)
    s3 = scales.reshape(n_lead, r, g)
    step = max(1, rows_per_chunk // max(1, g))  # R rows per chunk
    for e in range(n_lead):
        for r0 in range(0, r, step):
            r1 = min(r0 + step, r)
            blk = b3[e, r0:r1]                                   # [rc, G, 16]
            vals = np.empty((r1 - r0, g, 2 * BLOCK_BYTES), np.float64)
            vals[..., 0::2] = _LUT64[blk & 0x0F]
            vals[..., 1::2] = _LUT64[blk >> 4]
            vals *= _POW2[s3[e, r0:r1]][..., None]       # exact (ldexp)
            with np.errstate(over="ignore"):
                vals = vals.reshape(r1 - r0, cols).astype(np.float32).astype(dtype)
            if transpose:
                out[e, :, r0:r1] = vals.T
            else:
                out[e, r0:r1] = vals
    return out.reshape(*lead, *out.shape[1:])
