"""Inference with trained models: challenge-format predictions and frozen-encoder features."""
