"""Data pipelines for lens_jax (synthetic shapes world; see synthetic.py)."""
