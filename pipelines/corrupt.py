"""DVC stage `corrupt`: the MNIST-C corrupted test suite, made from the official test split.

Each of the benchmark's corruptions, applied at its severity to every test image (seeded,
byte-identical from run to run), for evaluate to score every model on. Never trained on.
"""

import os
import time

import hydra
from omegaconf import DictConfig

from mnist_pipeline import config
from mnist_pipeline.data import corruptions, suite
from mnist_pipeline.data.splits import load_split
from mnist_pipeline.errors import reported
from mnist_pipeline.evaluation.plots import plot_corruption_examples


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with reported("corrupt"):
        corrupt = config.section(cfg, "corrupt")
        paths = config.section(cfg, "paths")
        test = load_split(paths.processed, "test")
        started = time.perf_counter()
        corrupted = corruptions.generate(
            test.images, corrupt.corruptions, corrupt.seed, processes=min(os.cpu_count() or 1, 4)
        )
        digest = suite.save(paths.corrupted, corrupted, test, corrupt.seed)
        plot_corruption_examples(paths.corruption_examples, test.images, corrupted)
        print(
            f"corrupt: wrote {len(corrupted)} corruptions of {len(test)} test images to "
            f"{paths.corrupted}/ in {time.perf_counter() - started:.1f} s "
            f"(suite sha256 {digest[:12]}; picture: {paths.corruption_examples})"
        )


if __name__ == "__main__":
    main()
