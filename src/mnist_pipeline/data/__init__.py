"""The data: fetching the MNIST files, parsing IDX, and the uint8 train/val/test splits."""
