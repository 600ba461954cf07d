"""The RL train state and the rollout batch source of the `rl` phase (lens_jax/phases/rl.py).

`rl_state(config, model, plain)` -> (TrainSpec, [objective], rules, to_plain):
  net 'dit'    the DiT (with adapters when config.lora.rank > 0: only lora_a / lora_b train, the base is a
               frozen subtree with no optimiser state); weights from config.init_from (the base; fresh adapters);
               NFT keeps the old policy as its EMA (config.nft.old_policy schedule)
  net 'ref'    full fine-tuning with a KL term only: the frozen reference copy of the base
  to_plain     adapted weights -> plain DiT weights (merged), for rollouts and evaluation

`RolloutSource` is the trainer's batch source: batch s is a pure function of (config.seed, s, the state's
weights), so a resumed run rolls out exactly what an uninterrupted one would (given the judge's verdicts).
With config.data.buckets set, each prompt of a step draws one bucket of the base area (`rollout_buckets`) and
the batch is padded to the largest bucket's tokens with an `img_mask`; config.rl.rollout_batch splits the
step's rollouts into sampler calls (memory), traced under the run's activation sharding rules.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lens_jax import build
from lens_jax.configs.base import ConfigError
from lens_jax.train.loop import StopTraining
from lens_jax.train.step import rules_context


def rl_state(config, model, plain):
    from lens_jax.diffusion.rollout import sde_coefficients
    from lens_jax.diffusion.schedules import sampling_sigmas
    from lens_jax.models import lora as lora_lib
    from lens_jax.models.mmdit import dummy_inputs
    from lens_jax.posttrain.grpo import GRPOConfig, grpo_objective
    from lens_jax.posttrain.nft import NFTConfig, nft_objective, old_policy_decay
    from lens_jax.train.optim import make_optimizer
    from lens_jax.train.resume import weights_from
    from lens_jax.train.state import Net, TrainSpec

    spec_lora = build.lora_spec(config)
    dummy = dummy_inputs(model.config)
    rules = build.dit_rules(config)
    part = "ema" if config.rl.init_params.endswith(".ema") else "params"
    base_load = weights_from(config.init_from, config.rl.init_params.split(".")[0], option="config.init_from",
                             part=part, kind="lens_dit", model_config=model.config)

    def load(abstract):
        if spec_lora is None:
            return base_load(abstract)
        base_abs, ad_abs = lora_lib.split(abstract)
        base = base_load(base_abs)
        shardings = jax.tree.map(lambda a: a.sharding, ad_abs)
        adapters = jax.jit(lambda k: lora_lib.split(nn.meta.unbox(model.init(k, **dummy)["params"]))[1],
                           out_shardings=shardings)(jax.random.key(int(config.seed)))
        return lora_lib.graft(base, adapters)

    tx, schedule = make_optimizer(config.optim, config.num_steps)
    nft = config.rl.algorithm == "nft"
    policy = lora_lib.lora_policy() if spec_lora is not None else tuple(tuple(p) for p in config.optim.policy or ())
    nets = [Net("dit", init=lambda key: model.init(key, **dummy)["params"], rules=rules, optimizer=tx,
                schedule=schedule, policy=policy, load=load,
                ema_decay=old_policy_decay(config.nft.old_policy) if nft else 0.0)]
    kl = float(config.nft.kl_weight if nft else config.grpo.kl_weight)
    reference = None
    if kl > 0:
        if spec_lora is not None:
            reference = lambda p: lora_lib.disable(p["dit"])  # noqa: E731
        else:
            nets.append(Net("ref", init=lambda key: plain.init(key, **dummy)["params"], rules=rules,
                            checkpoint=False, load=base_load))
            reference = lambda p: p["ref"]  # noqa: E731
    if nft:
        n = config.nft
        cfg = NFTConfig(beta=n.beta, kl_weight=kl, space=n.space, loss_scale=n.loss_scale, t_min=n.t_min,
                        t_max=n.t_max)
        obj = nft_objective(model, cfg, reference=reference, rules=rules, repeats=int(n.updates_per_step))
    else:
        g = config.grpo
        cfg = GRPOConfig(clip_range=g.clip_range, kl_weight=kl, noise_level=g.noise_level,
                         guidance=config.rl.rollout_guidance, adv_clip=g.adv_clip, global_std=g.global_std)
        n_img = (int(config.data.image_size) // 16) ** 2
        coefs = sde_coefficients(sampling_sigmas(n_img, int(config.rl.rollout_steps), _mu(config)), g.noise_level)
        obj = grpo_objective(model, cfg, coefs, reference=reference, rules=rules)

    merge = jax.jit(lambda p: lora_lib.merge(p, spec_lora)) if spec_lora is not None else (lambda p: p)
    return TrainSpec(nets, seed=config.seed), [obj], rules, merge


def rollout_buckets(config):
    """((W, H) buckets of the rollouts, base side): the base area config.data.resolution of config.data.buckets
    when set (e.g. 'lens27' at 1024: Lens's 9 RL buckets 736x1472 ... 1472x736), else one square of
    data.image_size."""
    from lens_jax.data.buckets import bucket_table
    d = config.data
    if not d.get("buckets", ""):
        side = int(d.image_size)
        return ((side, side),), side
    try:
        table = bucket_table(d.buckets, int(d.resolution))
    except ValueError as e:
        raise ConfigError(f"config.data.buckets: {e}") from None
    if table.num_areas == 1:
        return tuple(table.buckets[0]), int(table.sides[0])
    if int(d.resolution) not in table.sides:
        raise ConfigError(f"config.data.buckets={d.buckets!r} has base areas {table.sides}; RL rollouts use one: "
                          f"set config.data.resolution to one of them")
    a = table.sides.index(int(d.resolution))
    return tuple(table.buckets[a]), int(table.sides[a])


def _mu(config) -> Optional[float]:
    return None if config.rl.rollout_mu < 0 else float(config.rl.rollout_mu)


def _slice(members: np.ndarray, k: int, step: int, key) -> np.ndarray:
    """Slice `step` of size k of consecutive per-epoch permutations of `members`."""
    per_epoch = max(1, len(members) // k)
    epoch, slot = divmod(step, per_epoch)
    perm = np.random.default_rng(list(key) + [epoch]).permutation(members)
    return perm[slot * k:(slot + 1) * k]


class RolloutSource:
    """Rollouts -> judged rewards -> NFT / GRPO batches, one per trainer step (module docstring)."""

    def __init__(self, config, workdir: str, spec, plain_model, to_plain, enc, records: List[dict], judge, mesh,
                 say=print, rules=None):
        from lens_jax.diffusion.schedules import sampling_sigmas
        from lens_jax.models.mmdit import image_positions
        from lens_jax.posttrain.rewards import Aggregation
        self.config, self.workdir, self.spec, self.model = config, workdir, spec, plain_model
        self.rules = rules           # activation sharding rules: the sampler's batch stays split like a training batch
        self.to_plain, self.enc, self.records, self.judge, self.mesh, self.say = (
            to_plain, enc, records, judge, mesh, say)
        r = config.rl
        self.G, self.K = int(r.prompts_per_step), int(r.images_per_prompt)
        from lens_jax.train.sharding import data_parallel_size
        dp = data_parallel_size(mesh)
        if (self.G * self.K) % dp:
            raise ConfigError(f"config.rl.prompts_per_step x images_per_prompt = {self.G * self.K} rollouts per step "
                              f"must be divisible by the mesh's {dp} data-parallel devices")
        if self.G > len(records):
            raise ConfigError(f"config.rl.prompts_per_step={self.G} exceeds the {len(records)} RL prompts")
        self.rollout_batch = int(r.rollout_batch) or self.G * self.K
        if (self.G * self.K) % self.rollout_batch or self.rollout_batch % dp:
            raise ConfigError(f"config.rl.rollout_batch={r.rollout_batch} must divide the {self.G * self.K} rollouts "
                              f"per step and be divisible by the mesh's {dp} data-parallel devices")
        self.buckets, self.side = rollout_buckets(config)
        self.mixed = len(self.buckets) > 1
        self.n_tokens = max((w // 16) * (h // 16) for w, h in self.buckets)
        # One sigma grid for the batch: that of the base area (the buckets' token counts differ by a few %).
        self.sigmas = sampling_sigmas((self.side // 16) ** 2, int(r.rollout_steps), _mu(config))
        self.h = self.w = self.side // 16
        self.pos = np.asarray(image_positions(self.h, self.w), np.int32)
        self.channels = int(plain_model.config.in_channels)
        self.agg = Aggregation(global_weight=float(r.global_weight), gate_global=bool(r.gate_global),
                               gate_cap=float(r.gate_cap))
        self.txt, self.mask = self._encode([x["prompt"] for x in records])
        names = sorted({x["category"] for x in records})
        self.by_category = [np.array([j for j, x in enumerate(records) if x["category"] == c]) for c in names]
        self.state, self.step, self._metrics = None, 0, {}

    def _encode(self, prompts, chunk: int = 256):
        feats, masks = [], []
        for i in range(0, len(prompts), chunk):
            tf = self.enc.encode_text(prompts[i:i + chunk])
            feats.append(np.asarray(tf.features, np.float32))
            masks.append(np.asarray(tf.mask, bool))
        length = max(f.shape[1] for f in feats)
        feats = [np.pad(f, ((0, 0), (0, length - f.shape[1]), (0, 0))) for f in feats]
        masks = [np.pad(m, ((0, 0), (0, length - m.shape[1]))) for m in masks]
        feats, masks = np.concatenate(feats), np.concatenate(masks)
        # Right padding that no prompt uses is dropped: the DiT masks padded text, so this only saves compute.
        used = masks.any(axis=0)
        n = int(used.sum())
        if n and used[:n].all():
            feats, masks = feats[:, :n], masks[:, :n]
        return feats, masks

    # ------------------------------------------------------------------ the trainer's source protocol

    def attach(self, state, step: int) -> None:
        self.state = state
        self.step = int(step)

    def get_state(self) -> Dict[str, Any]:
        return {"step": self.step}

    def set_state(self, s) -> None:
        self.step = int(s["step"])

    def metrics(self) -> Dict[str, float]:
        return dict(self._metrics)

    def __iter__(self):
        return self

    def batch_shardings(self) -> Dict[str, Any]:
        from lens_jax.train.sharding import batch_sharding
        nft = self.config.rl.algorithm == "nft"
        dims = dict(img_pos=3, txt=3, txt_mask=2, weight=1)
        dims.update(dict(x0=3, r=1) if nft else dict(x=4, x_next=4, log_prob=2, adv=1))
        if self.mixed:
            dims["img_mask"] = 2
        return {k: batch_sharding(self.mesh, n) for k, n in dims.items()}

    def __next__(self):
        if self.state is None:
            raise RuntimeError("RolloutSource has no state: call attach(state, step) first")
        s = self.step
        batch, m = self.rollout(s)
        self._metrics = m
        self.step = s + 1
        return batch

    # ------------------------------------------------------------------ one step's rollouts

    def prompt_indices(self, step: int) -> np.ndarray:
        """G distinct prompts of step `step`: consecutive slices of per-epoch permutations (seeded). With
        config.rl.balance_categories every category gets an equal share of the G (the first ones one more when
        G does not divide), each category cycling through its own permutations."""
        seed = int(self.config.seed)
        if not self.config.rl.balance_categories:
            return _slice(np.arange(len(self.records)), self.G, step, [seed, 0x7E1])
        cats = self.by_category
        share = [self.G // len(cats) + (i < self.G % len(cats)) for i in range(len(cats))]
        out = []
        for i, (members, k) in enumerate(zip(cats, share)):
            if k:
                out.append(_slice(members, min(k, len(members)), step, [seed, 0x7E1, i]))
        return np.concatenate(out)

    def step_buckets(self, step: int) -> np.ndarray:
        """[G] bucket index of each prompt of step `step` (seeded, uniform; all 0 with one bucket). The K images
        of a prompt share its bucket, so a group compares images of one shape."""
        if not self.mixed:
            return np.zeros((self.G,), np.int64)
        rng = np.random.default_rng([int(self.config.seed), 0xB0C, int(step)])
        return rng.integers(len(self.buckets), size=self.G)

    def layout(self, step: int):
        """(img_pos [G*K, N, 3] int32, img_mask [G*K, N] bool or None, bucket per rollout [G*K])."""
        from lens_jax.data.buckets import bucket_positions
        per_row = np.repeat(self.step_buckets(step), self.K)
        if not self.mixed:
            return np.broadcast_to(self.pos, (self.G * self.K,) + self.pos.shape).copy(), None, per_row
        pm = [bucket_positions(w, h, self.n_tokens) for w, h in self.buckets]
        pos = np.stack([pm[b][0] for b in per_row])
        mask = np.stack([pm[b][1] for b in per_row])
        return pos, mask, per_row

    def decode(self, x0, per_row) -> List[np.ndarray]:
        """Rollout latents [G*K, N, C] -> uint8 images (one list entry each, [H, W, 3] of its bucket)."""
        from lens_jax.pipeline import to_uint8
        x0 = np.asarray(jax.device_get(x0), np.float32)
        out: List[Optional[np.ndarray]] = [None] * len(x0)
        for b in np.unique(per_row):
            w, h = self.buckets[int(b)]
            rows = np.flatnonzero(per_row == b)
            n = (h // 16) * (w // 16)
            imgs = to_uint8(self.enc.vae.decode_tokens(x0[rows, :n], h // 16, w // 16))
            for j, im in zip(rows, imgs):
                out[j] = im
        return out

    def rollout(self, step: int):
        from lens_jax.diffusion import rollout as R
        from lens_jax.diffusion.sampler import make_model_fn
        from lens_jax.posttrain.rewards import grpo_advantages, nft_weights
        cfg, G, K = self.config, self.G, self.K
        nft = cfg.rl.algorithm == "nft"
        idx = self.prompt_indices(step)
        rows = np.repeat(idx, K)
        t0 = time.time()
        params = self.to_plain(self.spec.eval_params(self.state, "dit.ema" if nft else "dit"))
        fn = make_model_fn(self.model, params)
        key = jax.random.fold_in(jax.random.key(int(cfg.seed) + 0x5EED), step)
        k_x, k_sde = jax.random.split(key)
        from lens_jax.train.sharding import batch_sharding
        pos, img_mask, per_row = self.layout(step)
        x = np.asarray(jax.random.normal(k_x, (G * K, self.n_tokens, self.channels), jnp.float32))
        g = float(cfg.rl.rollout_guidance)
        txt, mask = self.txt[rows], self.mask[rows]
        chunk = self.rollout_batch
        outs = []
        for c0 in range(0, G * K, chunk):      # sampler calls of rl.rollout_batch rollouts (memory)
            sl = slice(c0, c0 + chunk)
            # Each call's batch is sharded over the mesh's data axes like a training batch.
            put = lambda v, nd: jax.device_put(v[sl], batch_sharding(self.mesh, nd))  # noqa: E731
            xs, txt_d, tmask_d = put(x, 3), put(txt, 3), put(mask, 2)
            pos_d = put(pos, 3) if self.mixed else self.pos
            mask_d = None if img_mask is None else put(img_mask, 2)
            with jax.set_mesh(self.mesh), rules_context(self.rules):
                if nft:
                    outs.append(R.ode_sample(fn, xs, self.sigmas, txt_d, tmask_d, img_pos=pos_d, img_mask=mask_d,
                                             solver=cfg.rl.solver, guidance=g))
                else:
                    k = k_sde if chunk == G * K else jax.random.fold_in(k_sde, c0)
                    outs.append(R.sde_sample(fn, xs, self.sigmas, txt_d, tmask_d, k, img_pos=pos_d, img_mask=mask_d,
                                             noise_level=float(cfg.grpo.noise_level), guidance=g))
        if nft:
            x0, traj = np.concatenate([np.asarray(o) for o in outs]), None
        else:
            traj = {k: np.concatenate([np.asarray(o[k]) for o in outs], axis=1 if k != "x0" else 0)
                    for k in ("x0", "x", "x_next", "log_prob")}
            x0 = traj["x0"]
        images = self.decode(x0, per_row)
        t1 = time.time()
        scores = self._judge(images, [self.records[i] for i in rows], step)
        t2 = time.time()
        rewards = scores.rewards.reshape(G, K)
        common = dict(img_pos=pos, txt=np.asarray(txt), txt_mask=np.asarray(mask))
        if self.mixed:
            common["img_mask"] = img_mask
        if nft:
            r, weight, mm = nft_weights(rewards, cfg.nft.reward_mapping, clip=float(cfg.grpo.adv_clip))
            batch = dict(common, x0=np.asarray(x0, np.float32), r=r.reshape(-1), weight=weight.reshape(-1))
        else:
            a, weight, mm = grpo_advantages(rewards, global_std=bool(cfg.grpo.global_std),
                                            clip=float(cfg.grpo.adv_clip))
            sw = lambda v: np.swapaxes(np.asarray(v, np.float32), 0, 1)  # noqa: E731  [T, B, ...] -> [B, T, ...]
            batch = dict(common, x=sw(traj["x"]), x_next=sw(traj["x_next"]), log_prob=sw(traj["log_prob"]),
                         adv=a.reshape(-1), weight=weight.reshape(-1))
        m = dict(scores.metrics, **mm)
        m["rollout/time_s"], m["judge/time_s"] = t1 - t0, t2 - t1
        m["rollout/images_per_s"] = G * K / max(t1 - t0, 1e-9)
        every = int(cfg.rl.grid_every)
        if every and (step % every == 0 or step + 1 == cfg.num_steps):
            self._save_grid(step, images, idx, rewards)
        return batch, m

    def _judge(self, images, prompts, step: int):
        from lens_jax.posttrain.rewards import score_rollouts
        r = self.config.rl
        attempts = int(r.judge_retries) + 1
        for attempt in range(attempts):
            scores = score_rollouts(self.judge, list(images), prompts, self.agg)
            missing = float(np.mean(~np.isfinite(scores.rewards)))
            scores.metrics["judge/attempts"] = float(attempt + 1)
            if missing <= float(r.max_missing_frac):
                return scores
            self.say(f"warning: step {step}: {missing:.0%} of the rollouts got no verdict from the judge "
                     f"(attempt {attempt + 1}/{attempts}; {getattr(self.judge, 'stats', {})})")
            if attempt + 1 < attempts:
                time.sleep(float(r.judge_retry_wait_s))
        raise StopTraining(f"judge outage: {missing:.0%} of step {step}'s rollouts had no verdict after {attempts} "
                           f"attempts (config.rl.max_missing_frac={r.max_missing_frac})")

    def _save_grid(self, step: int, images, idx, rewards) -> None:
        from lens_jax.eval.shapes_eval import save_grid
        d = os.path.join(self.workdir, "rollouts")
        os.makedirs(d, exist_ok=True)
        rows = min(len(idx), 6)
        save_grid(list(images[:rows * self.K]), os.path.join(d, f"step_{step:06d}.png"), ncol=self.K,
                  scale=max(1, 96 // max(max(wh) for wh in self.buckets)))
        with open(os.path.join(d, f"step_{step:06d}.txt"), "w") as f:
            for j in range(rows):
                h, w = images[j * self.K].shape[:2]
                f.write(json.dumps({"prompt": self.records[idx[j]]["prompt"], "size": f"{w}x{h}",
                                    "rewards": [round(float(v), 3) for v in rewards[j]]}) + "\n")
