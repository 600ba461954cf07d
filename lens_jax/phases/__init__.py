"""One module per `config.phase`; each exposes `run(config, workdir)` (see lens_jax/main.py)."""
