"""DVC stage `fetch`: download the four MNIST files into `paths.raw`, verified by SHA-256."""

from collections import Counter
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mnist_pipeline import config
from mnist_pipeline.data import fetch
from mnist_pipeline.errors import reported


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with reported("fetch"):
        fetch_cfg = config.section(cfg, "fetch")
        paths = config.section(cfg, "paths")
        served = fetch.fetch_all(fetch_cfg, Path(paths.raw))
        sources = ", ".join(
            f"{n} {s}" if s == fetch.ALREADY_PRESENT else f"{n} from {s}"
            for s, n in Counter(served.values()).items()
        )
        print(f"fetch: {len(served)} files verified in {paths.raw}/ ({sources})")


if __name__ == "__main__":
    main()
