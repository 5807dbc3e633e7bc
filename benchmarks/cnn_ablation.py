"""Why a convolutional model trains at the speed it does on this machine, one change at a time.

Every variant trains a CNN with the stage's own epoch loop (`EpochLoop`) on the same first
`--images` training images; only one thing changes per row: the model (the pipeline's
`model=cnn`, Keras' example convnet, the `fast`/`best` recipes' models), per-layer precision
(float32 or bfloat16 compute for the convolutions and for the dense layers separately),
batch size, `steps_per_execution` and XLA. All variants live in one process and take turns,
one epoch each per round; the first round (tracing) is left out. Process-wide settings
(oneDNN on or off, thread counts) need a run of their own:

    python benchmarks/cnn_ablation.py --rounds 3
    TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/cnn_ablation.py --rounds 3 --only 1 2
    python benchmarks/cnn_ablation.py --rounds 3 --intra-op-threads 1 --inter-op-threads 1

Prints, per variant: median wall and process CPU milliseconds per 1,000 training images
(batch sizes differ, so per image is the comparable unit), the speed-up against row 1, and
the forward multiply-adds per image, which is what separates the models.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]

# Model overrides (conf/model/cnn.yaml keys) of the architectures compared.
PIPELINE_CNN: dict = {}  # conf/model/cnn.yaml as it is
KERAS_EXAMPLE = {
    "filters": [32, 64],
    "convs_per_block": 1,
    "batch_norm": False,
    "padding": "valid",
    "dense_units": 0,
    "dropout": 0.5,
}


@dataclass(frozen=True)
class Variant:
    label: str
    model: dict = field(default_factory=dict)
    conv_precision: str = "float32"  # float32 | mixed_bfloat16
    dense_precision: str = "float32"
    norm_precision: str = ""  # batch norm's; "": as the convolutions
    batch_size: int = 128
    steps_per_execution: int = 32
    jit_compile: bool = False
    augment: bool = False  # train.augment: random shifts, rotations, zooms


def variants() -> list[Variant]:
    base = Variant("model=cnn, float32, batch 128, 32 steps/call", PIPELINE_CNN)
    bf16 = replace(
        base,
        label="  bf16 convs and dense (runtime.precision auto, as shipped)",
        conv_precision="mixed_bfloat16",
        dense_precision="mixed_bfloat16",
    )
    example = Variant("Keras example convnet (model: padding valid, no BN), float32", KERAS_EXAMPLE)
    best = Variant(
        "one conv per block, same padding, BN, dense 128, float32",
        {
            "filters": [32, 64],
            "convs_per_block": 1,
            "batch_norm": True,
            "padding": "same",
            "dense_units": 128,
            "dropout": 0.3,
        },
    )
    # conf/experiment/best.yaml's and robust.yaml's network
    recipe = Variant(
        "best/robust recipes' convnet (16 then 64 filters, 2 valid convs per block), float32",
        {
            "filters": [16, 64],
            "convs_per_block": 2,
            "batch_norm": False,
            "padding": "valid",
            "dense_units": 128,
            "dropout": 0.3,
        },
    )
    bn = replace(
        example,
        label="Keras example convnet + batch norm, float32",
        model={**KERAS_EXAMPLE, "batch_norm": True, "dropout": 0.25},
    )
    both = {"conv_precision": "mixed_bfloat16", "dense_precision": "mixed_bfloat16"}
    return [
        base,
        bf16,
        replace(base, label="  bf16 convs only", conv_precision="mixed_bfloat16"),
        replace(base, label="  bf16 dense only", dense_precision="mixed_bfloat16"),
        replace(base, label="  batch 64", batch_size=64),
        replace(base, label="  batch 256", batch_size=256),
        replace(base, label="  batch 512", batch_size=512),
        replace(base, label="  1 step/call", steps_per_execution=1),
        replace(base, label="  XLA jit_compile", jit_compile=True),
        replace(bf16, label="  bf16 + XLA jit_compile", jit_compile=True),
        replace(bf16, label="  bf16 + augmentation (train.augment)", augment=True),
        example,
        replace(
            example,
            label="  bf16",
            conv_precision="mixed_bfloat16",
            dense_precision="mixed_bfloat16",
        ),
        best,
        replace(best, label="  bf16", **both),
        replace(best, label="  batch 256", batch_size=256),
        replace(bf16, label="model=cnn, bf16 but batch norm in float32", norm_precision="float32"),
        bn,
        replace(bn, label="  bf16", **both),
        replace(bn, label="  bf16, batch norm in float32", **both, norm_precision="float32"),
        replace(
            best,
            label="one conv per block... (row 14), bf16 but batch norm in float32",
            **both,
            norm_precision="float32",
        ),
        replace(example, label="Keras example convnet, bf16, batch 256", **both, batch_size=256),
        replace(
            example, label="Keras example convnet, bf16, 1 step/call", **both, steps_per_execution=1
        ),
        recipe,
        replace(recipe, label="  bf16", **both),
    ]


def forward_macs(model) -> int:
    """Multiply-adds per image of the convolutions and dense layers (forward pass)."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            height, width, filters = layer.output.shape[1:]
            kernel = layer.kernel.shape
            total += height * width * filters * kernel[0] * kernel[1] * kernel[2]
        elif isinstance(layer, keras.layers.Dense):
            total += layer.kernel.shape[0] * layer.kernel.shape[1]
    return int(total)


def set_layer_precision(model, conv: str, dense: str, norm: str = "") -> None:
    """Compute dtype per layer type; the float32 output layer stays float32 (as built)."""
    import keras

    for layer in model.layers:
        if layer.name == "probabilities":
            continue
        if isinstance(layer, keras.layers.Dense):
            layer.dtype_policy = keras.DTypePolicy(dense)
        elif isinstance(layer, keras.layers.BatchNormalization) and norm:
            layer.dtype_policy = keras.DTypePolicy(norm)
        elif not isinstance(layer, keras.layers.InputLayer) and layer.name != "rescale":
            # convolutions and what runs between them (batch norm, pooling, activations)
            layer.dtype_policy = keras.DTypePolicy(conv)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processed", default=str(ROOT / "data/processed"))
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per variant")
    parser.add_argument(
        "--images",
        type=int,
        default=6400,
        help="training images per epoch (the first N of the split)",
    )
    parser.add_argument("--only", type=int, nargs="*", help="variant numbers to run (1-based)")
    parser.add_argument("--intra-op-threads", type=int, default=0)
    parser.add_argument("--inter-op-threads", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("rounds", "images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: got {getattr(args, name)}, expected an integer >= 1")

    from mnist_pipeline import startup

    startup.load_tensorflow()  # as the train stage loads it: its import-time objects frozen
    import keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # every variant traces its own functions

    from mnist_pipeline.config import TrainJob
    from mnist_pipeline.config.compose import compose
    from mnist_pipeline.data.splits import Split, load_split
    from mnist_pipeline.training import models
    from mnist_pipeline.training.loop import EpochLoop
    from mnist_pipeline.training.runtime import configure_runtime

    job = TrainJob.from_config(
        compose(
            ROOT / "conf",
            [
                "model=cnn",
                "optimizer=adam",
                "runtime.precision=float32",
                f"runtime.intra_op_threads={args.intra_op_threads}",
                f"runtime.inter_op_threads={args.inter_op_threads}",
            ],
        )
    )
    configure_runtime(job.runtime, seed=42)
    full = load_split(args.processed, "train")
    train = Split(full.images[: args.images].copy(), full.labels[: args.images].copy())
    val = load_split(args.processed, "val")
    val = Split(val.images[:1000].copy(), val.labels[:1000].copy())

    chosen = [(i, v) for i, v in enumerate(variants(), 1) if not args.only or i in args.only]
    runs = []
    for number, variant in chosen:
        keras.utils.set_random_seed(42)
        cfg = job.model.model_copy(update=variant.model)
        model = models.build(cfg)
        set_layer_precision(
            model, variant.conv_precision, variant.dense_precision, variant.norm_precision
        )
        models.compile_model(
            model,
            models.build_optimizer(job.optimizer),
            "categorical_crossentropy",
            steps_per_execution=variant.steps_per_execution,
            jit_compile=variant.jit_compile,
        )
        loop = EpochLoop(
            model,
            train,
            val,
            batch_size=variant.batch_size,
            shuffle=True,
            seed=42,
            augment=variant.augment,
            steps_per_call=variant.steps_per_execution,
            jit_compile=variant.jit_compile,
        )
        runs.append((number, variant, loop, forward_macs(model), []))

    for epoch in range(args.rounds + 1):
        for _number, _variant, loop, _macs, times in runs:
            wall, cpu = time.perf_counter(), time.process_time()
            history = loop.run([], epochs=epoch + 1, initial_epoch=epoch)
            times.append(
                (time.perf_counter() - wall, time.process_time() - cpu, history.history["loss"][-1])
            )
        print(f"round {epoch + 1}/{args.rounds + 1} done", file=sys.stderr, flush=True)

    per_k = 1000 / len(train)
    print(
        f"cnn ablation: {len(train)} training images/epoch + {len(val)} validated, Adam; "
        f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}; threads "
        f"intra {args.intra_op_threads or 'auto'}, inter {args.inter_op_threads or 'auto'}; "
        f"{args.rounds} timed epochs each (first left out); load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'#':>2} {'variant':62s} {'ms/1k img':>9s} {'cpu ms':>7s} {'speed-up':>8s} "
        f"{'MMAC/img':>8s}"
    )
    baseline = None
    for number, variant, loop, macs, times in runs:
        wall = statistics.median(t[0] for t in times[1:]) * 1000 * per_k
        cpu = statistics.median(t[1] for t in times[1:]) * 1000 * per_k
        baseline = baseline or wall
        print(
            f"{number:>2} {variant.label:62s} {wall:9.1f} {cpu:7.1f} {baseline / wall:7.2f}x "
            f"{macs / 1e6:8.2f}"
        )
        loop.close()


if __name__ == "__main__":
    main()
