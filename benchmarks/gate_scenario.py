"""The gate's robustness scenario, replayed through `dvc exp run` in a fresh tracking store:
`fast`, then `best`, then `robust`, each gated against the champion the runs before it left.

    python benchmarks/gate_scenario.py                      # fast best robust (~13 min)
    python benchmarks/gate_scenario.py --recipes fast best  # any sequence of recipes

It makes a git + DVC copy of the project (the fetch stage done from data/raw), prepares the
data and the corrupted suite there (`dvc repro preprocess corrupt`), then runs one
experiment per recipe in turn and prints each one's `evaluate:` and `gate:` lines, and at the
end `mnist-pipeline champion history`. The copy is removed afterwards unless `--keep`.
Numbers and verdicts are printed, never asserted.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from harness import (
    RAW_FILES,
    ROOT,
    add_recipes,
    check_recipes,
    child_env,
    cpu_model,
    make_repo,
    run_measured,
    scratch_dir,
)

PROGRAM = "gate_scenario"
DEFAULT_RECIPES = ("fast", "best", "robust")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipes(parser, DEFAULT_RECIPES, ())
    parser.add_argument("--raw", type=Path, default=ROOT / "data" / "raw")
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds allowed to each command"
    )
    parser.add_argument("--keep", action="store_true", help="keep the copy and print its path")
    args = parser.parse_args(argv)
    check_recipes(parser, args.recipes, ())
    if not all((args.raw / name).is_file() for name in RAW_FILES.values()):
        parser.error(f"--raw {args.raw}: no MNIST files there; run: dvc repro fetch")
    return args


def run(command: list[str], repo: Path, timeout: float) -> str:
    done = run_measured(command, cwd=repo, env=child_env(), timeout=timeout)
    return done.check(" ".join(command), PROGRAM).output


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with scratch_dir("gate-scenario-", args.keep) as work:
        repo = work / "repo"
        make_repo(repo, args.raw)
        print(f"{PROGRAM}: {cpu_model()}; recipes {', '.join(args.recipes)}", flush=True)
        run(["dvc", "repro", "preprocess", "corrupt"], repo, args.timeout)
        for name in args.recipes:
            output = run(
                ["dvc", "exp", "run", "-n", name, "-S", f"experiment={name}"], repo, args.timeout
            )
            print(f"$ dvc exp run -n {name} -S experiment={name}")
            for line in output.splitlines():
                if line.startswith(("train:", "evaluate:", "gate:")):
                    print(line)
        print("$ mnist-pipeline champion history")
        print(run(["mnist-pipeline", "champion", "history"], repo, args.timeout).rstrip())


if __name__ == "__main__":
    main()
