"""The optimiser from `config.optim` (LENS_SPEC §6.1): clip by global norm, then AdamW."""
from __future__ import annotations

import optax

from lens_jax.configs.base import ConfigError


def learning_rate_schedule(cfg, num_steps: int) -> optax.Schedule:
    warmup = int(cfg.warmup_steps)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, max(1, num_steps - warmup))
    else:
        raise ConfigError(f"config.optim.schedule={cfg.schedule!r}; choose 'constant' or 'cosine'")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def make_optimizer(cfg, num_steps: int):
    """Returns (optimizer, lr_schedule)."""
    if cfg.lr <= 0:
        raise ConfigError(f"config.optim.lr must be positive, got {cfg.lr}")
    schedule = learning_rate_schedule(cfg, num_steps)
    chain = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    return optax.chain(*chain), schedule
