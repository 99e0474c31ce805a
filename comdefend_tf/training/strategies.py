"""``tf.distribute`` strategies by name, and which process of a run writes its files.

``make_strategy(name)``: ``default`` (one device), ``mirrored`` (all local GPUs, or logical CPU
devices) or ``multi_worker`` (reads ``TF_CONFIG``; ValueError without it). ``is_chief``: whether
this process writes the run's files. ``agree_on_step``: the lowest and highest step over all
workers.
"""

from __future__ import annotations

import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker")


def make_strategy(name: str) -> tf.distribute.Strategy:
    """``default`` (one device), ``mirrored`` (all local GPUs, or logical CPU devices) or
    ``multi_worker`` (reads the cluster from the ``TF_CONFIG`` environment variable).

    Create a ``multi_worker`` strategy before TensorFlow runs any op (collective ops are
    configured at program start-up).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy multi_worker needs the TF_CONFIG environment variable "
                             "describing the cluster and this worker's task")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")


def is_chief(strategy) -> bool:
    """Whether this process writes the run's files (always, except non-chief workers)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "cluster_spec", None):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (task_type == "worker" and task_id == 0
                                            and "chief" not in resolver.cluster_spec().jobs)


def agree_on_step(strategy, step):
    """The lowest and highest restored step over all workers (one collective each)."""

    @tf.function
    def gather_steps():
        per_replica = strategy.run(lambda: tf.constant([step], tf.int64))
        return strategy.gather(per_replica, axis=0)

    steps = gather_steps().numpy()
    return int(steps.min()), int(steps.max())
