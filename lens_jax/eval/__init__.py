"""Evaluation utilities for lens_jax (ShapesEval: see shapes_eval.py)."""
