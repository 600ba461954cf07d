"""Training checkpoints with one Orbax CheckpointManager: items 'state' and 'config' (JAX_STYLE rule 10).

Saves are asynchronous; `latest_step()` finds the newest complete checkpoint; restoring targets the
*current* mesh's abstract state (ShapeDtypeStructs with shardings), so a run can resume on a different
device count.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import orbax.checkpoint as ocp


class TrainCheckpointer:
    def __init__(self, directory: str, max_to_keep: int = 3, save_interval_steps: int = 0, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._save_interval = int(save_interval_steps)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "config"), options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self._save_interval > 0 and step % self._save_interval == 0

    def save(self, step: int, state: Any, config_json: str, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(json.loads(config_json))), force=force)

    def restore(self, step: int, abstract_state: Any) -> Any:
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return out["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
