"""Compose `conf/` into `params.yaml` exactly as `dvc exp run` does (`make params`)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import yaml

from .files import atomic_path


def compose(conf_dir: str | os.PathLike[str], overrides: list[str] | None = None) -> dict:
    """The config `conf_dir/config.yaml` composes to, with DVC's own composition code."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        write(conf_dir, out, overrides)
        return yaml.safe_load(out.read_text(encoding="utf-8"))


def write(conf_dir: str | os.PathLike[str], target: str | os.PathLike[str],
          overrides: list[str] | None = None) -> None:
    """Compose `conf_dir` (with Hydra `overrides`) and write it to `target` atomically."""
    from dvc.utils.hydra import compose_and_dump

    with atomic_path(target, suffix=".yaml") as tmp:
        compose_and_dump(tmp, str(Path(conf_dir).resolve()), None, "config",
                         str(Path(conf_dir).resolve().parent), list(overrides or []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=cnn")
    parser.add_argument("--conf", default="conf")
    parser.add_argument("--out", default="params.yaml")
    args = parser.parse_args()
    write(args.conf, args.out, args.overrides)
    print(f"params: composed {args.conf}/ into {args.out}")


if __name__ == "__main__":
    main()
