"""Compose `conf/` into `params.yaml` exactly as `dvc exp run` does (`make params`)."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..files import atomic_path


def compose(conf_dir: str | os.PathLike[str], overrides: list[str] | None = None) -> dict:
    """The config `conf_dir/config.yaml` composes to, with DVC's own composition code."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        write(conf_dir, out, overrides)
        return yaml.safe_load(out.read_text(encoding="utf-8"))


def write(
    conf_dir: str | os.PathLike[str],
    target: str | os.PathLike[str],
    overrides: list[str] | None = None,
) -> None:
    """Compose `conf_dir` (with Hydra `overrides`) and write it to `target` atomically."""
    from dvc.utils.hydra import compose_and_dump

    with atomic_path(target, suffix=".yaml") as tmp:
        compose_and_dump(
            tmp,
            str(Path(conf_dir).resolve()),
            None,
            "config",
            str(Path(conf_dir).resolve().parent),
            list(overrides or []),
        )


def compose_with_choices(
    conf_dir: str | os.PathLike[str], overrides: Sequence[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The config `conf_dir` composes to with `overrides`, and the group options chosen.

    The same Hydra composition `dvc exp run -S` performs (see `compose`), plus the
    `model`/`optimizer`/... choices, which an experiment file needs to name.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(Path(conf_dir).resolve()), version_base=None):
            cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
        choices = {
            str(k): str(v)
            for k, v in cfg.hydra.runtime.choices.items()
            if not str(k).startswith("hydra/") and v is not None
        }
        with open_dict(cfg):
            del cfg["hydra"]
        return OmegaConf.to_container(cfg, resolve=True), choices  # type: ignore[return-value]
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(
            "overrides", list(overrides), f"overrides that compose ({str(err).splitlines()[0]})"
        ) from None


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
