"""The generic jitted train step: phase-supplied losses over a state of named sub-networks.

    objective = Objective(loss_fn, updates=("dit",))          # loss_fn(params_by_name, batch, rng) -> (loss, metrics)
    train_step = make_train_step(spec, [objective], grad_accum_steps=1, rules=activation_rules)
    state, metrics = jax.jit(train_step, ...)(state, batch)    # see `jit_train_step`

`params_by_name` holds every net's weights under its name (the nets an objective updates as the trained leaves
being differentiated, combined with their frozen leaves; every other net as a constant) and, for each net with
an EMA, its EMA weights under '<name>.ema' (constants). Gradients are taken for the trained leaves of the
objective's `updates` only; frozen nets and frozen leaves get none.

Several update rules per step: `objectives` run in order inside the one jit, each `repeats` times (e.g.
distillation's four fake-score updates per student update), every update seeing the weights the previous one
left; repeats on the same batch (no `select_fn`) run as a lax.scan over their keys, so the update is traced and
compiled once. Each objective's update of each net applies that net's Optax optimiser; `after_fn` may then replace
weights of any net as a pure function of the updated weights (e.g. SenseFlow's phi <- 0.97 phi + 0.03 theta).
After all objectives every net with an EMA that was updated in this step moves its EMA:
e <- d e + (1 - d) theta, with d = `Net.ema_decay` (a number or a function of the step, e.g. a ramped
old-policy rate).

Randomness: the step key is fold_in(state.rng, step); the first objective's first update gets the step key
itself, update r of objective i > 0 (or r > 0) fold_in(fold_in(key, i), r).

Micro-batches and accumulation (the same for every objective):
  * a dict batch with grad_accum_steps = 1: prepare_fn(batch, rng, None), then one gradient;
  * a dict batch with grad_accum_steps = k > 1: prepare_fn on the whole batch (so its random draws are the
    whole batch's), then k strided micro-batches (micro-batch j = examples j, j+k, ..., device-local) in a
    lax.scan, each encoded / evaluated on its own, one accumulated gradient: a pure memory lever;
  * a tuple of micro-batch dicts (shapes may differ, e.g. one per base area): prepare_fn(mb, rng, offset)
    with `offset` the number of examples before it in the step, then a lax.scan over the micro-batch index
    with one lax.switch branch per shape (sequential; the temporary memory of the largest micro-batch) or
    Python-unrolled (`micro_batch_loop='unroll'`); `loss_mb{j}` reports each micro-batch's own loss.
  Micro-batch j's loss enters the accumulated loss with weight w_j / sum(w) (`weight_fn`, default 1): with
  w_j = its valid token count the total is the token-weighted mean, exactly the loss of the concatenation.
  Metrics combine the same way; a `Mean(total, count)` metric is combined as sum(total) / sum(count).

Non-finite updates: an update whose loss or any gradient norm is not finite leaves every net it would change
(weights, optimiser state, `after_fn` results, and so their EMAs) as it was, and counts in `skipped` (one
mechanism for every net and objective; optax.apply_if_finite gates one optimiser, not a rule that updates
several nets and their EMAs together).

Metrics: the objective's own metrics plus loss, grad_norm (over its nets' trained leaves), skipped, and per
updated net grad_norm/<net> (objectives that update several nets), update_norm/<net>, param_norm/<net> and
lr/<net> (when the Net has a schedule). With several objectives every key is prefixed '<objective name>/'
except the step total `skipped`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lens_jax.train.state import EMA_SUFFIX, TrainSpec, combine, partition


class Mean(NamedTuple):
    """A metric reported as total / count, accumulated over micro-batches as sum(total) / sum(count)."""
    total: Any
    count: Any


@dataclasses.dataclass(frozen=True)
class Objective:
    """One update rule of the step.

    loss_fn: (params_by_name, batch, rng) -> (scalar loss, {name: scalar or Mean}).
    updates: the nets whose trained leaves this rule differentiates and updates.
    name: prefix of its metrics when the step has several objectives.
    repeats: updates per step (each with its own rng; `select_fn` may give each its own part of the batch).
    prepare_fn: (batch, rng, offset) -> batch, the weight-independent preparation (random draws), run on the
      whole batch before it is split into micro-batches (offset None) or per micro-batch of a tuple (offset =
      examples before it).
    weight_fn: prepared micro-batch -> its weight in the accumulated loss (default 1).
    select_fn: (step batch, repeat index) -> the batch of this update (default: the whole step batch).
    after_fn: (params_by_name after the update, step) -> {net: new weights}, applied when the update is finite.
    """
    loss_fn: Callable[[Dict[str, Any], Any, jax.Array], Tuple[jax.Array, Dict[str, Any]]]
    updates: Tuple[str, ...]
    name: str = ""
    repeats: int = 1
    prepare_fn: Optional[Callable[[Any, jax.Array, Optional[int]], Any]] = None
    weight_fn: Optional[Callable[[Any], jax.Array]] = None
    select_fn: Optional[Callable[[Any, int], Any]] = None
    after_fn: Optional[Callable[[Dict[str, Any], jax.Array], Dict[str, Any]]] = None


def rules_context(rules):
    """The logical-axis rules as a context (a no-op without rules)."""
    return nn.logical_axis_rules(list(rules)) if rules else contextlib.nullcontext()


def _where(ok, new, old):
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def _resolve(metrics: Dict[str, Any]) -> Dict[str, jax.Array]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, Mean):
            c = jnp.asarray(v.count, jnp.float32)
            out[k] = jnp.where(c > 0, jnp.asarray(v.total, jnp.float32) / jnp.where(c > 0, c, 1.0), 0.0)
        else:
            out[k] = v
    return out


def _weighted(metrics, weights):
    """Combines stacked per-micro-batch metrics ([k] leaves): Means by summing, scalars by weights ([k], sum 1)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, Mean):
            out[k] = Mean(jnp.sum(v.total), jnp.sum(v.count))
        else:
            out[k] = jnp.sum(jnp.asarray(v, jnp.float32) * weights)
    return out


def make_train_step(spec: TrainSpec, objectives: Sequence[Objective], *, grad_accum_steps: int = 1,
                    micro_batch_loop: str = "switch", rules: Optional[Sequence] = None) -> Callable:
    """Returns train_step(state, batch) -> (state, metrics) (see the module docstring).

    rules: logical-axis rules for the batch constraints of the accumulation split (the activations' 'act_batch').
    """
    if micro_batch_loop not in ("switch", "unroll"):
        raise ValueError(f"micro_batch_loop={micro_batch_loop!r}; choose 'switch' or 'unroll'")
    k_accum = int(grad_accum_steps)
    if k_accum < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    objectives = list(objectives)
    if not objectives:
        raise ValueError("a train step needs at least one objective")
    names = [o.name for o in objectives]
    if len(objectives) > 1 and (not all(names) or len(set(names)) != len(names)):
        raise ValueError(f"several objectives need distinct names (their metric prefixes); got {names}")
    for o in objectives:
        if not o.updates:
            raise ValueError(f"objective {o.name!r} updates no net")
        for n in o.updates:
            if not spec[n].trainable:
                raise ValueError(f"objective {o.name!r} updates net {n!r}, which is frozen (no optimizer)")
        if int(o.repeats) < 1:
            raise ValueError(f"objective {o.name!r}: repeats={o.repeats} must be >= 1")
    multi = len(objectives) > 1

    def params_view(nets) -> Dict[str, Any]:
        view = {n: e["params"] for n, e in nets.items()}
        for n, e in nets.items():
            if "ema" in e:
                view[n + EMA_SUFFIX] = combine(e["ema"], partition(spec[n], e["params"])[1])
        return view

    def gradients(obj: Objective, nets, batch, key):
        """(loss, resolved metrics, grads {net: tree over its trained leaves}, trained, frozen)."""
        view = params_view(nets)
        trained, frozen = {}, {}
        for n in obj.updates:
            trained[n], frozen[n] = partition(spec[n], nets[n]["params"])

        def loss_of(t, b, scale=None):
            p = dict(view)
            p.update({n: combine(t[n], frozen[n]) for n in obj.updates})
            loss, m = obj.loss_fn(p, b, key)
            return (loss if scale is None else loss * scale), (loss, m)

        grad = jax.value_and_grad(loss_of, has_aux=True)
        prepare = obj.prepare_fn or (lambda b, k, offset: b)
        weigh = obj.weight_fn or (lambda b: jnp.ones((), jnp.float32))
        zeros = jax.tree.map(jnp.zeros_like, trained)

        if isinstance(batch, dict) and k_accum == 1:
            (_, (loss, m)), g = grad(trained, prepare(batch, key, None))
            return loss, _resolve(m), g, trained, frozen

        if isinstance(batch, dict):
            prepared = prepare(batch, key, None)
            b = jax.tree.leaves(prepared)[0].shape[0]
            if b % k_accum:
                raise ValueError(f"batch {b} is not divisible by grad_accum_steps={k_accum}")

            def split(x):   # [B, ...] -> [k, B/k, ...]; micro-batch j = examples j, j+k, ... (device-local)
                y = jnp.swapaxes(x.reshape((b // k_accum, k_accum) + x.shape[1:]), 0, 1)
                with rules_context(rules):
                    return nn.with_logical_constraint(y, (None, "act_batch") + (None,) * (x.ndim - 1))
            xs = jax.tree.map(split, prepared)
            w = jax.lax.map(weigh, xs).astype(jnp.float32)
            total = jnp.sum(w)

            def body(g_acc, x):
                mb, wj = x
                (_, (loss, m)), g = grad(trained, mb, wj / total)
                return jax.tree.map(jnp.add, g_acc, g), (loss, m)
            g, (losses, ms) = jax.lax.scan(body, zeros, (xs, w))
            frac = w / total
            return jnp.sum(losses * frac), _resolve(_weighted(ms, frac)), g, trained, frozen

        if not (isinstance(batch, (tuple, list)) and batch and all(isinstance(x, dict) for x in batch)):
            raise TypeError(f"batches must be a dict or a non-empty tuple/list of dicts, got {type(batch)}")
        if k_accum != 1:
            raise ValueError("grad_accum_steps applies to a single dict batch; a tuple of micro-batches is already "
                             "accumulated (pass smaller micro-batches instead)")
        prepared, offset = [], 0
        for mb in batch:
            prepared.append(prepare(mb, key, offset))
            offset += jax.tree.leaves(mb)[0].shape[0]
        w = jnp.stack([jnp.asarray(weigh(p), jnp.float32) for p in prepared])
        total = jnp.sum(w)
        n = len(prepared)

        def one(j, g_acc):
            (_, (loss, m)), g = grad(trained, prepared[j], w[j] / total)
            return jax.tree.map(jnp.add, g_acc, g), loss, m

        if micro_batch_loop == "unroll" or n == 1:
            g, outs = zeros, []
            for j in range(n):
                g, loss, m = one(j, g)
                outs.append((loss, m))
            losses = jnp.stack([o[0] for o in outs])
            ms = jax.tree.map(lambda *xs: jnp.stack(xs), *[o[1] for o in outs])
        else:
            # One lax.switch branch per shape inside a scan: XLA runs them one after the other and the step's
            # temporary memory is the largest micro-batch's, not the sum.
            def body(g_acc, j):
                g_acc, loss, m = jax.lax.switch(j, [lambda g, j=j: one(j, g) for j in range(n)], g_acc)
                return g_acc, (loss, m)
            g, (losses, ms) = jax.lax.scan(body, zeros, jnp.arange(n))
        frac = w / total
        metrics = _resolve(_weighted(ms, frac))
        metrics.update({f"loss_mb{j}": losses[j] for j in range(n)})
        return jnp.sum(losses * frac), metrics, g, trained, frozen

    def one_update(obj: Objective, nets, updated, b, k, step):
        """One update of `obj` on batch `b` with key `k`: (nets, updated flags, metrics row)."""
        nets = {n: dict(e) for n, e in nets.items()}
        updated = dict(updated)
        loss, m, grads, trained, frozen = gradients(obj, nets, b, k)
        net_norms = {n: optax.global_norm(grads[n]) for n in obj.updates}
        grad_norm = optax.global_norm(list(net_norms.values())) if len(net_norms) > 1 \
            else next(iter(net_norms.values()))
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        for n in obj.updates:
            net = spec[n]
            upd, opt_state = net.optimizer.update(grads[n], nets[n]["opt_state"], trained[n])
            new_params = combine(optax.apply_updates(trained[n], upd), frozen[n])
            nets[n]["params"] = _where(ok, new_params, nets[n]["params"])
            nets[n]["opt_state"] = _where(ok, opt_state, nets[n]["opt_state"])
            updated[n] = updated[n] | ok
            m[f"update_norm/{n}"] = optax.global_norm(upd)
            m[f"param_norm/{n}"] = optax.global_norm(nets[n]["params"])
            if net.schedule is not None:
                m[f"lr/{n}"] = jnp.asarray(net.schedule(step), jnp.float32)
            if len(obj.updates) > 1:
                m[f"grad_norm/{n}"] = net_norms[n]
        if obj.after_fn is not None:
            for n, p in obj.after_fn(params_view(nets), step).items():
                nets[n]["params"] = _where(ok, p, nets[n]["params"])
                if n in updated:
                    updated[n] = updated[n] | ok
        row = dict(m, loss=loss, grad_norm=grad_norm, skipped=(~ok).astype(jnp.int32))
        return nets, updated, {k_: jnp.asarray(v) for k_, v in row.items()}

    def train_step(state, batch):
        step = state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        nets = {n: dict(e) for n, e in state["nets"].items()}
        updated = {n: jnp.zeros((), bool) for n in spec.trainable}
        metrics: Dict[str, Any] = {}
        skipped = jnp.zeros((), jnp.int32)
        for i, obj in enumerate(objectives):
            keys = [key if i == 0 and r == 0 else jax.random.fold_in(jax.random.fold_in(key, i), r)
                    for r in range(int(obj.repeats))]
            if len(keys) > 1 and obj.select_fn is None:
                # Repeated updates on the same batch: one traced update in a lax.scan over the keys (the same
                # draws as unrolled updates, compiled once).
                def body(carry, k, obj=obj):
                    nets_, updated_ = carry
                    nets_, updated_, row_ = one_update(obj, nets_, updated_, batch, k, step)
                    return (nets_, updated_), row_
                (nets, updated), stacked = jax.lax.scan(body, (nets, updated), jnp.stack(keys))
                rows = [jax.tree.map(lambda x, r=r: x[r], stacked) for r in range(len(keys))]
            else:
                rows = []
                for r, k in enumerate(keys):
                    b = obj.select_fn(batch, r) if obj.select_fn is not None else batch
                    nets, updated, row_ = one_update(obj, nets, updated, b, k, step)
                    rows.append(row_)
            for row_ in rows:
                skipped = skipped + row_["skipped"]
            row = rows[0] if len(rows) == 1 else {
                k: (jnp.sum(jnp.stack([x[k] for x in rows])) if k == "skipped"
                    else jnp.mean(jnp.stack([jnp.asarray(x[k], jnp.float32) for x in rows])))
                for k in rows[0]}
            prefix = f"{obj.name}/" if multi else ""
            metrics.update({prefix + k: v for k, v in row.items()})
        for n in spec.trainable:
            net = spec[n]
            if not net.has_ema:
                continue
            trained, _ = partition(net, nets[n]["params"])
            d = jnp.asarray(net.ema_decay(step), jnp.float32) if callable(net.ema_decay) else float(net.ema_decay)
            new_ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p.astype(e.dtype), nets[n]["ema"], trained)
            nets[n]["ema"] = _where(updated[n], new_ema, nets[n]["ema"])
        if multi:
            metrics["skipped"] = skipped
        new_state = dict(state, nets=nets, step=step + 1)
        return new_state, metrics

    return train_step


def jit_train_step(train_step: Callable, mesh, state_shardings, batch_shardings, donate: bool = True):
    """jax.jit with explicit in/out shardings and the state donated (call under `jax.set_mesh(mesh)`).

    batch_shardings: a dict or a tuple of dicts (`sharding.batch_shardings(mesh, example)`), matching what the
    loop passes. The real run and compile_only both jit the step here.
    """
    from lens_jax.train.sharding import replicated
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,) if donate else ())
