"""Scoring a model on the test set, its plots, the pure gate, and the promotion at its edge."""
