"""The order of training batches: a function of the seed and the global step alone, so that a
resumed run sees exactly the batches the interrupted one had not reached.

``plan_steps`` sizes a run; ``training_stream`` returns batches ``[batch_size, H, W, C]`` (or
``(images, labels)`` batches) from global step ``start_step`` on.
"""

from __future__ import annotations

import math

import tensorflow as tf

# At most this many separately seeded passes are chained; longer runs reshuffle one seeded
# dataset per repetition (same determinism, but resuming re-reads the skipped batches).
_MAX_CHAINED_PASSES = 32
_SHUFFLE_BUFFER = 10_000


def plan_steps(image_data, batch_size: int, steps_per_epoch: int | None):
    """``(batches_per_pass, steps_per_epoch)`` for a run over ``image_data``'s training split.

    ``batches_per_pass`` is None when the dataset does not know its size; ``steps_per_epoch``
    defaults to one pass. Raises ValueError when the batch is larger than the training set, or
    the size is unknown and no ``steps_per_epoch`` is given.
    """
    batches_per_pass = image_data.num_train // batch_size if image_data.num_train else None
    if batches_per_pass == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {image_data.num_train} training "
                         "images")
    steps_per_epoch = steps_per_epoch or batches_per_pass
    if not steps_per_epoch:
        raise ValueError(f"dataset {image_data.name!r} does not know its size; give "
                         "steps_per_epoch")
    return batches_per_pass, steps_per_epoch


def training_stream(dataset: tf.data.Dataset, batch_size: int, seed: int, start_step: int = 0,
                    total_steps: int | None = None, batches_per_pass: int | None = None,
                    images_only: bool = False) -> tf.data.Dataset:
    """The training batches from global step ``start_step`` on, in an order fixed by ``seed``.

    Batch ``g`` of the stream is the same whatever ``start_step`` a process starts from, so a
    resumed run sees exactly the batches the interrupted one had not reached. Each pass over
    ``dataset`` is shuffled (buffer 10,000 examples) and batched with ``drop_remainder``.

    Args:
      dataset: ``(image, label)`` examples in a deterministic order.
      batch_size: global batch size.
      seed: fixes the order.
      start_step: the number of batches already consumed.
      total_steps: batches the whole run consumes (bounds the stream; None: endless).
      batches_per_pass: full batches per pass over ``dataset``, when known. With it and at most
        32 passes in the run, pass ``p`` is shuffled with its own seed and resuming skips whole
        passes without reading them; otherwise one seeded shuffle reshuffles every repetition
        and resuming reads and drops the ``start_step`` consumed batches.
      images_only: drop the labels.

    Returns:
      a dataset of batches ``[batch_size, H, W, C]`` (or ``(images, labels)`` batches).
    """
    if images_only:
        dataset = dataset.map(lambda image, label: image, num_parallel_calls=tf.data.AUTOTUNE)
    chained = (batches_per_pass and total_steps is not None
               and math.ceil(total_steps / batches_per_pass) <= _MAX_CHAINED_PASSES)
    if chained:
        first_pass, offset = divmod(start_step, batches_per_pass)
        last_pass = max(first_pass, math.ceil(total_steps / batches_per_pass) - 1)
        stream = None
        for pass_index in range(first_pass, last_pass + 1):
            # Distinct seeds for every (seed, pass) pair: chained runs have at most 32 passes.
            one_pass = dataset.shuffle(_SHUFFLE_BUFFER, seed=seed * 1_000_003 + pass_index,
                                       reshuffle_each_iteration=False)
            one_pass = one_pass.batch(batch_size, drop_remainder=True)
            if pass_index == first_pass:
                one_pass = one_pass.skip(offset)
            stream = one_pass if stream is None else stream.concatenate(one_pass)
    else:
        stream = dataset.shuffle(_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
        stream = stream.batch(batch_size, drop_remainder=True).repeat().skip(start_step)
    if total_steps is not None:
        stream = stream.take(max(total_steps - start_step, 0))
    return stream.prefetch(tf.data.AUTOTUNE)
