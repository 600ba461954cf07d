"""Distillation to a few-step student (LENS_SPEC §10): decoupled-DMD with a DMD2 fake score, a discriminator head
on the frozen teacher's features with the approximate R1 penalty, TTUR and SenseFlow IDA, as two objectives of
the trainer (lens_jax/train/step.py).

Nets (lens_jax/phases/distill.py builds them): 'student' G_theta and 'fake' s_phi (both DiTs initialised from
the same checkpoint, trained), 'disc' D_eta (a `FeatureDiscriminator` on teacher features, trained) and
'teacher' (the frozen DiT, run with CFG w). All four DiTs are the same MMDiT module.

The student's sample x0_hat [B, N, C]: K start levels sigma_0 = 1 > ... > sigma_{K-1} (the 4-step sampler grid
without its final 0); each example draws a step k in {0..K-1}; its input x_k is
  * backward simulation (DMD2): the student's own Euler trajectory from N(0, I) noise to sigma_k (no gradient),
    which is exactly what the Turbo sampler computes at inference;
  * otherwise: the batch's real latents noised to sigma_k;
then x0_hat = X0(v_theta(x_k, sigma_k, c)) with X0(v; x_t, t) = x_t - t v (gradient through this call only).

Losses (per example, means over valid image tokens x channels; q_t(x) = (1 - t) x + t eps):
  g_DM = X0(v_T(x_t1, t1, c)) - X0(s_phi(x_t1, t1, c))                    x_t1 = q_t1(sg x0_hat)
  g_CA = (w - 1) [X0(v_T(x_t2, t2, c)) - X0(v_T(x_t2, t2, 0))]            x_t2 = q_t2(sg x0_hat)
         (cfg_rescale: X0(v_cfg) - X0(v_T(x_t2, t2, c)), v_cfg the sampler's guided velocity with its per-token
         norm rescale, LENS_SPEC §7.3, so the target is the distribution the guided teacher samples)
  L_DM = 1/2 |x0_hat - sg(x0_hat + g_DM / n1)|^2,  L_CA likewise with g_CA / n2, where n1 (n2) is the mean
         |x0_hat - X0(v_T(x_t1 (x_t2), c))| of the example (DMD2's normaliser; `normalise=False`: 1)
  L_G  = softplus(-d(q_t(x0_hat)))       d(x) = D_eta(teacher features of x at t, c): the gradient reaches
         x0_hat through the frozen teacher
  L_student = lambda_d (L_DM + L_CA) + lambda_g L_G
  L_fake = |s_phi(q_t(sg x0_hat), t, c) - (eps - sg x0_hat)|^2            (flow matching on student samples)
  L_D = softplus(-d(q_t(x_real))) + softplus(d(q_t(sg x0_hat))) + gamma/2 (d(q_t(x_real)) - d(q_t(x_real) + alpha eps'))^2
        (real and fake noised at the same t; the last term is the approximate R1 penalty)
The empty condition 0 is zero features with an all-false mask (LENS_SPEC §4.4). DM + CA at t1 = t2 without
normalisers is X0 of the CFG teacher minus X0 of the fake score: zero when the student's distribution is the
CFG teacher's (tests/test_distill.py checks it on a toy problem).

Step (one jitted train step): the 'critic' objective (L_fake + L_D, updating 'fake' and 'disc') `ttur` times, each
with fresh student samples and noise, then the 'student' objective once, then IDA phi <- (1 - m) phi + m theta
(m = 0.03) as the student objective's `after_fn`. The teacher is a constant of both objectives.

Times t1, t2, the fake score's t and the adversarial t are drawn uniformly in their (lo, hi) ranges (LENS_SPEC
§10.5: not published), optionally shifted by mu (logit(t') = logit(t) + mu).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lens_jax.diffusion.rollout import masked_token_mean
from lens_jax.models.layers import Dense
from lens_jax.models.mmdit import timestep_features
from lens_jax.train.step import Objective, rules_context

NETS = ("student", "fake", "disc", "teacher")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The recipe's constants (module docstring); defaults are LENS_SPEC §10's."""
    student_sigmas: Tuple[float, ...]            # K start levels, sigma_0 = 1 > ... > sigma_{K-1} > 0
    feature_layers: Tuple[int, ...]              # teacher blocks the discriminator reads
    guidance: float = 5.0                        # teacher CFG w
    lambda_d: float = 0.1
    lambda_g: float = 1e-3
    r1_gamma: float = 1.0
    r1_alpha: float = 0.1
    backward_simulation: bool = True
    cfg_rescale: bool = True                     # the guided teacher as the sampler guides (per-token norm rescale)
    normalise: bool = True                       # DMD2 normalisers n1, n2 (else 1)
    t_dm: Tuple[float, float] = (0.02, 0.98)
    t_ca: Tuple[float, float] = (0.02, 0.98)
    t_fake: Tuple[float, float] = (0.02, 0.98)
    t_adv: Tuple[float, float] = (0.02, 0.98)
    time_mu: float = 0.0                         # logit shift of every drawn t (0 = none)
    ida_mix: float = 0.03                        # phi <- (1 - m) phi + m theta after each student update
    sequential_teacher: bool = False             # the teacher's multi-batch calls one batch at a time (memory)
    normaliser_floor: float = 1e-6

    def __post_init__(self):
        s = tuple(float(x) for x in self.student_sigmas)
        if not s or abs(s[0] - 1.0) > 1e-6 or any(b >= a for a, b in zip(s, s[1:])) or s[-1] <= 0:
            raise ValueError(f"student_sigmas={s}: a decreasing grid starting at 1 with every level > 0 expected")
        if not self.feature_layers:
            raise ValueError("feature_layers is empty: the discriminator needs at least one teacher block")
        for name in ("t_dm", "t_ca", "t_fake", "t_adv"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo < hi < 1.0:
                raise ValueError(f"{name}=({lo}, {hi}): 0 < lo < hi < 1 expected")
        if self.guidance < 1.0:
            raise ValueError(f"teacher guidance {self.guidance} must be >= 1")
        for name in ("lambda_d", "lambda_g", "r1_gamma", "r1_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0.0 <= self.ida_mix <= 1.0:
            raise ValueError(f"ida_mix={self.ida_mix} must be in [0, 1]")


class FeatureDiscriminator(nn.Module):
    """D_eta: a logit [B] from teacher features (LENS_SPEC §10.5 leaves the head open; this is lens_jax's).

    Per tapped block f [B, N, D]: LayerNorm (no affine) -> Dense(width) + Dense(width)(timestep features of
    sigma) -> SiLU -> Dense(width) -> SiLU -> Dense(1), a logit per token; the mean over valid tokens (img_mask)
    and then over the tapped blocks.
    """
    num_features: int
    width: int = 256
    timestep_dim: int = 256
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], sigma: jax.Array, img_mask: Optional[jax.Array] = None):
        if len(feats) != self.num_features:
            raise ValueError(f"the discriminator reads {self.num_features} feature maps, got {len(feats)}")
        kw = dict(dtype=jnp.float32, param_dtype=self.param_dtype)
        temb = timestep_features(sigma.astype(jnp.float32), self.timestep_dim)
        logits = []
        for i, f in enumerate(feats):
            f = f.astype(jnp.float32)
            mu = jnp.mean(f, axis=-1, keepdims=True)
            h = (f - mu) * jax.lax.rsqrt(jnp.mean(jnp.square(f - mu), axis=-1, keepdims=True) + 1e-6)
            h = Dense(self.width, ("embed", "mlp"), name=f"head{i}_in", **kw)(h)
            h = h + Dense(self.width, ("time_freq", "mlp"), name=f"head{i}_time", **kw)(temb)[:, None, :]
            h = Dense(self.width, ("mlp", "out_channels"), name=f"head{i}_hidden", **kw)(nn.silu(h))
            tok = Dense(1, ("in_channels", "out_channels"), name=f"head{i}_out", **kw)(nn.silu(h))[..., 0]
            logits.append(masked_token_mean(tok, img_mask))
        return jnp.mean(jnp.stack(logits), axis=0)


# ----------------------------------------------------------------------------- pieces

def x0_of(x_t, t, v):
    """X0(v; x_t, t) = x_t - t v, t [B] broadcast over tokens and channels."""
    return x_t - t[:, None, None] * v


def noised(x0, eps, t):
    """q_t(x0) = (1 - t) x0 + t eps."""
    tt = t[:, None, None]
    return (1.0 - tt) * x0 + tt * eps


def draw_times(key, b: int, bounds: Tuple[float, float], mu: float = 0.0):
    t = jax.random.uniform(key, (b,), jnp.float32, bounds[0], bounds[1])
    if mu:
        t = jax.nn.sigmoid(jax.scipy.special.logit(t) + mu)
    return t


def make_apply(model, rules=None) -> Callable:
    """apply(params, batch, x, sigma, uncond=False, features=()) -> v [B, N, C] (and the tapped features): the
    MMDiT on the batch's positions, text (zeros + all-false mask when uncond) and image mask."""
    def apply(params, batch, x, sigma, uncond: bool = False, features: Tuple[int, ...] = ()):
        txt, tmask = batch["txt"], batch["txt_mask"]
        if uncond:
            txt, tmask = jnp.zeros_like(txt), jnp.zeros_like(tmask)
        kw = {"img_mask": batch["img_mask"]} if "img_mask" in batch else {}
        with rules_context(rules):
            out = model.apply({"params": params}, x, batch["img_pos"], txt, tmask, sigma, features=features, **kw)
        if features:
            return out[0].astype(jnp.float32), out[1]
        return out.astype(jnp.float32)
    return apply


def _repeat(batch, n: int):
    """The batch's conditioning fields repeated n times along the batch axis."""
    return {k: jnp.concatenate([v] * n, 0) for k, v in batch.items() if k in ("txt", "txt_mask", "img_pos", "img_mask")}


def _zero_padded(x, batch, rows: int = 1):
    """x [rows * B, N, C] with the padded image tokens of the batch's img_mask (repeated rows times) zeroed."""
    if "img_mask" not in batch:
        return x
    return jnp.where(jnp.concatenate([batch["img_mask"]] * rows, 0)[..., None], x, 0.0)


def student_sample(apply, params, batch, key, cfg: DistillConfig):
    """(x0_hat [B, N, C] float32 with a gradient through the last student call, k [B] int32 steps drawn)."""
    x_real = batch["img"].astype(jnp.float32)
    b = x_real.shape[0]
    sig = jnp.asarray(cfg.student_sigmas, jnp.float32)
    n_steps = sig.shape[0]
    k_step, k_noise = jax.random.split(key)
    k = jax.random.randint(k_step, (b,), 0, n_steps)
    noise = jax.random.normal(k_noise, x_real.shape, jnp.float32)
    if cfg.backward_simulation and n_steps > 1:
        def euler(x, levels):        # the Turbo sampler's step from levels[0] to levels[1]
            v = jax.lax.stop_gradient(apply(params, batch, x, jnp.full((b,), levels[0])))
            x = x + (levels[1] - levels[0]) * v
            return x, x
        _, xs = jax.lax.scan(euler, noise, jnp.stack([sig[:-1], sig[1:]], axis=1))
        x_k = jnp.concatenate([noise[None], xs])[k, jnp.arange(b)]
    elif cfg.backward_simulation:
        x_k = noise
    else:
        x_k = noised(x_real, noise, sig[k])
    x_k = _zero_padded(jax.lax.stop_gradient(x_k), batch)
    s_k = sig[k]
    return _zero_padded(x0_of(x_k, s_k, apply(params, batch, x_k, s_k)), batch), k


def teacher_cfg_x0(apply, teacher, batch, x_t, t, guidance: float, rescale: bool, sequential: bool = False):
    """(X0 of the conditional teacher, X0 of the 'unconditional' one) at x_t, one call on 2B rows, no gradient.

    rescale=False: the plain unconditional prediction, so (w - 1)(c - u) is decoupled-DMD's CA term. rescale=True:
    the second value is u' = c - (X0(v_cfg) - c) / (w - 1) with v_cfg the sampler's guided velocity (cfg_combine:
    per-token norm rescale, LENS_SPEC §7.3), so the CA term (w - 1)(c - u') = X0(v_cfg) - c aims the student at
    the distribution the guided teacher samples."""
    from lens_jax.diffusion.sampler import cfg_combine
    b = x_t.shape[0]
    if sequential:       # conditional, then unconditional: one batch of activations at a time
        texts = (jnp.stack([batch["txt"], jnp.zeros_like(batch["txt"])]),
                 jnp.stack([batch["txt_mask"], jnp.zeros_like(batch["txt_mask"])]))
        v = jax.lax.map(lambda tm: apply(teacher, dict(batch, txt=tm[0], txt_mask=tm[1]), x_t, t), texts)
        v = jax.lax.stop_gradient(jnp.concatenate([v[0], v[1]], 0))
    else:
        both = dict(_repeat(batch, 2))
        both["txt"] = jnp.concatenate([batch["txt"], jnp.zeros_like(batch["txt"])], 0)
        both["txt_mask"] = jnp.concatenate([batch["txt_mask"], jnp.zeros_like(batch["txt_mask"])], 0)
        x2, t2 = jnp.concatenate([x_t, x_t], 0), jnp.concatenate([t, t], 0)
        v = jax.lax.stop_gradient(apply(teacher, both, x2, t2))
    x0_c, x0_u = x0_of(x_t, t, v[:b]), x0_of(x_t, t, v[b:])
    if rescale and guidance > 1.0:
        x0_g = x0_of(x_t, t, cfg_combine(v[:b], v[b:], guidance))
        x0_u = x0_c - (x0_g - x0_c) / (guidance - 1.0)
    return x0_c, x0_u


def dmd_gradients(x0, x0_teacher_1, x0_fake_1, x0_cond_2, x0_uncond_2, cfg: DistillConfig, img_mask=None):
    """(g_DM / n1, g_CA / n2, parts) in x0 units from the X0 predictions of the teacher (conditional at t1;
    conditional and unconditional at t2) and of the fake score (at t1), all [B, N, C]."""
    g_dm = x0_teacher_1 - x0_fake_1
    g_ca = (cfg.guidance - 1.0) * (x0_cond_2 - x0_uncond_2)
    if cfg.normalise:
        n1 = jnp.maximum(masked_token_mean(jnp.abs(x0 - x0_teacher_1), img_mask), cfg.normaliser_floor)
        n2 = jnp.maximum(masked_token_mean(jnp.abs(x0 - x0_cond_2), img_mask), cfg.normaliser_floor)
    else:
        n1 = n2 = jnp.ones((x0.shape[0],), jnp.float32)
    parts = {"n1": jnp.mean(n1), "n2": jnp.mean(n2),
             "g_dm_rms": jnp.sqrt(jnp.mean(masked_token_mean(jnp.square(g_dm), img_mask))),
             "g_ca_rms": jnp.sqrt(jnp.mean(masked_token_mean(jnp.square(g_ca), img_mask)))}
    return g_dm / n1[:, None, None], g_ca / n2[:, None, None], parts


def surrogate(x0, step, img_mask=None):
    """Per example 1/2 mean |x0 - sg(x0 + step)|^2: its gradient in x0 is -step / (elements per example)."""
    target = jax.lax.stop_gradient(x0 + step)
    return 0.5 * masked_token_mean(jnp.square(x0 - target), img_mask)


def discriminate(apply, disc_model, teacher, disc, batch, x_t, t, cfg: DistillConfig, rows: int = 1):
    """d(x_t) [rows * B]: the discriminator on the teacher's features of x_t (x_t has rows x B examples; with
    cfg.sequential_teacher the rows groups of B go through the teacher one after the other)."""
    if rows > 1 and cfg.sequential_teacher:
        def one(xt):
            _, feats = apply(teacher, batch, xt[0], xt[1], features=cfg.feature_layers)
            return disc_model.apply({"params": disc}, feats, xt[1], batch.get("img_mask"))
        split = (x_t.reshape((rows, -1) + x_t.shape[1:]), t.reshape(rows, -1))
        return jax.lax.map(one, split).reshape(-1)
    cond = _repeat(batch, rows) if rows > 1 else batch
    _, feats = apply(teacher, cond, x_t, t, features=cfg.feature_layers)
    return disc_model.apply({"params": disc}, feats, t, cond.get("img_mask"))


# ----------------------------------------------------------------------------- objectives

def critic_loss_fn(apply, disc_model, cfg: DistillConfig):
    """(params, batch, rng) -> (L_fake + L_D, metrics): the fake score's and the discriminator's losses."""
    def loss_fn(params, batch, rng):
        mask = batch.get("img_mask")
        x_real = batch["img"].astype(jnp.float32)
        b = x_real.shape[0]
        k_gen, k_tf, k_ef, k_td, k_er, k_eg, k_r1 = jax.random.split(rng, 7)
        x0, _ = student_sample(apply, params["student"], batch, k_gen, cfg)
        x0 = jax.lax.stop_gradient(x0)
        # The fake score: flow matching on the student's samples.
        t = draw_times(k_tf, b, cfg.t_fake, cfg.time_mu)
        eps = jax.random.normal(k_ef, x0.shape, jnp.float32)
        v = apply(params["fake"], batch, _zero_padded(noised(x0, eps, t), batch), t)
        l_fake = masked_token_mean(jnp.square(v - (eps - x0)), mask)
        # The discriminator: real vs fake at the same t, and the real input perturbed by alpha eps'.
        td = draw_times(k_td, b, cfg.t_adv, cfg.time_mu)
        real_t = noised(x_real, jax.random.normal(k_er, x0.shape, jnp.float32), td)
        fake_t = noised(x0, jax.random.normal(k_eg, x0.shape, jnp.float32), td)
        pert = real_t + cfg.r1_alpha * jax.random.normal(k_r1, x0.shape, jnp.float32)
        xs = _zero_padded(jnp.concatenate([real_t, fake_t, pert], 0), batch, 3)
        d = discriminate(apply, disc_model, params["teacher"], params["disc"], batch, jax.lax.stop_gradient(xs),
                         jnp.concatenate([td, td, td], 0), cfg, rows=3)
        d_real, d_fake, d_pert = d[:b], d[b:2 * b], d[2 * b:]
        l_d = jax.nn.softplus(-d_real) + jax.nn.softplus(d_fake)
        r1 = jnp.square(d_real - d_pert)
        l_disc = l_d + 0.5 * cfg.r1_gamma * r1
        loss = jnp.mean(l_fake) + jnp.mean(l_disc)
        metrics = {"fake_loss": jnp.mean(l_fake), "disc_loss": jnp.mean(l_d), "r1": jnp.mean(r1),
                   "d_real": jnp.mean(d_real), "d_fake": jnp.mean(d_fake),
                   "d_real_acc": jnp.mean((d_real > 0).astype(jnp.float32)),
                   "d_fake_acc": jnp.mean((d_fake < 0).astype(jnp.float32))}
        return loss, metrics
    return loss_fn


def student_loss_fn(apply, disc_model, cfg: DistillConfig):
    """(params, batch, rng) -> (L_student, metrics)."""
    def loss_fn(params, batch, rng):
        mask = batch.get("img_mask")
        b = batch["img"].shape[0]
        k_gen, k_t1, k_e1, k_t2, k_e2, k_ta, k_ea = jax.random.split(rng, 7)
        x0, k = student_sample(apply, params["student"], batch, k_gen, cfg)
        x0s = jax.lax.stop_gradient(x0)
        t1 = draw_times(k_t1, b, cfg.t_dm, cfg.time_mu)
        x_t1 = _zero_padded(noised(x0s, jax.random.normal(k_e1, x0.shape, jnp.float32), t1), batch)
        x0_t = x0_of(x_t1, t1, jax.lax.stop_gradient(apply(params["teacher"], batch, x_t1, t1)))
        x0_f = x0_of(x_t1, t1, jax.lax.stop_gradient(apply(params["fake"], batch, x_t1, t1)))
        t2 = draw_times(k_t2, b, cfg.t_ca, cfg.time_mu)
        x_t2 = _zero_padded(noised(x0s, jax.random.normal(k_e2, x0.shape, jnp.float32), t2), batch)
        x0_c, x0_u = teacher_cfg_x0(apply, params["teacher"], batch, x_t2, t2, cfg.guidance, cfg.cfg_rescale,
                                    cfg.sequential_teacher)
        step_dm, step_ca, parts = dmd_gradients(x0s, x0_t, x0_f, x0_c, x0_u, cfg, mask)
        l_dm = surrogate(x0, step_dm, mask)
        l_ca = surrogate(x0, step_ca, mask)
        loss = cfg.lambda_d * (l_dm + l_ca)
        metrics = {"dm_loss": jnp.mean(l_dm), "ca_loss": jnp.mean(l_ca), **parts,
                   "sigma_index": jnp.mean(k.astype(jnp.float32))}
        if cfg.lambda_g > 0:
            ta = draw_times(k_ta, b, cfg.t_adv, cfg.time_mu)
            x_adv = _zero_padded(noised(x0, jax.random.normal(k_ea, x0.shape, jnp.float32), ta), batch)
            d = discriminate(apply, disc_model, params["teacher"], params["disc"], batch, x_adv, ta, cfg)
            l_g = jax.nn.softplus(-d)
            loss = loss + cfg.lambda_g * l_g
            metrics.update(gen_adv_loss=jnp.mean(l_g), d_student=jnp.mean(d))
        return jnp.mean(loss), metrics
    return loss_fn


def ida_after_fn(mix: float) -> Callable[[Dict[str, Any], Any], Dict[str, Any]]:
    """SenseFlow IDA as an Objective.after_fn: {'fake': (1 - mix) phi + mix theta} from the updated student."""
    def after(params, step):
        del step
        return {"fake": jax.tree.map(lambda f, s: ((1.0 - mix) * f + mix * s.astype(f.dtype)).astype(f.dtype),
                                     params["fake"], params["student"])}
    return after


def distill_objectives(model, disc_model, cfg: DistillConfig, *, ttur: int, rules=None) -> Tuple[Objective, ...]:
    """[critic (L_fake + L_D on 'fake' and 'disc', `ttur` updates), student (L_student on 'student', then IDA)]."""
    if int(ttur) < 1:
        raise ValueError(f"ttur={ttur}: the fake score / discriminator updates per student update must be >= 1")
    apply = make_apply(model, rules)
    critic = Objective(critic_loss_fn(apply, disc_model, cfg), updates=("fake", "disc"), name="critic",
                       repeats=int(ttur))
    student = Objective(student_loss_fn(apply, disc_model, cfg), updates=("student",), name="student",
                        after_fn=ida_after_fn(cfg.ida_mix) if cfg.ida_mix > 0 else None)
    return critic, student

