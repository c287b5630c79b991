"""Pretraining: the LLaMA paper's recipe, metrics, atomic checkpoints with exact resume, FSDP2."""
