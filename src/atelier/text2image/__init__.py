"""Stable Diffusion text-to-image and image-to-image on diffusers pipelines (``generate.py``), the tiny
random-weight model the tests use, sampler names, PNG metadata and CLIP score."""
