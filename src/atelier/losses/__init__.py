"""Training objectives: adversarial losses and penalties (``gan``), the VAE's ELBO terms (``vae``)."""
