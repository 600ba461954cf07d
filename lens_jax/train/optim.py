"""The one optimiser and learning-rate builder of every phase and recipe (LENS_SPEC §6.1, §12.2).

    tx, schedule = make_optimizer(config.optim, num_steps)

`config.optim` (configs/base.optim_config): lr, b1, b2, eps, weight_decay, clip_norm (> 0: clip by global
norm first), warmup_steps (linear from 0), schedule ('constant' | 'cosine'), final_lr_fraction (the cosine's
end value as a fraction of lr), policy.

`policy` is a big_vision-style declarative optimiser policy over parameter paths: a sequence of
(regex, lr_multiplier) pairs, the first `re.fullmatch` on the '/'-joined path wins; a multiplier of None freezes
what matches (no gradient, no optimiser state); a path no regex matches trains at multiplier 1. () trains
everything. The trainer splits a net by it (lens_jax/train/state.py `partition`); `make_optimizer` applies the
per-path learning-rate multipliers.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Tuple

import jax
import optax

from lens_jax.configs.base import ConfigError

Policy = Sequence[Tuple[str, Optional[float]]]


def learning_rate_schedule(cfg, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps` (at most num_steps - 1), then constant or cosine to
    `final_lr_fraction * lr` at `num_steps`."""
    lr = float(cfg.lr)
    warmup = int(min(int(cfg.warmup_steps), max(int(num_steps) - 1, 0)))
    if cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(1, int(num_steps) - warmup),
                                           alpha=float(cfg.get("final_lr_fraction", 0.0)))
    else:
        raise ConfigError(f"config.optim.schedule={cfg.schedule!r}; choose 'constant' or 'cosine'")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def validate_optim(cfg, where: str = "config.optim") -> None:
    if cfg.lr <= 0:
        raise ConfigError(f"{where}.lr must be positive, got {cfg.lr}")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"{where}.warmup_steps={cfg.warmup_steps} must be >= 0")
    if not 0.0 <= float(cfg.get("final_lr_fraction", 0.0)) <= 1.0:
        raise ConfigError(f"{where}.final_lr_fraction={cfg.final_lr_fraction} must be in [0, 1]")
    if cfg.schedule not in ("constant", "cosine"):
        raise ConfigError(f"{where}.schedule={cfg.schedule!r}; choose 'constant' or 'cosine'")
    check_policy(cfg.get("policy", ()), where)


def check_policy(policy: Policy, where: str = "config.optim") -> None:
    for item in policy or ():
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ConfigError(f"{where}.policy entries are (regex, lr_multiplier or None) pairs; got {item!r}")
        pattern, mult = item
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ConfigError(f"{where}.policy: bad regex {pattern!r} ({e})") from None
        if mult is not None and float(mult) < 0:
            raise ConfigError(f"{where}.policy: multiplier {mult} for {pattern!r} must be >= 0 or None (frozen)")


def path_str(path) -> str:
    """A pytree key path as 'a/b/c' from its dict keys and sequence indices (attribute steps such as a logical-
    axis box's `.value` are left out, so boxed and unboxed trees give the same paths)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif not isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k))
    return "/".join(parts)


def policy_multiplier(policy: Policy, path: str) -> Optional[float]:
    """The lr multiplier of a parameter path under `policy` (None = frozen)."""
    for pattern, mult in policy or ():
        if re.fullmatch(pattern, path):
            return None if mult is None else float(mult)
    return 1.0


def make_optimizer(cfg, num_steps: int) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip by global norm -> AdamW(schedule) -> per-path lr multipliers of `cfg.policy`, schedule).

    The transformation works on the trainable leaves only (the trainer never hands it frozen ones), so the
    multipliers are looked up for whatever tree it is given; multiplier 1 everywhere adds no transformation.
    """
    validate_optim(cfg)
    schedule = learning_rate_schedule(cfg, num_steps)
    chain = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    policy = tuple(tuple(p) for p in cfg.get("policy", ()) or ())
    if any(m is not None and float(m) != 1.0 for _, m in policy):
        chain.append(_scale_by_policy(policy))
    return optax.chain(*chain), schedule


def _scale_by_policy(policy: Policy) -> optax.GradientTransformation:
    def labels(tree):
        return jax.tree_util.tree_map_with_path(lambda p, _: str(policy_multiplier(policy, path_str(p)) or 0.0),
                                                tree)
    mults = {str(float(m)) for _, m in policy if m is not None} | {"1.0"}
    return optax.multi_transform({m: optax.scale(float(m)) for m in mults}, labels)
