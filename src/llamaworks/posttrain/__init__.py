"""Post-training: SFT with assistant-only loss, LoRA (+ merge), GRPO with verifiable rewards."""
