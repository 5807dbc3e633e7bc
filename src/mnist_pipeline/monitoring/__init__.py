"""Production monitoring: what the served champion was asked and answered (the request log),
and whether that still looks like the clean test set it was certified on (drift tests,
estimated accuracy without labels)."""
