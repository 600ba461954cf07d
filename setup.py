"""lens_jax: a JAX/Flax training system for Microsoft's Lens text-to-image model."""
from setuptools import find_packages, setup

setup(
    name="lens_jax",
    version="0.1.0",
    description="JAX/Flax reproduction of the Lens MMDiT text-to-image system",
    packages=find_packages(include=["lens_jax", "lens_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.0",
        "ml-collections>=1.0.0",
        "ml_dtypes>=0.5.0",
        "numpy>=1.26",
        "absl-py>=2.0",
        "scipy>=1.11",
        "pillow>=10",
        "grain>=0.2.10",
        "array-record>=0.5",
        # TensorBoard event files without TensorFlow.
        "tensorboardX>=2.6",
        # Progress bars of training, encoding and evaluation.
        "tqdm>=4.66",
        "matplotlib>=3.8",  # plots saved by the prompt search (lens_jax/reasoner/search.py)
        # Official checkpoints are safetensors files (read through safe_open).
        "safetensors>=0.5",
        # Prompt tokenisation from local tokenizer files (never a hub download).
        "transformers>=5.0",
        "tokenizers>=0.21",
        "sentencepiece>=0.2",
        "openai>=1.50",  # RL judge / prompt writer client for OpenAI-compatible endpoints (lens_jax/posttrain/chat.py)
    ],
    extras_require={
        # Everything the test suite needs, parity references included. torch==2.13.0 is the
        # CPU build available locally; a bare `torch` would pull a multi-GB CUDA wheel.
        "test": [
            "pytest>=8",
            "torch==2.13.0",
            "diffusers>=0.42",
            "pyarrow>=14",  # Parquet input of tools/build_shards.py (tests/test_build_shards.py)
        ],
        # Parquet input for the shard builder (folder/JSONL, tar and shapes-world inputs need nothing extra).
        "data": ["pyarrow>=14"],
    },
)
