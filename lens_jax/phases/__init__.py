"""One module per `config.phase`; each exposes `run(config, workdir)` (see lens_jax/main.py)."""
from __future__ import annotations

import os


def start(config, workdir: str):
    """(is this the primary process, its `say`): joins the multi-host job (lens_jax/train/distributed.py) and has the
    primary process write WORKDIR/config.json; `say` prints (flushed) on the primary process only."""
    from lens_jax.train import distributed
    distributed.initialize_from_env()
    primary = distributed.is_primary()
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    return primary, ((lambda msg: print(msg, flush=True)) if primary else (lambda msg: None))
