"""Runtime set-up for a training process: precision policy, threads, determinism, devices and
the `tf.distribute` strategy.

`configure_runtime` must run before TensorFlow builds anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from .. import startup
from ..config import RuntimeConfig, TrainJob
from ..errors import ConfigError
from . import cluster, models
from .cluster import Task


@dataclass
class Runtime:
    """What `configure_runtime` decided, for logging and for `fit`."""

    precision: str
    jit_compile: bool
    device: str
    strategy: Any
    replicas: int
    deterministic: bool
    # Concurrent shards of each training batch (`resolve_shards`); 1: the batch in one piece.
    batch_shards: int = 1
    # Intra-op threads in effect (`op_threads`, or what an earlier configuration set).
    op_threads: int = 0
    # In a multi-worker job: this process's place (`cluster.Task`); None in a single process.
    task: Task | None = None

    @property
    def chief(self) -> bool:
        """Whether this process records the run and writes outputs (always, but for the
        non-chief workers of a multi-worker job)."""
        return self.task is None or self.task.is_chief

    def describe(self) -> dict[str, Any]:
        return {
            "runtime.resolved_precision": self.precision,
            "runtime.resolved_jit_compile": self.jit_compile,
            "runtime.device": self.device,
            "runtime.replicas": self.replicas,
            "runtime.resolved_workers": self.task.workers if self.task else 1,
            "runtime.resolved_batch_shards": self.batch_shards,
            "runtime.resolved_intra_op_threads": self.op_threads,
        }


# --- runtime -------------------------------------------------------------------------------


def cpu_bf16_unit(flags: str | None = None) -> str | None:
    """ "amx" (AMX tiles), "avx512" (AVX-512 BF16 dot products only) or None: how this CPU
    multiplies bfloat16, from /proc/cpuinfo's flags (or `flags`)."""
    if flags is None:
        try:
            flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    if "amx_bf16" in flags:
        return "amx"
    return "avx512" if "avx512_bf16" in flags else None


def gpu_precision() -> str | None:
    """mixed_bfloat16 on Ampere or newer, mixed_float16 on Volta/Turing, None without a GPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
    if capability and capability >= (8, 0):
        return "mixed_bfloat16"
    if capability and capability >= (7, 0):
        return "mixed_float16"
    return "float32"


# Where bfloat16 compute measured faster than float32 on CPUs, by the layers a model's time
# goes to (benchmarks/ablation.py for dense layers, benchmarks/cnn_ablation.py for
# convolutions; docs in benchmarks/README.md). Dense layers: faster with AVX-512 BF16 alone
# and with AMX. Convolutions: faster with AMX (an Intel Xeon, 1.8-1.9x) and with AVX-512
# BF16 alone (an AMD EPYC: 1.49x for Keras' example convnet, 1.35-1.51x for the `best`
# recipe's network). A CPU with neither trains in float32.
BF16_FASTER = {
    ("amx", "dense"): True,
    ("amx", "conv"): True,
    ("avx512", "dense"): True,
    ("avx512", "conv"): True,
}


def layer_kind(model_name: str) -> str:
    """What a model's training time goes to: "conv" for the CNN, "dense" (matmuls) otherwise
    (the MLP, and the RNN, whose cells are matmuls)."""
    return "conv" if model_name == "cnn" else "dense"


def cpu_precision(unit: str | None, model_name: str) -> str:
    """bfloat16 compute where it measured faster than float32 on a CPU whose bfloat16 unit
    is `unit` (`cpu_bf16_unit`) for `model_name`'s layers (`BF16_FASTER`), else float32."""
    if unit is not None and BF16_FASTER[(unit, layer_kind(model_name))]:
        return "mixed_bfloat16"
    return "float32"


def resolve_precision(requested: str, model_name: str = "mlp") -> str:
    """The policy `runtime.precision` asks for; `auto`: the GPU's mixed precision, or on a
    CPU what `cpu_precision` chooses for this CPU and model."""
    if requested != "auto":
        return requested
    on_gpu = gpu_precision()
    if on_gpu is not None:
        return on_gpu
    return cpu_precision(cpu_bf16_unit(), model_name)


# The fewest images a batch shard gets from `batch_shards: auto`. On a 2-core AMD EPYC an
# epoch of the train stage took 0.61-0.65 s in 2 shards of 64 against 0.79-1.10 s in one
# batch of 128, one of the `fast` CNN 4.2-4.3 s against 4.9-5.4 s; 4 shards of 32 were
# slower than one batch (benchmarks/README.md, "Batch shards").
MIN_SHARD_IMAGES = 64


def resolve_shards(
    cfg: RuntimeConfig, *, batch_size: int | None, batch_statistics: bool, on_gpu: bool, cores: int
) -> int:
    """How many shards each training batch is split into (`runtime.batch_shards`).

    The shards' forward and backward passes are independent until their gradients are summed,
    so TensorFlow runs them side by side, each op on its share of the cores: small matrix
    products use one core well and two badly. Each shard's mean loss is weighted by its share
    of the batch, so the sum is the gradient of the whole batch's mean loss: the same step,
    up to float rounding, for layers that treat each image on its own (dropout draws its
    masks per shard: other units drop, as often). Not where a layer computes statistics across
    the batch (`batch_statistics`: batch normalization), nor under a tf.distribute strategy
    (which splits batches itself). `auto`: on a CPU, one shard per core this process may use
    (`intra_op_threads` when set: a sweep worker's share), at most `inter_op_threads` when
    set (the ops that run side by side), at least `MIN_SHARD_IMAGES` images each; 1 on a
    GPU, where one large product is what runs fast, and without a `batch_size`.
    """
    requested = cfg.batch_shards
    if requested == "auto":
        if batch_size is None or on_gpu or batch_statistics or cfg.distribute != "default":
            return 1
        budget = cfg.intra_op_threads or cores
        side_by_side = cfg.inter_op_threads or budget
        return max(1, min(budget, side_by_side, batch_size // MIN_SHARD_IMAGES))
    if requested > 1 and batch_statistics:
        raise ConfigError(
            "runtime.batch_shards",
            requested,
            "1 or auto for a model with batch normalization (its statistics over a shard "
            "would differ from those over the batch)",
        )
    if requested > 1 and cfg.distribute != "default":
        raise ConfigError(
            "runtime.batch_shards",
            requested,
            f"1 or auto with runtime.distribute={cfg.distribute} (the strategy splits "
            "batches across its replicas itself)",
        )
    if batch_size is not None and requested > batch_size:
        raise ConfigError(
            "runtime.batch_shards",
            requested,
            f"at most train.batch_size ({batch_size}): each shard needs an image",
        )
    return requested


def op_threads(cfg: RuntimeConfig, shards: int, cores: int) -> int:
    """Intra-op threads for training in `shards` shards: the process's cores
    (`intra_op_threads` when set, else all it may use) shared out between the shards, whose
    ops run side by side; without shards, `intra_op_threads` (0: TensorFlow decides)."""
    if shards <= 1:
        return cfg.intra_op_threads
    return max(1, (cfg.intra_op_threads or cores) // shards)


# Threads, logical devices and the other process-wide settings apply only before
# TensorFlow's runtime starts, so only the first configuration in a process applies them
# (sweep workers train many trials).
_devices_configured = False


def _configure_devices(cfg: RuntimeConfig, intra: int) -> int:
    """Apply the process-wide settings (the first call only); the intra-op threads in effect
    (0: TensorFlow's default, all cores)."""
    global _devices_configured
    if _devices_configured:
        return tf.config.threading.get_intra_op_parallelism_threads()
    _devices_configured = True
    if intra:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    if cfg.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(cfg.inter_op_threads)
    gpus = tf.config.list_physical_devices("GPU")
    if cfg.logical_devices > 1 and not gpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.logical_devices
        )
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    return tf.config.threading.get_intra_op_parallelism_threads()


def configure_runtime(
    cfg: RuntimeConfig,
    seed: int,
    model_name: str = "mlp",
    *,
    batch_size: int | None = None,
    batch_statistics: bool = False,
) -> Runtime:
    """Apply the runtime config for training a `model_name` model (`runtime.precision: auto`
    depends on its layers) in batches of `batch_size` (`runtime.batch_shards: auto` depends
    on it, and on whether the model has `batch_statistics`; None: no shards). Device settings
    take effect on the first call in a process; a later call with `batch_shards: auto` gets
    no more shards than the threads that call set leave cores for."""
    gpus = tf.config.list_physical_devices("GPU")
    cores = startup.cores()
    shards = resolve_shards(
        cfg,
        batch_size=batch_size,
        batch_statistics=batch_statistics,
        on_gpu=bool(gpus),
        cores=cores,
    )
    threads = _configure_devices(cfg, op_threads(cfg, shards, cores)) or cores
    if cfg.batch_shards == "auto" and shards > 1:
        shards = max(1, min(shards, (cfg.intra_op_threads or cores) // threads))

    keras.utils.set_random_seed(seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()

    precision = resolve_precision(cfg.precision, model_name)
    keras.mixed_precision.set_global_policy(precision)

    jit = str(cfg.jit_compile).lower()
    # XLA fuses the small ops around each matmul: a clear win on GPUs. On CPUs it measured
    # ~20% slower per epoch (its matmuls are slower than the oneDNN bfloat16 kernels the
    # graph executor runs) and its compilation costs seconds and ~100 MB: GPUs only.
    jit_compile = jit == "true" or (jit == "auto" and bool(gpus) and not cfg.deterministic)

    if cfg.distribute == "mirrored":
        devices = None
        if not gpus and cfg.logical_devices > 1:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    elif cfg.distribute == "multi_worker":
        task = cluster.task()
        if task is None:
            raise ConfigError(
                "runtime.distribute",
                cfg.distribute,
                f"a {cluster.TF_CONFIG} describing this worker's cluster (the "
                "train stage starts runtime.workers local workers itself)",
            )
        # No `CommunicationOptions(timeout_seconds=...)`: TensorFlow keeps a thread per
        # collective op for that long (thousands per minute here, until thread creation
        # fails); `WorkerLoop`'s watchdog bounds a stalled step instead.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    if cfg.distribute != "default":
        jit_compile = jit == "true"  # XLA across replicas only when asked for explicitly
    device = f"GPU x{len(gpus)}" if gpus else f"CPU ({os.cpu_count()} cores)"
    return Runtime(
        precision=precision,
        jit_compile=jit_compile,
        device=device,
        strategy=strategy,
        replicas=strategy.num_replicas_in_sync,
        deterministic=cfg.deterministic,
        batch_shards=shards,
        op_threads=threads,
        task=cluster.task() if cfg.distribute == "multi_worker" else None,
    )


def configure_job(job: TrainJob) -> Runtime:
    """`configure_runtime` for training `job`'s model, as the train stage does."""
    return configure_runtime(
        job.runtime,
        job.train.seed,
        job.model.name,
        batch_size=job.train.batch_size,
        batch_statistics=models.batch_statistics(job.model),
    )
