"""Evaluation: mode statistics for the Gaussian-mixture world (gmm), the digits world's classifier metrics
(digits), the Frechet distance (frechet), FID with a Flax InceptionV3 (fid) and CLIP score (clip_score)."""
