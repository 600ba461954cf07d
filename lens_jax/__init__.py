"""lens_jax: JAX/Flax reproduction of Microsoft's Lens text-to-image system (arXiv 2605.21573)."""

__version__ = "0.1.0"
