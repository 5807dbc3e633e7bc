"""DVC stage `preprocess`: validate the raw IDX files and write uint8 train/val/test splits."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from mnist_pipeline import config
from mnist_pipeline.data.splits import Split, load_raw, report, save_split, stratified_split
from mnist_pipeline.errors import reported
from mnist_pipeline.files import write_json


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with reported("preprocess"):
        prep = config.section(cfg, "preprocess")
        paths = config.section(cfg, "paths")
        raw = Path(paths.raw)
        source = {
            "train": load_raw(raw, prep.train_images, prep.train_labels),
            "test": load_raw(raw, prep.test_images, prep.test_labels),
        }
        train_idx, val_idx = stratified_split(source["train"].labels, prep.val_size, prep.seed)
        splits = {
            "train": Split(source["train"].images[train_idx], source["train"].labels[train_idx]),
            "val": Split(source["train"].images[val_idx], source["train"].labels[val_idx]),
            "test": source["test"],  # the official test set, untouched
        }
        for name, split in splits.items():
            save_split(paths.processed, name, split)
        write_json(paths.data_report, report(splits, source))
        sizes = ", ".join(f"{name} {len(split)}" for name, split in splits.items())
        print(
            f"preprocess: wrote {sizes} images to {paths.processed}/ (report: {paths.data_report})"
        )


if __name__ == "__main__":
    main()
