"""Analytic matmul FLOPs of the MMDiT (2 FLOPs per multiply-add), the basis of every MFU figure."""
from __future__ import annotations


def forward_flops(cfg, batch: int, n_img: int, n_txt: int) -> float:
    """FLOPs of one forward pass of `batch` examples with n_img image and n_txt text tokens each: both
    streams of every block (QKV, out-projection, SwiGLU w1/w3/w2), joint attention (QK^T and PV), the
    modulation, timestep embedding, input embeddings and the final layer."""
    d, f, n_layers = cfg.hidden, cfg.mlp_dim, cfg.num_layers
    t = n_img + n_txt
    linear = n_layers * t * 2 * (d * 3 * d + d * d + 3 * d * f)
    attention = n_layers * 2 * 2 * t * t * d
    modulation = n_layers * 2 * 2 * d * 6 * d + 2 * (cfg.timestep_dim * d + d * d) + 2 * d * 2 * d
    embed = 2 * n_img * cfg.in_channels * d + 2 * n_txt * cfg.num_text_layers * cfg.text_dim * d \
        + 2 * n_img * d * cfg.out_channels
    return float(batch * (linear + attention + modulation + embed))


def train_flops(cfg, batch: int, n_img: int, n_txt: int) -> float:
    """Model FLOPs of one training step: 3 x forward (forward + backward; remat recompute not counted)."""
    return 3.0 * forward_flops(cfg, batch, n_img, n_txt)
