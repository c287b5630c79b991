"""Evaluation: bits per byte, multiple-choice and generative tasks, the lm-eval adapter."""
