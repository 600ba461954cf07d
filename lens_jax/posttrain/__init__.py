"""Post-training: RL (DiffusionNFT, Flow-GRPO), prompt sets, judges and rewards."""
