"""FLUX.2 [klein] on diffusers: architecture facts, a tiny random pipeline for tests, and the builtin LoRA trainer.

Everything here imports torch and diffusers; the operator never imports this package (docs/architecture.md).
"""
