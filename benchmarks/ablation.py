"""What each way of running the tutorial MLP contributes to its speed, one change at a time.

Every variant trains the same model (784-512-256-10, SGD 0.01, batch 128, categorical
cross-entropy) on the same processed arrays; only *how* it runs changes. All variants live
in one process and take turns, one epoch each per round, so a burst of load from other
processes hits them alike; the first round (tracing, compilation) is left out.

    python benchmarks/ablation.py --rounds 5
    python benchmarks/ablation.py --rounds 5 --intra-op-threads 1   # the stage's threads on 2 cores

Prints, per variant: median wall seconds per epoch, the process CPU seconds per epoch (less
sensitive to other processes' load than wall time) and the training loss after the last
round (the maths is unchanged, so losses agree up to bfloat16 rounding and shuffle order).
Thread counts apply to a whole process, so compare them across separate runs. The batch shards
pay with one thread per shard's ops (`--intra-op-threads 1` on 2 cores, as the stage sets
them); with TensorFlow's default threads two shards' ops contend for the same cores. *So row
7 is the stage only with `--intra-op-threads` set to half the cores; the stage trains
unsharded rows with TensorFlow's default threads. The "alt:" rows change row 6.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mnist_pipeline import startup

startup.load_tensorflow()  # as the train stage loads it: its import-time objects frozen

from mnist_pipeline.data.splits import load_split  # noqa: E402
from mnist_pipeline.training.inputs import dataset  # noqa: E402
from mnist_pipeline.training.loop import EpochLoop  # noqa: E402
from mnist_pipeline.training.runtime import configure_runtime, resolve_precision  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    label: str
    precision: str = "float32"  # float32 | mixed (bfloat16/float16 where supported)
    steps_per_execution: int = 1
    jit_compile: bool = False
    pipeline: str = "legacy"  # legacy | legacy-fixed | gather | loop (EpochLoop)
    shards: int = 1  # EpochLoop's batch shards


def ablation_steps() -> list[Variant]:
    """Cumulative steps from plain Keras to the stage's defaults, then alternatives."""
    base = Variant("plain Keras: float32, 1 step/call, per-image shuffle + autotune")
    bf16 = replace(
        base, label="+ mixed precision (bfloat16 compute, float32 weights)", precision="mixed"
    )
    spe = replace(bf16, label="+ steps_per_execution 32", steps_per_execution=32)
    fixed = replace(spe, label="+ tf.data autotuner off, fixed prefetch", pipeline="legacy-fixed")
    gather = replace(
        fixed, label="+ per-epoch permutation, one gather per batch", pipeline="gather"
    )
    loop = replace(gather, label="+ own epoch loop, batches gathered in-graph", pipeline="loop")
    sharded = replace(loop, label="+ each batch in 2 shards side by side (= stage*)", shards=2)
    return [
        base,
        bf16,
        spe,
        fixed,
        gather,
        loop,
        sharded,
        replace(loop, label="  alt: + XLA jit_compile on each step", jit_compile=True),
        replace(loop, label="  alt: steps_per_execution 1", steps_per_execution=1),
        replace(
            loop, label="  alt: steps_per_execution 512 (1 call/epoch)", steps_per_execution=512
        ),
        replace(loop, label="  alt: float32", precision="float32"),
        replace(loop, label="  alt: float32 + XLA", precision="float32", jit_compile=True),
        replace(
            spe,
            label="  alt: an earlier stage (fit, bf16, spe 32, XLA, shuffle buffer)",
            jit_compile=True,
        ),
    ]


def legacy_dataset(split, batch_size: int, shuffle: bool, seed: int, autotune: bool):
    """The stage's previous input pipeline: per-image slices, shuffle buffer, one-hot map."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
    if shuffle:
        ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    ds = ds.map(
        lambda x, y: (x, tf.one_hot(tf.cast(y, tf.int32), 10)),
        num_parallel_calls=tf.data.AUTOTUNE if autotune else 1,
    )
    if autotune:
        return ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(2).with_options(options)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processed", default=str(ROOT / "data/processed"))
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs per variant")
    parser.add_argument("--only", type=int, nargs="*", help="variant numbers to run (1-based)")
    parser.add_argument("--intra-op-threads", type=int, default=0)
    parser.add_argument("--inter-op-threads", type=int, default=0)
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    # Every variant traces its own functions once; TensorFlow would warn of "retracing".
    tf.get_logger().setLevel("ERROR")

    from mnist_pipeline.config import TrainJob
    from mnist_pipeline.config.compose import compose
    from mnist_pipeline.training import models

    # The tutorial model and optimizer as conf/ composes them for the stage, and the stage's
    # runtime set-up (threads, allocators); each variant then sets its own precision and XLA.
    tutorial = TrainJob.from_config(
        compose(
            ROOT / "conf",
            [
                f"runtime.intra_op_threads={args.intra_op_threads}",
                f"runtime.inter_op_threads={args.inter_op_threads}",
            ],
        )
    )
    configure_runtime(tutorial.runtime, seed=42)
    mixed = resolve_precision("auto")
    train = load_split(args.processed, "train")
    val = load_split(args.processed, "val")

    variants = ablation_steps()
    chosen = [(i, v) for i, v in enumerate(variants, 1) if not args.only or i in args.only]
    runs = []
    for number, variant in chosen:
        keras.utils.set_random_seed(42)
        keras.mixed_precision.set_global_policy(
            mixed if variant.precision == "mixed" else variant.precision
        )
        if variant.pipeline == "loop":
            train_ds = val_ds = None  # the loop gathers its batches itself
        elif variant.pipeline == "gather":
            train_ds = dataset(train, batch_size=128, shuffle=True, seed=42)
            val_ds = dataset(val, batch_size=1000)
        else:
            autotune = variant.pipeline == "legacy"
            train_ds = legacy_dataset(train, 128, True, 42, autotune)
            val_ds = legacy_dataset(val, 1000, False, 42, autotune)
        model = models.build(tutorial.model)
        models.compile_model(
            model,
            models.build_optimizer(tutorial.optimizer),
            "categorical_crossentropy",
            steps_per_execution=variant.steps_per_execution,
            jit_compile=variant.jit_compile,
        )
        if variant.pipeline == "loop":
            loop = EpochLoop(
                model,
                train,
                val,
                batch_size=128,
                shuffle=True,
                seed=42,
                augment=False,
                steps_per_call=variant.steps_per_execution,
                jit_compile=variant.jit_compile,
                shards=variant.shards,
            )

            def one_epoch(epoch: int, loop=loop) -> keras.callbacks.History:
                return loop.run([], epochs=epoch + 1, initial_epoch=epoch)
        else:

            def one_epoch(
                epoch: int, model=model, train_ds=train_ds, val_ds=val_ds
            ) -> keras.callbacks.History:
                return model.fit(
                    train_ds,
                    validation_data=val_ds,
                    initial_epoch=epoch,
                    epochs=epoch + 1,
                    verbose=0,
                    shuffle=False,
                )  # data shuffled

        runs.append((number, variant, one_epoch, []))
    keras.mixed_precision.set_global_policy("float32")

    for epoch in range(args.rounds + 1):
        for _number, _variant, one_epoch, times in runs:
            wall, cpu = time.perf_counter(), time.process_time()
            history = one_epoch(epoch)
            times.append(
                (time.perf_counter() - wall, time.process_time() - cpu, history.history["loss"][-1])
            )
        print(f"round {epoch + 1}/{args.rounds + 1} done", file=sys.stderr, flush=True)

    print(
        f"ablation: {len(train)} training images/epoch + {len(val)} validated, batch 128; "
        f"mixed precision here = {mixed}; threads intra {args.intra_op_threads or 'auto'}, "
        f"inter {args.inter_op_threads or 'auto'}; {args.rounds} timed epochs each "
        f"(first left out); load average {os.getloadavg()[0]:.1f}"
    )
    baseline = None
    print(
        f"{'#':>2} {'variant':64s} {'s/epoch':>8s} {'min':>6s} {'cpu s':>6s} "
        f"{'speed-up':>8s} {'loss':>8s}"
    )
    for number, variant, _, times in runs:
        walls = [t[0] for t in times[1:]]
        cpus = [t[1] for t in times[1:]]
        median = statistics.median(walls)
        baseline = baseline or median
        print(
            f"{number:>2} {variant.label:64s} {median:8.3f} {min(walls):6.3f} "
            f"{statistics.median(cpus):6.3f} {baseline / median:7.2f}x {times[-1][2]:8.5f}"
        )


if __name__ == "__main__":
    main()
