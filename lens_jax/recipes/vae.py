"""The `vae` recipe (phase 'vae'): train a small FLUX.2-architecture VAE on the shapes world, then freeze its latent
BatchNorm statistics (LENS_SPEC §3).

Steps of `run(config, workdir)`:
  1. data: shapes-world renders (`lens_jax.data.synthetic`), uint8 -> float32 in [-1, 1], [B, S, S, 3];
     training indices [0, data.num_examples), held-out indices after them;
  2. train `FluxVAE` as net 'vae' of the shared trainer (lens_jax/train/: config.optim through train/optim.py,
     a one-device mesh, checkpoints every `checkpoint_every` steps and exact resume); loss = l1 * mean|x - x'|
     + l2 * mean (x - x')^2 + kl * KL, the KL summed over latent elements and averaged over the batch; one
     JSON line per logged step in `workdir/metrics.jsonl`;
  3. latent statistics: per packed channel mean and (population) variance of `patchify(encode(x))` (posterior
     mode) over `stats_examples` training images, stored in the `latent_stats` collection;
  4. checks: held-out reconstruction PSNR (posterior mode, clamped, dB on the [0, 1] scale), and the
     normalised held-out latents' mean / std (should be ~0 / ~1);
  5. outputs: the Orbax weights checkpoint (`orbax_io.save_weights`, kind `flux2_vae`, so
     `convert.load_converted` restores it), `workdir/vae_reconstructions.png` (top row originals, bottom row
     reconstructions) and `workdir/vae_summary.json`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import time
import zlib
from typing import Any, Dict, Iterator, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lens_jax.checkpoints import orbax_io
from lens_jax.configs.base import ConfigError, validate_trainer
from lens_jax.data import synthetic
from lens_jax.models.vae import FluxVAE, VAEConfig, normalize_latents, patchify, vae_config
from lens_jax.train import sharding as sharding_lib
from lens_jax.train.loop import LoopOptions, StepIndexedSource
from lens_jax.train.optim import make_optimizer, validate_optim
from lens_jax.train.sharding import VAE_RULES
from lens_jax.train.state import Net, TrainSpec
from lens_jax.train.step import Objective
from lens_jax.train.trainer import fit, one_device_mesh

CHECKPOINT_KIND = "flux2_vae"
SUMMARY_FILE = "vae_summary.json"
PNG_FILE = "vae_reconstructions.png"


# ----------------------------------------------------------------------------------------------------
# Configuration


def build_vae_config(config) -> VAEConfig:
    """`config.vae` (preset + VAEConfig field overrides) -> VAEConfig; raises ConfigError naming the field."""
    fields = {k: v for k, v in config.vae.items() if k != "preset"}
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items()}
    try:
        return vae_config(config.vae.preset, **fields)
    except ValueError as e:
        raise ConfigError(f"config.vae: {e}") from None


def validate(config) -> VAEConfig:
    """Checks the phase's config once; returns the VAE architecture. Raises ConfigError naming the option."""
    vcfg = build_vae_config(config)
    multiple = vcfg.downsample_factor * vcfg.patch_size[0]
    if config.data.image_size <= 0 or config.data.image_size % multiple:
        raise ConfigError(f"config.data.image_size={config.data.image_size} must be a positive multiple of "
                          f"{multiple} (VAE downsampling x patch size)")
    for key in ("batch_size", "num_steps", "log_every", "stats_examples", "eval_batch_size", "num_png_images"):
        if int(config[key]) < 1:
            raise ConfigError(f"config.{key}={config[key]} must be >= 1")
    for key in ("num_examples", "eval_examples"):
        if int(config.data[key]) < 1:
            raise ConfigError(f"config.data.{key}={config.data[key]} must be >= 1")
    if config.stats_examples > config.data.num_examples:
        raise ConfigError(f"config.stats_examples={config.stats_examples} exceeds config.data.num_examples="
                          f"{config.data.num_examples}")
    validate_optim(config.optim)
    validate_trainer(config)
    for key in ("l1_weight", "l2_weight", "kl_weight"):
        if config.loss[key] < 0:
            raise ConfigError(f"config.loss.{key}={config.loss[key]} must be >= 0")
    if config.loss.l1_weight + config.loss.l2_weight <= 0:
        raise ConfigError("config.loss.l1_weight + config.loss.l2_weight must be > 0")
    return vcfg


def shapes_config(config) -> synthetic.ShapesWorldConfig:
    return synthetic.world_config(config.data.world, image_size=int(config.data.image_size), seed=int(config.data.seed))


# ----------------------------------------------------------------------------------------------------
# Data


def render_images(cfg: synthetic.ShapesWorldConfig, indices) -> np.ndarray:
    """Shapes-world images for `indices`: float32 [N, S, S, 3] in [-1, 1]."""
    imgs = np.stack([synthetic.example(int(i), cfg)["image"] for i in indices])
    return imgs.astype(np.float32) / 127.5 - 1.0


def train_source(cfg: synthetic.ShapesWorldConfig, num_examples: int, batch_size: int, seed: int,
                 step: int = 0) -> StepIndexedSource:
    """Endless shuffled training batches {'images': float32 [batch_size, S, S, 3] in [-1, 1]}: batch i is a pure
    function of (seed, i) (the Grain pipeline `synthetic.make_grain_dataset`, repeat before batch, each epoch
    reshuffled), so a resumed run sees the same batches."""
    ds = synthetic.make_grain_dataset(cfg, num_examples, batch_size, seed=seed, caption="brief", shuffle=True,
                                      num_epochs=None, image_format="float32")
    return StepIndexedSource(lambda i: {"images": np.asarray(ds[i]["image"], np.float32)}, step=step)


# ----------------------------------------------------------------------------------------------------
# Losses and metrics


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent elements: [B,h,w,C] x2 -> [B] (nats)."""
    mean = mean.astype(jnp.float32)
    logvar = logvar.astype(jnp.float32)
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image PSNR in dB of images in [-1, 1] measured on the [0, 1] scale (peak 1): [B,...] x2 -> [B]."""
    mse = jnp.mean(jnp.square((x.astype(jnp.float32) - y.astype(jnp.float32)) / 2.0),
                   axis=tuple(range(1, x.ndim)))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def vae_objective(model: FluxVAE, loss_cfg) -> Objective:
    """loss = l1 * mean|x - x'| + l2 * mean (x - x')^2 + kl * KL of net 'vae' (metrics recon, l1, l2, kl, psnr,
    logvar); `sample_posterior` decodes a posterior sample instead of the mode."""
    l1_w, l2_w, kl_w = float(loss_cfg.l1_weight), float(loss_cfg.l2_weight), float(loss_cfg.kl_weight)
    sample = bool(loss_cfg.sample_posterior)

    def loss_fn(params, batch, rng):
        p = {"params": params["vae"]}
        images = batch["images"]
        mean, logvar = model.apply(p, images, method=FluxVAE.encode_moments)
        z = mean
        if sample:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        recon = model.apply(p, z, method=FluxVAE.decode).astype(jnp.float32)
        err = recon - images
        l1 = jnp.mean(jnp.abs(err))
        l2 = jnp.mean(jnp.square(err))
        kl = jnp.mean(kl_divergence(mean, logvar))
        rec = l1_w * l1 + l2_w * l2
        loss = rec + kl_w * kl
        p_db = jnp.mean(psnr(jnp.clip(recon, -1.0, 1.0), images))
        return loss, dict(recon=rec, l1=l1, l2=l2, kl=kl, psnr=p_db, logvar=jnp.mean(logvar))

    return Objective(loss_fn=loss_fn, updates=("vae",), name="vae")


# ----------------------------------------------------------------------------------------------------
# Latent statistics and evaluation


def latent_statistics(encode_fn, images_iter, packed_channels: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """Per packed channel mean and population variance over every position of every image.

    encode_fn: images [B,S,S,3] -> packed latents [B,h,w,K]. Accumulates in float64 with a shifted
    (first-batch mean) sum of squares for stability. Returns (mean [K], var [K], number of positions).
    """
    shift = None
    n = 0
    s1 = np.zeros(packed_channels, np.float64)
    s2 = np.zeros(packed_channels, np.float64)
    for images in images_iter:
        zp = np.asarray(jax.device_get(encode_fn(images)), np.float64).reshape(-1, packed_channels)
        if shift is None:
            shift = zp.mean(axis=0)
        d = zp - shift
        s1 += d.sum(axis=0)
        s2 += np.square(d).sum(axis=0)
        n += zp.shape[0]
    m = s1 / n
    return shift + m, np.maximum(s2 / n - np.square(m), 0.0), n


def batched(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]


# ----------------------------------------------------------------------------------------------------
# PNG output (no imaging dependency)


def write_png(path: str, image: np.ndarray) -> None:
    """Writes uint8 [H, W, 3] as an 8-bit RGB PNG."""
    image = np.ascontiguousarray(image, np.uint8)
    h, w, c = image.shape
    if c != 3:
        raise ValueError(f"expected [H, W, 3], got {image.shape}")
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def comparison_grid(originals: np.ndarray, recons: np.ndarray, gap: int = 2) -> np.ndarray:
    """[N,S,S,3] x2 in [-1, 1] -> uint8 image with originals on top and reconstructions below."""
    def to_u8(x):
        return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    n, s = originals.shape[0], originals.shape[1]
    grid = np.full((2 * s + 3 * gap, n * s + (n + 1) * gap, 3), 128, np.uint8)
    for row, imgs in enumerate((originals, recons)):
        y = gap + row * (s + gap)
        for i in range(n):
            x = gap + i * (s + gap)
            grid[y:y + s, x:x + s] = to_u8(imgs[i])
    return grid


# ----------------------------------------------------------------------------------------------------
# The phase


def shapes_eval_ceiling(scfg: synthetic.ShapesWorldConfig, reconstruct_fn, batch_size: int,
                        prompts_per_task: int, seed: int = 0) -> Dict[str, Any]:
    """ShapesEval of VAE-reconstructed ground-truth renders of the evaluation prompts (random backgrounds).

    reconstruct_fn: float32 images [b, H, W, 3] in [-1, 1] -> reconstructions, same shape. Returns
    {} when prompts_per_task <= 0, else {'overall', 'tasks', 'integrity', 'num_images'}.
    """
    if prompts_per_task <= 0:
        return {}
    from lens_jax.eval import shapes_eval
    prompts = shapes_eval.make_eval_prompts(scfg, seed=seed, per_task=prompts_per_task)
    rng = np.random.default_rng([seed, 0xCE11])
    gt = np.stack([shapes_eval.render_prompt_ground_truth(p, rng, scfg, background="random") for p in prompts])
    x = gt.astype(np.float32) / 127.5 - 1.0
    recon = np.concatenate([reconstruct_fn(b) for b in batched(x, batch_size)])
    res = shapes_eval.evaluate([[r] for r in recon], prompts)
    return dict(overall=res["overall"], tasks=res["tasks"], integrity=res["integrity"], num_images=len(prompts))


def run(config, workdir: str) -> Dict[str, Any]:
    """Trains the VAE, computes its latent statistics, writes checkpoint / metrics / PNG / summary.

    Returns the summary dict (also written to `workdir/vae_summary.json`).
    """
    vcfg = validate(config)
    t_start = time.time()
    os.makedirs(workdir, exist_ok=True)
    ckpt_dir = config.output_dir or os.path.join(workdir, "vae")
    scfg = shapes_config(config)
    image_size = int(config.data.image_size)
    num_examples = int(config.data.num_examples)
    num_steps = int(config.num_steps)
    batch_size = int(config.batch_size)

    model = FluxVAE(vcfg)
    mesh = one_device_mesh()
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    tx, schedule = make_optimizer(config.optim, num_steps)
    # The parameters come from the first half of split(key(seed)) (the shipped VAE's initialisation).
    spec = TrainSpec([Net("vae", init=lambda key: model.init(jax.random.split(key)[0], dummy)["params"],
                          rules=VAE_RULES, optimizer=tx, schedule=schedule)], seed=int(config.seed))
    num_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(spec.abstract(mesh)[0]["nets"]["vae"]["params"])))
    print(f"[vae] {num_params:,} parameters, latent {vcfg.latent_channels} ch -> {vcfg.packed_channels} packed; "
          f"{image_size}px, batch {batch_size}, {num_steps} steps", flush=True)

    def make_source(start):
        return train_source(scfg, num_examples, batch_size, int(config.seed), step=start.step)

    t_train = time.time()
    result = fit(config, workdir, spec, [vae_objective(model, config.loss)], make_source, mesh=mesh,
                 batch_shardings={"images": sharding_lib.batch_sharding(mesh, 4)},
                 options=LoopOptions(num_steps=num_steps, log_every=int(config.log_every),
                                     max_nonfinite_steps=int(config.max_nonfinite_steps)),
                 say=lambda m: print(f"[vae] {m}", flush=True))
    if result.preempted:
        print(f"[vae] stopped by SIGTERM at step {result.step}; rerun the same command to resume", flush=True)
        return dict(preempted=True, step=result.step)
    train_s = time.time() - t_train
    last: Dict[str, float] = result.loop.last_metrics
    params = result.state["nets"]["vae"]["params"]

    # Posterior-mode encode to packed latents, and mode reconstructions, jitted on the mesh.
    encode_packed = jax.jit(
        lambda p, x: patchify(model.apply({"params": p}, x, method=FluxVAE.encode), vcfg.patch_size))
    reconstruct = jax.jit(
        lambda p, x: jnp.clip(model.apply({"params": p}, x), -1.0, 1.0))

    def put(x):
        return jax.device_put(x, replicated)

    ebs = int(config.eval_batch_size)
    stats_images = (render_images(scfg, range(i, min(i + ebs, config.stats_examples)))
                    for i in range(0, config.stats_examples, ebs))
    with jax.transfer_guard("disallow"):
        mean, var, n_pos = latent_statistics(lambda x: encode_packed(params, put(x)), stats_images,
                                             vcfg.packed_channels)
    latent_stats = {"mean": mean.astype(np.float32), "var": var.astype(np.float32)}

    # Held-out evaluation: reconstruction PSNR and normalised-latent moments.
    heldout = render_images(scfg, range(num_examples, num_examples + int(config.data.eval_examples)))
    recons, zs = [], []
    with jax.transfer_guard("disallow"):
        for x in batched(heldout, ebs):
            recons.append(np.asarray(jax.device_get(reconstruct(params, put(x)))))
            zs.append(np.asarray(jax.device_get(encode_packed(params, put(x)))))
    recons = np.concatenate(recons)
    zn = np.asarray(normalize_latents(jnp.asarray(np.concatenate(zs)), latent_stats["mean"], latent_stats["var"],
                                      vcfg.batch_norm_eps), np.float64).reshape(-1, vcfg.packed_channels)
    per_image_psnr = np.asarray(psnr(jnp.asarray(recons), jnp.asarray(heldout)), np.float64)
    mse = float(np.mean(np.square((recons - heldout) / 2.0)))
    norm_check = dict(mean=float(zn.mean()), std=float(zn.std()),
                      max_abs_channel_mean=float(np.abs(zn.mean(axis=0)).max()),
                      min_channel_std=float(zn.std(axis=0).min()), max_channel_std=float(zn.std(axis=0).max()))
    if abs(norm_check["mean"]) > 0.25 or not 0.75 <= norm_check["std"] <= 1.33:
        logging.warning("normalised held-out latents are off: %s", norm_check)
    print(f"[vae] held-out PSNR {per_image_psnr.mean():.2f} dB over {len(heldout)} images; normalised latents "
          f"mean {norm_check['mean']:+.4f} std {norm_check['std']:.4f} "
          f"(per channel |mean| <= {norm_check['max_abs_channel_mean']:.3f}, std in "
          f"[{norm_check['min_channel_std']:.3f}, {norm_check['max_channel_std']:.3f}])", flush=True)

    # ShapesEval ceiling: ground-truth renders of the evaluation prompts, reconstructed by this VAE and
    # scored like generated samples. No DiT using this VAE can score higher on ShapesEval.
    ceiling = shapes_eval_ceiling(scfg, lambda x: np.asarray(jax.device_get(reconstruct(params, put(x)))), ebs,
                                  int(config.ceiling_prompts_per_task))
    if ceiling:
        print(f"[vae] ShapesEval ceiling (reconstructed ground truth): overall {ceiling['overall']:.3f} ("
              + " ".join(f"{t}={v:.3f}" for t, v in ceiling["tasks"].items()) + ")", flush=True)

    # Outputs.
    k = min(int(config.num_png_images), len(heldout))
    write_png(os.path.join(workdir, PNG_FILE), comparison_grid(heldout[:k], recons[:k]))
    summary = dict(
        name=config.name, image_size=image_size, latent_channels=vcfg.latent_channels,
        packed_channels=vcfg.packed_channels, num_parameters=num_params, num_steps=num_steps,
        batch_size=batch_size, train_s=train_s,
        final_train_metrics=last,
        heldout=dict(num_images=len(heldout), first_index=num_examples, psnr_db=float(per_image_psnr.mean()),
                     psnr_db_min=float(per_image_psnr.min()), psnr_of_mean_mse_db=float(-10 * np.log10(mse)),
                     normalized_latents=norm_check),
        shapes_eval_ceiling=ceiling,
        latent_stats=dict(num_images=int(config.stats_examples), num_positions=int(n_pos),
                          mean_min=float(mean.min()), mean_max=float(mean.max()), mean_abs_mean=float(np.abs(mean).mean()),
                          var_min=float(var.min()), var_max=float(var.max()), var_mean=float(var.mean())),
        checkpoint=os.path.abspath(ckpt_dir),
    )
    out_vars = {"params": jax.device_get(params), "latent_stats": latent_stats}
    meta = dict(kind=CHECKPOINT_KIND, preset=config.vae.preset, config=dataclasses.asdict(vcfg),
                source="lens_jax.recipes.vae", dtype="float32", num_parameters=num_params,
                training=dict(name=config.name, image_size=image_size, num_steps=num_steps, batch_size=batch_size,
                              data_seed=int(config.data.seed), num_examples=num_examples, seed=int(config.seed),
                              stats_examples=int(config.stats_examples),
                              heldout_psnr_db=summary["heldout"]["psnr_db"]))
    orbax_io.save_weights(ckpt_dir, out_vars, meta, overwrite=True)
    summary["total_s"] = time.time() - t_start
    with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[vae] saved {ckpt_dir}; total {summary['total_s']:.0f}s", flush=True)
    return summary
