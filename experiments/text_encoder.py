"""The `text_encoder` phase: a sentencepiece tokenizer and a small GPT-OSS-architecture LM on captions (LENS_SPEC §4).

  python -m lens_jax.main --config=experiments/text_encoder.py:tiny --workdir=/tmp/te_tiny

GPT-OSS-20B (13 GB) is far too large for the research loop, so research-scale runs encode prompts with a tiny
GPT-OSS-architecture decoder (GQA + sinks, alternating sliding/full attention, YaRN RoPE, top-k MoE with clamped
SwiGLU) trained from scratch as a causal LM on Harmony-templated shapes-world captions. The phase writes an Orbax
weights checkpoint of kind `gpt_oss` (the `GptOssEncoder` subtree; `convert.load_converted` restores it), the LM
head beside it, and the tokenizer (a transformers fast tokenizer directory) under `<workdir>/text_encoder/`.

Variants:
  tiny   1000-piece BPE vocabulary, hidden 96, 4 layers (all 4 selected), 8 experts top-2; ships as
         data/tiny/text_encoder.

Override any value from the command line, e.g. `--config.num_steps=3 --config.batch_size=2`.
"""
import ml_collections

from lens_jax.configs import base

VARIANTS = ("tiny",)


def parse_arg(arg):
    return base.parse_variant(arg, VARIANTS, "text_encoder")


def get_config(arg=None):
    variant = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.phase = "text_encoder"
    c.name = variant
    c.seed = 0
    c.date = base.text_encoder_config().date      # Harmony template date (pinned 2026-05-23)

    # Shapes-world captions (lens_jax.data.synthetic): every example gives a dense and a brief caption.
    c.data = ml_collections.ConfigDict(dict(
        num_examples=6000,               # training scenes [0, num_examples) -> 2 * num_examples caption texts
        eval_examples=32,                # held-out scenes [heldout_start, heldout_start + eval_examples)
        heldout_start=1_000_000,         # far from the training indices (fresh captions)
        tokenizer_examples=3000,         # scenes whose captions train the sentencepiece model
        template_repeats=300,            # copies of the Harmony template text in the tokenizer corpus
        seed=0,                          # ShapesWorldConfig.seed
        world=base.shapes_world_config(),  # layout and geometry (configs/base.py)
        brief_fraction=0.3,              # share of training batches made of brief (GenEval-like) captions
    ))

    # SentencePiece: BPE with byte fallback (no <unk> for unseen characters); Harmony tokens never split.
    c.tokenizer = ml_collections.ConfigDict(dict(
        vocab_size=1000,                 # includes 256 byte pieces, <unk> and the special tokens
        model_type="bpe",                # bpe (exported as a transformers BPE tokenizer)
        byte_fallback=True,
    ))

    # GptOssConfig overrides over the 'tiny' preset (lens_jax.models.gpt_oss). vocab_size is set from the tokenizer.
    c.model = ml_collections.ConfigDict(dict(
        preset="tiny",
        hidden_size=96,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=24,
        sliding_window=32,               # even layers slide, odd layers full causal
        num_experts=8,
        experts_per_token=2,
        intermediate_size=64,
        selected_layers=(0, 1, 2, 3),    # 4 layers: the DiT reads 4 * hidden = 384 channels per token
        moe_impl="ragged",
    ))

    c.optim = base.optim_config(lr=3e-3)
    c.optim.schedule = "cosine"          # warmup then cosine decay to final_lr_fraction * lr
    c.optim.warmup_steps = 20
    c.optim.final_lr_fraction = 0.05
    c.optim.weight_decay = 0.01

    c.batch_size = 16
    c.seq_buckets = (160, 320, 448)      # padded training lengths (tokens); the last is also max_length
    c.max_length = 448                   # whole templated sequence (prefix included), for the encoder meta
    c.num_steps = 200
    c.embedding_init_std = 1.0           # token-embedding init; at GPT-OSS's 0.02 the features hardly tell the
                                         # shape words apart (RESULTS.md, session 6)
    base.trainer_config(c, checkpoint_every=100, log_every=10)
    c.eval_batch_size = 32
    c.output_dir = ""                    # checkpoint directory; '' = <workdir>/text_encoder
    return c
