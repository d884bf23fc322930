"""Flower ServerApp: modality-aware aggregation, checkpoints, pooled evaluation."""
