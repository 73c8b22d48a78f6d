"""Plain-PyTorch references: the math of each layer, the ground truth of every test. Same file names as ``nn/``."""
