"""Training Keras models: models, runtime, input pipeline, the epoch loop, callbacks, and the
training job that records a run in MLflow."""
