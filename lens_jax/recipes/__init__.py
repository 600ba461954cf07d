"""Research-scale recipes that make the shipped artifacts in data/tiny/ (a small FLUX.2-architecture VAE and a
small GPT-OSS-architecture text encoder), trained by the same trainer as every phase (lens_jax/train/)."""
