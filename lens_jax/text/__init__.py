"""Prompt rendering and tokenisation for the GPT-OSS text encoder."""
