"""Model definitions: the Lens MMDiT, the FLUX.2 VAE and the GPT-OSS text encoder."""
