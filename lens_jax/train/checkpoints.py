"""Training checkpoints: the one module that calls Orbax for train state (JAX_STYLE rule 10).

One `CheckpointManager` per run directory with these named items per step:

  <net>      one item per checkpointed sub-network of the train state (lens_jax/train/state.py): its
             {params, opt_state?, ema?} tree (StandardSave, async); e.g. `dit`, or `lora` beside a frozen base
             that is not saved (Net.checkpoint=False) because it is reloaded from its source at every start
  train      {step, rng}
  data_iter  the batch source's position: `source.get_state()`, a JSON-able dict, one file per process
             (`process_<i>-of-<n>.json`), so any source with get_state()/set_state(dict) plugs in
  config     the run's config as JSON

Retention: the last `max_to_keep` steps plus every `keep_every`-th step (0 = off), through Orbax's
preservation policies. Saves are asynchronous (arrays are copied to host before `save` returns, then
written in the background); `wait()` blocks until the last one is on disk.

Restoring targets the *current* mesh's abstract state (ShapeDtypeStructs carrying shardings), so a run
saved on 8 devices resumes on 4 or 1. `restore_latest` walks back from the newest step: a step that
fails to restore (for example a truncated file) is reported with a warning, moved aside into
`<directory>.corrupt/` (never in read-only mode) and the previous step is tried. A readable step whose
parameters are not the ones the current config builds (another preset, `scan_layers`, ...) is not damage:
restoring it raises `CheckpointMismatchError` and leaves it in place. `restore_weights` reads only one net's
weights (its params or its EMA), never its optimiser state: what sampling, evaluation and weights-only
initialisation use. With `cleanup_tmp=True` (the training run) half-written steps left by a killed process
are removed when the manager is created.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_managers

from lens_jax.configs.base import ConfigError

FIXED_ITEMS = ("train", "data_iter", "config")
LEGACY_ITEM = "state"          # the single-DiT layout written before named sub-networks


def _any_process(flag: bool) -> bool:
    from lens_jax.train.distributed import any_process
    return any_process(flag)


class CheckpointMismatchError(ConfigError):
    """A readable checkpoint whose parameters are not the ones this config builds (another model config).

    Not corruption: `restore_latest` raises it instead of moving the step aside and falling back.
    """


def _param_shapes(tree) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
    """{path under 'params' (tuple of keys): shape} of a net item's tree or of its Orbax metadata."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree.get("params", {})):
        keys = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        out[keys] = tuple(int(d) for d in (getattr(leaf, "shape", None) or ()))
    return out


def params_mismatch(saved: Dict[Tuple[str, ...], Tuple[int, ...]],
                    wanted: Dict[Tuple[str, ...], Tuple[int, ...]], limit: int = 4) -> Optional[str]:
    """How the saved parameter paths/shapes differ from the wanted ones (None if they agree), e.g. 'the
    checkpoint lacks transformer_blocks_0, ... (4 modules); it holds transformer_blocks, which this config does
    not build'."""
    def modules(paths):   # the top-level parameter modules the paths belong to, sorted
        return sorted({p[0] for p in paths})

    def names(mods):
        return ", ".join(mods[:limit]) + (f" ... ({len(mods)} modules)" if len(mods) > limit else "")

    parts = []
    missing, extra = modules(set(wanted) - set(saved)), modules(set(saved) - set(wanted))
    if missing:
        parts.append(f"the checkpoint lacks {names(missing)}")
    if extra:
        parts.append(f"it holds {names(extra)}, which this config does not build")
    shapes = [f"{'/'.join(k)} {saved[k]} vs {wanted[k]}" for k in sorted(set(saved) & set(wanted))
              if saved[k] != wanted[k]]
    if shapes:
        parts.append("shapes differ (checkpoint vs config): " + "; ".join(shapes[:limit])
                     + (f" ... ({len(shapes)} arrays)" if len(shapes) > limit else ""))
    return "; ".join(parts) or None


# ----------------------------------------------------------------------------------------------------
# The data-iterator item: a JSON dict per process.

class DataIterHandler(ocp.CheckpointHandler):
    """Writes/reads `process_<i>-of-<n>.json` holding one process's batch-source state."""

    def save(self, directory: epath.Path, args: "DataIterSave"):
        index, count = jax.process_index(), jax.process_count()
        payload = dict(process_index=index, process_count=count, state=args.state)
        (epath.Path(directory) / f"process_{index}-of-{count}.json").write_text(json.dumps(payload, indent=1))

    def restore(self, directory: epath.Path, args: "DataIterRestore" = None) -> Optional[Dict[str, Any]]:
        directory = epath.Path(directory)
        index, count = jax.process_index(), jax.process_count()
        path = directory / f"process_{index}-of-{count}.json"
        if not path.exists():
            saved = sorted(p.name for p in directory.glob("process_*.json"))
            if not saved:
                raise FileNotFoundError(f"no data-iterator state in {directory}")
            path = directory / saved[0]
            warnings.warn(f"data-iterator state was saved by a different number of processes ({saved}); "
                          f"process {index}/{count} restores {saved[0]} (exact for the latent-cache source, "
                          "whose state is only the step)")
        return json.loads(path.read_text())["state"]

    def metadata(self, directory: epath.Path) -> Optional[Any]:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataIterHandler, for_save=True)
@dataclasses.dataclass
class DataIterSave(ocp.args.CheckpointArgs):
    state: Dict[str, Any]


@ocp.args.register_with_handler(DataIterHandler, for_restore=True)
@dataclasses.dataclass
class DataIterRestore(ocp.args.CheckpointArgs):
    pass


# ----------------------------------------------------------------------------------------------------

def find_checkpoint_dir(path: str) -> Tuple[str, Optional[int]]:
    """(checkpoints directory, step or None) for a run workdir, a checkpoints directory or one step's
    directory (`.../checkpoints/400`). Raises FileNotFoundError naming what was looked for."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    base = os.path.basename(path.rstrip("/"))
    if base.isdigit() and any(os.path.isdir(os.path.join(path, n)) for n in ("train", LEGACY_ITEM)):
        return os.path.dirname(path), int(base)
    if any(n.isdigit() for n in os.listdir(path)):
        return path, None
    raise FileNotFoundError(f"{path} is neither a run workdir (with checkpoints/), a checkpoints directory "
                            "nor a checkpoint step directory")


def stored_items(directory: str) -> List[str]:
    """Item names found in the step directories of a checkpoints directory (sorted)."""
    names = set()
    if os.path.isdir(directory):
        for step in os.listdir(directory):
            d = os.path.join(directory, step)
            if step.isdigit() and os.path.isdir(d):
                names.update(n for n in os.listdir(d) if os.path.isdir(os.path.join(d, n)) and not n.startswith("."))
    return sorted(names)


@contextlib.contextmanager
def _quiet_absl(active: bool):
    old = absl_logging.get_verbosity()
    if active and old > absl_logging.ERROR:
        absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(old)


class TrainCheckpointer:
    """Saves and restores train states of named nets (see the module docstring).

    nets: the checkpointed nets of the run that writes; a reader may leave it empty, and then the nets are
    those found on disk.
    """

    def __init__(self, directory: str, nets: Sequence[str] = (), max_to_keep: int = 3, save_interval_steps: int = 0,
                 async_save: bool = True, keep_every: int = 0, read_only: bool = False, cleanup_tmp: bool = False):
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        self._save_interval = int(save_interval_steps)
        found = [n for n in stored_items(self.directory) if n not in FIXED_ITEMS]
        self.declared = tuple(nets)
        self.nets = tuple(dict.fromkeys(list(nets) + found))
        preserve = [ocp_managers.LatestN(max_to_keep)]
        if keep_every and keep_every > 0:
            preserve.append(ocp_managers.EveryNSteps(int(keep_every)))
        handlers = {n: ocp.StandardCheckpointHandler() for n in self.nets}
        handlers.update(train=ocp.StandardCheckpointHandler(), data_iter=DataIterHandler(),
                        config=ocp.JsonCheckpointHandler())
        with _quiet_absl(read_only):     # Orbax warns that a read-only directory is read-only
            # Save decisions are made here (should_save) and every save is forced: interval saves, the final
            # save and the SIGTERM save go through one path.
            options = ocp.CheckpointManagerOptions(
                create=not read_only, read_only=read_only, enable_async_checkpointing=async_save,
                # Half-written steps of a killed run; only the training run itself should clean them up (a
                # reader such as the eval phase must not remove a save in progress).
                cleanup_tmp_directories=cleanup_tmp and not read_only,
                save_decision_policy=ocp_managers.SpecificStepsPolicy(steps=()),
                preservation_policy=ocp_managers.AnyPreservationPolicy(preserve))
            self.manager = ocp.CheckpointManager(self.directory, item_names=tuple(handlers), item_handlers=handlers,
                                                 options=options)

    # -- queries --------------------------------------------------------------------------------------
    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> List[int]:
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self._save_interval > 0 and step % self._save_interval == 0

    def has_item(self, step: int, item: str) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(step), item))

    def nets_at(self, step: int) -> List[str]:
        """The nets stored at `step`."""
        return [n for n in self.nets if self.has_item(step, n)]

    def _check_layout(self, step: int) -> None:
        if self.has_item(step, LEGACY_ITEM) and not self.has_item(step, "train"):
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} was written by an older lens_jax (one 'state' item "
                "holding a single DiT); this version stores one item per net. Retrain, or evaluate it with the "
                "lens_jax version that wrote it; the checkpoint is left as it is.")

    # -- save -----------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, config_json: str, data_state: Optional[Dict[str, Any]] = None,
             nets: Optional[Sequence[str]] = None) -> bool:
        """Starts an async save of the state's nets (`nets`, default the ones this checkpointer was made for, or
        all of the state's when it was made for none), step and rng, the data-iterator state and the config.
        Every process calls it. Returns False when `step` is already saved."""
        if step in self.manager.all_steps():
            return False
        if nets is None:
            nets = [n for n in state["nets"] if n in self.declared] if self.declared else list(state["nets"])
        names = list(nets)
        unknown = [n for n in names if n not in self.nets]
        if unknown:
            raise ValueError(f"nets {unknown} were not declared when this checkpointer was made ({self.nets})")
        items = {n: ocp.args.StandardSave(state["nets"][n]) for n in names}
        items.update(train=ocp.args.StandardSave(dict(step=state["step"], rng=state["rng"])),
                     config=ocp.args.JsonSave(json.loads(config_json)))
        if data_state is not None:
            items["data_iter"] = DataIterSave(dict(data_state))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    # -- restore --------------------------------------------------------------------------------------
    def check_params(self, step: int, name: str, abstract_entry: Any) -> None:
        """Raises CheckpointMismatchError if net `name`'s saved parameters (paths and shapes, from the
        checkpoint's metadata) are not those of `abstract_entry` ({'params': ...}), i.e. it was written with
        another model config. Unreadable metadata passes (the restore itself then reports the damage)."""
        self._check_layout(step)
        if not self.has_item(step, name):
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} holds no net {name!r} (it holds "
                f"{self.nets_at(step) or 'no nets'}); it was written by another phase or config. Use another "
                "workdir; the checkpoint is left as it is.")
        try:
            saved = _param_shapes(getattr(self.manager.item_metadata(step)[name], "tree", None) or {})
        except Exception:   # noqa: BLE001 - damaged or foreign metadata: left to the restore
            return
        if not saved:
            return
        diff = params_mismatch(saved, _param_shapes(abstract_entry))
        if diff:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} holds a different {name!r} than this config builds: "
                f"{diff}. It was written with another model config (config.model: preset, scan_layers, ...; "
                f"that run's config is saved in {os.path.join(self.directory, str(step), 'config')}). Run with "
                "that config, or use another workdir; the checkpoint is left as it is.")

    def restore_full(self, step: int, abstract_state: Any) -> Tuple[Any, Optional[Dict[str, Any]]]:
        """(state with the nets of `abstract_state`, data-iterator state or None when the step has none)."""
        for name, entry in abstract_state["nets"].items():
            self.check_params(step, name, entry)
        items = {n: ocp.args.StandardRestore(e) for n, e in abstract_state["nets"].items()}
        items["train"] = ocp.args.StandardRestore(dict(step=abstract_state["step"], rng=abstract_state["rng"]))
        if self.has_item(step, "data_iter"):
            items["data_iter"] = DataIterRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = dict(nets={n: out[n] for n in abstract_state["nets"]}, step=out["train"]["step"],
                     rng=out["train"]["rng"])
        return state, (out["data_iter"] if "data_iter" in items else None)

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The train state of `step`, placed as `abstract_state` says (shapes, dtypes, shardings)."""
        return self.restore_full(step, abstract_state)[0]

    def restore_latest(self, abstract_state: Any, step: Optional[int] = None, log=print
                       ) -> Optional[Tuple[int, Any, Optional[Dict[str, Any]]]]:
        """(step, state, data state) of the newest step that restores (or of `step`), else None.

        A step that fails to restore is reported and skipped; outside read-only mode it is moved to
        `<directory>.corrupt/<step>-<time>` so that later saves of that step number do not collide.
        """
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        for s in steps:
            error = None
            try:
                state, data_state = self.restore_full(s, abstract_state)
            except CheckpointMismatchError:
                raise                # another model config, not damage: nothing is moved aside
            except Exception as e:   # noqa: BLE001 - any failure to read a step falls back to the previous one
                error = e
            # Every process must take the same decision (a broken shard may be read by one process only).
            if not _any_process(error is not None):
                return s, state, data_state
            if error is None:
                msg = "failed on another process"
            else:
                msg = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:400]
            warnings.warn(f"checkpoint {self.directory}/{s} failed to restore ({msg}); "
                          "falling back to the previous checkpoint")
            log(f"warning: checkpoint step {s} in {self.directory} failed to restore ({msg}); "
                "trying the previous one")
            if step is not None:
                raise error if error is not None else RuntimeError(f"checkpoint step {s}: {msg}")
            self._quarantine(s)
        return None

    def _quarantine(self, step: int) -> None:
        if self.read_only:
            return
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            dst_root = self.directory.rstrip("/") + ".corrupt"
            os.makedirs(dst_root, exist_ok=True)
            dst = os.path.join(dst_root, f"{step}-{int(time.time())}")
            if os.path.exists(src):
                shutil.move(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"lens_jax_quarantine_{step}")
        self.manager.reload()

    def restore_weights(self, step: int, name: str, abstract_params: Any, part: str = "params") -> Any:
        """Only net `name`'s `part` ('params' or 'ema') of `step`, placed as `abstract_params` says; the
        optimiser state is never read. The EMA of a net trained under a freezing policy holds only the trained
        leaves; its frozen leaves are taken from the params."""
        if part not in ("params", "ema"):
            raise ValueError(f"part={part!r}; choose 'params' or 'ema'")
        self.check_params(step, name, {"params": abstract_params})
        if part == "ema":
            try:
                has_ema = "ema" in (getattr(self.manager.item_metadata(step)[name], "tree", None) or {})
            except Exception:   # noqa: BLE001 - unreadable metadata: the restore reports it
                has_ema = True
            if not has_ema:
                raise CheckpointMismatchError(f"net {name!r} at step {step} in {self.directory} keeps no EMA "
                                              "(it was trained with ema_decay 0); use its params")
        target = {part: abstract_params}
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype, global_shape=x.shape), target)
        with ocp.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(os.path.join(self.directory, str(step), name), args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True))
        weights = out[part]
        if part == "ema" and any(x is None for x in jax.tree.leaves(weights, is_leaf=lambda x: x is None)):
            params = self.restore_weights(step, name, abstract_params, part="params")
            weights = jax.tree.map(lambda e, p: p if e is None else e, weights, params, is_leaf=lambda x: x is None)
        return weights

    def read_config(self, step: int) -> Optional[Dict[str, Any]]:
        path = os.path.join(self.directory, str(step), "config")
        if not os.path.isdir(path):
            return None
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    # -- lifecycle ------------------------------------------------------------------------------------
    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
