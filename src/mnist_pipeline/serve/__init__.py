"""Serving: the model server, the tracking UI, `mnist-predict` and picture-to-MNIST conversion."""
