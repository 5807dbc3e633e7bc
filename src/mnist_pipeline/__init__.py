"""mnist-pipeline: train, track, gate and serve Keras models on MNIST."""

__version__ = "0.1.0"
