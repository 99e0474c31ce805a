"""Child process of the benchmark: purifies one random image and prints its peak memory.

    python -m benchmarks.memory_probe --size=4096 --method=patchwise --precision=bfloat16

Prints one JSON line: the settings, seconds, ``ru_maxrss_mib`` (getrusage peak resident set)
and ``vm_hwm_mib`` (``VmHWM`` from /proc/self/status), plus the same two read just before the
image was created (``baseline_*``: the interpreter, TensorFlow and the model). Run in a fresh
process per measurement because a process's peak never goes down.
"""

import json
import resource
import time

from absl import app, flags

flags.DEFINE_integer("size", 512, "Image height and width in pixels.", lower_bound=1)
flags.DEFINE_enum("method", "patchwise", ["patchwise", "whole"],
                  "patchwise: comdefend_tf.patches.purify_patchwise; whole: one network call.")
flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"], "Compute precision.")
flags.DEFINE_string("config", "paper", "Named ComDefend config.")
flags.DEFINE_integer("patch_size", 256, "Output tile side (patchwise).", lower_bound=1)
flags.DEFINE_integer("overlap", 0, "Context pixels per tile side (patchwise).", lower_bound=0)
flags.DEFINE_integer("patch_batch_size", 4, "Windows per network call (patchwise).",
                     lower_bound=1)
FLAGS = flags.FLAGS


def peak_memory_mib() -> dict:
    """Peak resident memory so far: getrusage's ru_maxrss and /proc's VmHWM, in MiB."""
    peaks = {"ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    peaks["vm_hwm_mib"] = int(line.split()[1]) / 1024
    except OSError:
        peaks["vm_hwm_mib"] = None
    return peaks


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    from comdefend_tf.training import precision as precision_lib
    from comdefend_tf.config import get_config
    from comdefend_tf.patches import purify_patchwise

    model = precision_lib.build_comdefend(get_config(FLAGS.config), FLAGS.precision, seed=0)
    purify = tf.function(lambda images: model(images, training=False))
    # Build the graph on a tiny input so tracing memory is part of the baseline.
    purify(tf.zeros([1, 8, 8, model.config.input_channels]))
    baseline = peak_memory_mib()
    rng = np.random.default_rng(0)
    image = rng.random((1, FLAGS.size, FLAGS.size, model.config.input_channels),
                       dtype=np.float32)
    start = time.perf_counter()
    if FLAGS.method == "whole":
        purified = purify(image)
    else:
        purified = purify_patchwise(purify, image, FLAGS.patch_size, FLAGS.overlap,
                                    FLAGS.patch_batch_size)
    checksum = float(np.asarray(purified).mean())
    seconds = time.perf_counter() - start
    result = {"size": FLAGS.size, "method": FLAGS.method, "precision": FLAGS.precision,
              "config": FLAGS.config, "patch_size": FLAGS.patch_size, "overlap": FLAGS.overlap,
              "patch_batch_size": FLAGS.patch_batch_size, "seconds": seconds,
              "mean_output": checksum,
              **{f"baseline_{key}": value for key, value in baseline.items()},
              **peak_memory_mib()}
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
