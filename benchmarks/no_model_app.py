"""The floor under benchmarks/serve_speed.py's targets: `make serve`'s server (`serve/app.py`:
request checks, micro-batching, `unsure`, the JSON answer, /metrics, the recorder) whose model
call costs nothing: every image gets the calibrated row the model gives a blank image, with no
ONNX Runtime call and no calibration. What the onnx server costs beyond this server is the
model call (`OnnxDigitModel.predict`); what this server costs beyond the echo is everything
else a request goes through."""

from __future__ import annotations

import numpy as np

from mnist_pipeline.serve import app as serving


def create() -> serving.ServingApp:
    served = serving.create()
    row = served.model.predict(np.zeros((1, 28, 28), np.uint8))
    served.batcher.predict = lambda images: np.repeat(row, len(images), axis=0)
    return served
