"""training: the PyTorch AnglE model (backbone + pooling) that exporters trace."""
