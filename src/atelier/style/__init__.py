"""Neural style transfer: VGG-19 features and losses (Gatys et al. 2016), the Gatys optimisation, Johnson et al.
2016's transformation network, AdaIN (Huang & Belongie 2017), colour preservation and image file helpers."""
