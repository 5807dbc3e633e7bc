"""The training callbacks: the learning rate each epoch gets and the signal checks, through
our `EpochLoop` and through Keras' `Model.fit` (which trains under a tf.distribute strategy).
"""

from __future__ import annotations

import pytest
import tensorflow as tf
from helpers import config as test_config
from helpers.digits import synthetic_digits

from mnist_pipeline.data.splits import Split, load_split, save_split
from mnist_pipeline.training.callbacks import Calls, onecycle_factor
from mnist_pipeline.training.fit import fit
from mnist_pipeline.training.runtime import Runtime

BASE_LR = 0.05
# The rates as float32 (the optimizer's variable), epoch by epoch.
COSINE_WARMUP = [
    0.01666666753590107,
    0.03333333507180214,
    0.05000000074505806,
    0.04267767071723938,
    0.02500000037252903,
    0.007322330493479967,
]
STEP = [
    0.05000000074505806,
    0.05000000074505806,
    0.02500000037252903,
    0.02500000037252903,
    0.012500000186264515,
    0.012500000186264515,
]
PLATEAU = [
    4.999999987376214e-07,
    4.999999987376214e-07,
    2.499999993688107e-07,
    1.2499999968440534e-07,
    6.249999984220267e-08,
]


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("splits")
    for name, n, seed in (("train", 96, 1), ("val", 32, 2)):
        save_split(folder, name, Split(*synthetic_digits(n, seed)))
    return load_split(folder, "train"), load_split(folder, "val")


def _runtime(distributed: bool) -> Runtime:
    strategy = (
        tf.distribute.MirroredStrategy(["/cpu:0"]) if distributed else tf.distribute.get_strategy()
    )
    return Runtime(
        precision="float32",
        jit_compile=False,
        device="CPU",
        strategy=strategy,
        replicas=1,
        deterministic=False,
    )


def _rates(
    splits,
    lr_schedule: dict,
    *,
    learning_rate: float = BASE_LR,
    epochs: int = 6,
    distributed: bool = False,
) -> list[float]:
    job = test_config.train_job(
        model={"name": "mlp", "hidden_units": [8]},
        optimizer={"name": "sgd", "learning_rate": learning_rate},
        train={"epochs": epochs, "verbose": 0, "batch_size": 32, "lr_schedule": lr_schedule},
    )
    result = fit(job, _runtime(distributed), *splits, steps_per_execution=1)
    return result.history["learning_rate"]


@pytest.mark.parametrize("distributed", [False, True], ids=["epoch-loop", "keras-fit"])
def test_cosine_with_warmup_and_step_schedules_give_the_same_rates(splits, distributed):
    cosine = {"name": "cosine", "warmup_epochs": 2}
    assert _rates(splits, cosine, distributed=distributed) == COSINE_WARMUP
    step = {"name": "step", "step_epochs": 2, "factor": 0.5}
    assert _rates(splits, step, distributed=distributed) == STEP


@pytest.mark.parametrize("distributed", [False, True], ids=["epoch-loop", "keras-fit"])
def test_onecycle_sets_the_rate_before_every_group_of_steps(splits, distributed):
    # 96 images in batches of 32, one step a call: the rate is set before steps 0, 1 and 2
    # of each epoch; the epoch logs the last, i.e. the factor at epoch + 2/3.
    onecycle = {"name": "onecycle", "warmup_epochs": 1, "min_factor": 0.0}
    rates = _rates(splits, onecycle, epochs=3, distributed=distributed)
    cfg = test_config.section("train", epochs=3, lr_schedule=onecycle)
    expected = [BASE_LR * onecycle_factor(cfg, epoch + 2 / 3) for epoch in range(3)]
    assert rates == pytest.approx(expected, rel=1e-6)
    assert rates[0] < rates[1] > rates[2]


@pytest.mark.parametrize("distributed", [False, True], ids=["epoch-loop", "keras-fit"])
def test_after_warm_up_the_plateau_callback_owns_the_rate(splits, distributed):
    # A rate this small leaves val_loss flat: every epoch after the first is a plateau, and
    # ReduceLROnPlateau halves the rate; the warm-up epoch's rate comes from the schedule.
    plateau = {"name": "plateau", "warmup_epochs": 1, "patience": 1, "factor": 0.5}
    rates = _rates(splits, plateau, learning_rate=1e-6, epochs=5, distributed=distributed)
    assert rates == PLATEAU


@pytest.mark.parametrize("distributed", [False, True], ids=["epoch-loop", "keras-fit"])
def test_the_signal_check_runs_at_every_step_validation_and_epoch_edge(splits, distributed):
    # 96 images in batches of 32, one step a call: 3 training steps, 1 validation batch and
    # 2 epoch edges an epoch.
    seen = []
    job = test_config.train_job(
        model={"name": "mlp", "hidden_units": [8]},
        train={"epochs": 2, "verbose": 0, "batch_size": 32},
    )
    fit(
        job,
        _runtime(distributed),
        *splits,
        steps_per_execution=1,
        extra_callbacks=[Calls(lambda: seen.append(1))],
    )
    assert len(seen) == 2 * (3 + 1 + 2)

    class Stop(Exception):
        pass

    def stop() -> None:
        raise Stop

    with pytest.raises(Stop):
        fit(
            job,
            _runtime(distributed),
            *splits,
            steps_per_execution=1,
            extra_callbacks=[Calls(stop)],
        )
