"""Evaluation: sample statistics for toy worlds; FID and CLIP score for images (later)."""
