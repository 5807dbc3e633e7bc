"""`mnist-predict`: pictures of digits in, the champion's digit per file out."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import config as test_config
from helpers import tiny_store
from PIL import Image

from mnist_pipeline.data.splits import Split
from mnist_pipeline.serve import predict
from mnist_pipeline.tracking import logged_models

LINE = re.compile(r"^(?P<file>.+): (?P<digit>\d) \((?P<probability>[01]\.\d{3})(, unsure)?\)$")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tiny_store.Store:
    """A champion trained on font-drawn digits in MNIST format: it can read drawn digits."""
    splits = {
        name: Split(*tiny_store.glyph_digits(n, seed))
        for name, n, seed in (("train", 400, 1), ("val", 100, 2), ("test", 100, 3))
    }
    return tiny_store.build(
        tmp_path_factory.mktemp("predict-repo"), splits, epochs=10, hidden_units=(64,)
    )


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, int]:
    """Ten pictures, one per digit: big, off-centre, on paper or a dark board, noisy."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(5)
    files = {}
    for digit in range(10):
        dark_board = digit % 3 == 0
        picture = tiny_store.render_digit(
            digit,
            size=int(rng.integers(120, 200)),
            canvas=(320, 280),
            at=(int(rng.integers(10, 120)), int(rng.integers(0, 40))),
            ink=230 if dark_board else 40,
            paper=30 if dark_board else 200,
            angle=float(rng.uniform(-8, 8)),
        )
        pixels = np.asarray(picture, dtype=np.float32) + rng.normal(0, 5, picture.size[::-1])
        path = folder / f"digit-{digit}.{'jpg' if digit == 4 else 'png'}"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        files[str(path)] = digit
    return files


@pytest.fixture()
def in_repo(store, monkeypatch):
    """Run as if from the store's repository (params.yaml absent: default tracking config)."""
    monkeypatch.setenv("DVC_ROOT", str(store.root))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return store


def parse(stdout: str) -> dict[str, tuple[int, float]]:
    found = {}
    for line in stdout.splitlines():
        match = LINE.match(line)
        assert match, f"unexpected output line: {line!r}"
        found[match["file"]] = (int(match["digit"]), float(match["probability"]))
    return found


@pytest.mark.slow
def test_each_picture_gets_the_champions_digit(in_repo, pictures, capsys):
    assert predict.main(list(pictures)) == 0
    out = capsys.readouterr()
    results = parse(out.out)
    assert list(results) == list(pictures)  # one line per file, in order
    assert {f: digit for f, (digit, _) in results.items()} == pictures
    assert all(0.1 < probability <= 1.0 for _, probability in results.values())


@pytest.mark.slow
def test_unreadable_files_are_named_and_the_others_still_predicted(
    in_repo, pictures, tmp_path, capsys
):
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    blank = tmp_path / "blank.png"
    Image.new("L", (64, 64), 255).save(blank)
    good = list(pictures)[:2]
    files = [good[0], str(notes), str(tmp_path / "missing.jpg"), str(blank), good[1]]
    assert predict.main(files) == 1
    out = capsys.readouterr()
    assert list(parse(out.out)) == good
    assert f"{notes}: not a readable image" in out.err
    assert f"{tmp_path / 'missing.jpg'}: no such file" in out.err
    assert f"{blank}: no digit found" in out.err
    assert "3 of 5 files failed" in out.err


@pytest.mark.slow
def test_the_model_is_loaded_once_for_all_files(in_repo, pictures, monkeypatch, capsys):
    loads = []
    real_model = predict.OnnxDigitModel

    def counting_model(folder):
        loads.append(folder)
        return real_model(folder)

    monkeypatch.setattr(predict, "OnnxDigitModel", counting_model)
    version_uri = f"models:/mnist-classifier/{in_repo.version}"
    assert predict.main([*pictures, "--model-uri", version_uri]) == 0
    assert len(loads) == 1 and (loads[0] / "model.onnx").exists()
    assert len(parse(capsys.readouterr().out)) == len(pictures)


@pytest.mark.slow
def test_a_missing_model_is_one_clear_error(in_repo, pictures, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.main([next(iter(pictures)), "--model-uri", "models:/mnist-classifier@nobody"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "mnist-predict: error: models:/mnist-classifier@nobody:" in err
    assert "Traceback" not in err


def test_abstain_marks_unsure_answers_and_still_gives_them():
    row = np.full(10, 0.05, np.float32)
    row[3] = 0.55
    assert predict.answer("smudge.png", row, 0.9) == "smudge.png: 3 (0.550, unsure)"
    assert predict.answer("smudge.png", row, 0.5) == "smudge.png: 3 (0.550)"
    assert predict.answer("smudge.png", row, 0.0) == "smudge.png: 3 (0.550)"  # no threshold


@pytest.mark.slow
def test_abstain_threshold_and_temperature_travel_with_the_model_version(in_repo):
    """The version's pyfunc applies the temperature the train stage fitted on validation and
    knows its abstention threshold."""
    import json

    model = logged_models.load_pyfunc(f"models:/mnist-classifier/{in_repo.version}")
    fitted = json.loads((in_repo.root / "models/run.json").read_text())["calibration"]
    assert model.threshold == pytest.approx(fitted["threshold"]) == in_repo.threshold
    assert fitted["temperature"] == in_repo.temperature != 1.0
    np.testing.assert_allclose(
        model.predict(in_repo.test.images), in_repo.served(in_repo.test.images), atol=1e-5
    )


def test_no_model_is_loaded_when_no_file_converts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(predict, "OnnxDigitModel", lambda folder: pytest.fail("model loaded"))
    missing = tmp_path / "nothing.png"
    assert predict.main([str(missing)]) == 1
    assert f"{missing}: no such file" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_console_script_end_to_end(in_repo, pictures, tmp_path):
    """The installed `mnist-predict`, default model URI (the champion), one bad file."""
    script = Path(sys.executable).parent / "mnist-predict"
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    files = [*list(pictures)[:3], str(bad)]
    done = subprocess.run(
        [str(script), *files], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert done.returncode == 1, done.stderr[-2000:]
    results = parse(done.stdout)  # nothing but result lines on stdout
    assert {f: d for f, (d, _) in results.items()} == {f: pictures[f] for f in files[:3]}
    assert f"mnist-predict: {bad}: not a readable image" in done.stderr


def test_no_store_is_an_error_not_a_new_empty_store(tmp_path, monkeypatch, pictures, capsys):
    test_config.write_params(tmp_path)  # a checkout whose pipeline has not run yet
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        predict.main([next(iter(pictures))])
    assert exit_info.value.code == 1
    assert "no tracking store at sqlite:///" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()
