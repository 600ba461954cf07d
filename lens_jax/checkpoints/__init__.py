"""Reading official PyTorch-layout checkpoints (safetensors) and writing Orbax checkpoints."""
