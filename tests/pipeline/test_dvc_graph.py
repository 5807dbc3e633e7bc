"""dvc.yaml's deps cover everything each stage runs, so editing any module a stage imports
makes `dvc status` report that stage changed (RELIABILITY.md #16)."""

from __future__ import annotations

import ast
import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from helpers import repo
from helpers.digits import ROOT

PACKAGE = "mnist_pipeline"
PACKAGE_DIR = Path("src") / PACKAGE


# --- the checker ---------------------------------------------------------------------------


def module_file(root: Path, dotted: str) -> Path | None:
    """The file (relative to `root`) that defines module `dotted` of the package, if any."""
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if (root / candidate).is_file():
            return candidate
    return None


def package_of(path: Path) -> list[str]:
    """The package a file's relative imports start from (`src/mnist_pipeline/a/b.py` -> a)."""
    if PACKAGE_DIR not in path.parents:
        return []
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    return parts[:-1]  # a module's package; `__init__` is its own package's file


def imported_names(root: Path, path: Path) -> set[str]:
    """Every dotted name `path` imports, anywhere in the file (inside functions too), with
    relative imports made absolute; `from x import y` names both x and x.y (y may be a module)."""
    tree = ast.parse((root / path).read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = package_of(path)
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def import_closure(root: Path, entry: Path) -> set[Path]:
    """`entry` and every package file it imports, transitively; importing `a.b.c` runs the
    `__init__.py` of `a` and `a.b` too."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(root, path):
            parts = name.split(".")
            for end in range(1, len(parts) + 1):
                found = module_file(root, ".".join(parts[:end]))
                if found is not None and found not in seen:
                    todo.append(found)
    return seen


def entrypoint(root: Path, cmd: str) -> Path:
    """The script (`python pipelines/x.py ...`) or module (`python -m pkg.x`) a stage runs."""
    words = shlex.split(cmd)
    if "-m" in words:
        found = module_file(root, words[words.index("-m") + 1])
        if found is not None:
            return found
    scripts = [Path(word) for word in words if word.endswith(".py")]
    if not scripts:
        raise AssertionError(f"no Python entrypoint in {cmd!r}")
    return scripts[0]


def resolve(text: str, params: dict) -> str:
    """`${paths.model}` -> its value in params.yaml."""

    def value(match: re.Match) -> str:
        node = params
        for key in match.group(1).split("."):
            node = node[key]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def uncovered(root: Path, pipeline: dict, params: dict) -> list[str]:
    """`stage: file` for each file a stage imports that none of its deps covers (the file
    itself or a folder above it)."""
    gaps = []
    for name, stage in pipeline["stages"].items():
        deps = [
            Path(resolve(dep if isinstance(dep, str) else next(iter(dep)), params))
            for dep in stage.get("deps", [])
        ]
        cmd = stage["cmd"] if isinstance(stage["cmd"], str) else " ".join(stage["cmd"])
        for path in sorted(import_closure(root, entrypoint(root, cmd))):
            if not any(path == dep or dep in path.parents for dep in deps):
                gaps.append(f"{name}: {path.as_posix()}")
    return gaps


def load(root: Path) -> tuple[dict, dict]:
    return (
        yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")),
        yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")),
    )


# --- the tests -----------------------------------------------------------------------------


def test_every_stage_lists_every_file_it_imports():
    pipeline, params = load(ROOT)
    assert uncovered(ROOT, pipeline, params) == []


def test_the_closure_follows_every_kind_of_import():
    closure = {p.as_posix() for p in import_closure(ROOT, Path("pipelines/train.py"))}
    assert "src/mnist_pipeline/__init__.py" in closure  # a package's __init__
    assert "src/mnist_pipeline/training/job.py" in closure  # imported inside main()
    assert "src/mnist_pipeline/training/loop.py" in closure  # relative, transitively
    assert "src/mnist_pipeline/files.py" in closure  # `from ..files import`
    assert not any("serve/" in path or "sweep/" in path for path in closure)


@pytest.mark.parametrize(
    "stage, dep, reported",
    [
        # a whole subpackage, imported only inside the stage's main()
        ("train", "src/mnist_pipeline/training", "train: src/mnist_pipeline/training/job.py"),
        # a top-level module that only relative imports reach
        ("evaluate", "src/mnist_pipeline/files.py", "evaluate: src/mnist_pipeline/files.py"),
        # the package's __init__, run by every import of the package
        ("champion", "src/mnist_pipeline/__init__.py", "champion: src/mnist_pipeline/__init__.py"),
        # the entrypoint itself
        ("fetch", "pipelines/fetch.py", "fetch: pipelines/fetch.py"),
        # a ${paths.*} dep is resolved, so dropping the tracking folder is what shows
        (
            "champion",
            "src/mnist_pipeline/tracking",
            "champion: src/mnist_pipeline/tracking/store.py",
        ),
    ],
)
def test_a_missing_dep_is_reported(stage, dep, reported):
    pipeline, params = load(ROOT)
    broken = copy.deepcopy(pipeline)
    broken["stages"][stage]["deps"].remove(dep)
    gaps = uncovered(ROOT, broken, params)
    assert reported in gaps
    assert all(gap.startswith(f"{stage}: ") for gap in gaps)


def test_dvc_status_sees_an_edit_to_a_module_train_imports(tmp_path):
    """Real DVC: with train locked, bytecode written beside the sources changes nothing
    (.dvcignore), and an edited module under training/ makes train changed."""
    path = repo.make(tmp_path / "repo")
    # Lock train without training: its deps and outputs exist, and `dvc commit` records them.
    (path / "data/processed").mkdir(parents=True)
    (path / "data/processed/test.npz").write_bytes(b"placeholder")
    for out in (
        "models/model.keras",
        "models/run.json",
        "metrics/train.json",
        "plots/train_history.csv",
    ):
        (path / out).parent.mkdir(parents=True, exist_ok=True)
        (path / out).write_text("placeholder\n")
    repo.run(["dvc", "commit", "--force", "train"], path)
    assert _status(path) == {}

    cache = path / "src/mnist_pipeline/training/__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "loop.cpython-311.pyc").write_bytes(b"\x00bytecode")
    assert _status(path) == {}, "bytecode is ignored (.dvcignore)"

    loop = path / "src/mnist_pipeline/training/loop.py"
    loop.write_text(loop.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
    assert _status(path) == {
        "train": [{"changed deps": {"src/mnist_pipeline/training": "modified"}}]
    }


def _status(path: Path) -> dict:
    done = repo.run(["dvc", "status", "--json", "train"], path)
    return json.loads(done.stdout or "{}")
