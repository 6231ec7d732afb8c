"""Differentiable image augmentations applied inside the training step."""
