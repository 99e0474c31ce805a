"""Benchmarks ComDefend against this machine's own measured limits; writes BENCHMARKS.md + JSON.

    PYTHONPATH=. .venv/bin/python -m benchmarks.benchmark --output_dir=benchmarks/results

One process measures everything (memory probes are fresh child processes, because a process's
peak memory never goes down), so the ratios in the table come from one run on one machine:

* ceilings: a 4096x4096 matmul and the paper's widest 3x3 convolution (128 -> 256 channels on
  64 images of 32x32) in float32 and bfloat16, measured at the start and at the end of the run;
* purification throughput in float32 and bf16 (Keras ``mixed_bfloat16``): 28x28x1 and
  32x32x3 batches of 64, one 224x224x3 image, one 1024x1024x3 image patch-wise; images/s and
  achieved GFLOP/s, FLOPs counted as 2 * 9 * C_in * C_out per pixel per convolution;
* patch-wise purification of small images (does tiling starve the cores?);
* peak resident memory (fresh processes) of patch-wise and whole-image purification;
* training throughput (images/s) in float32 and bf16, and the held-out PSNR each reaches from
  the same initialisation after the same steps;
* latency p50/p99 of the exported ``purify`` and ``purify_bytes`` signatures on one 224x224
  image against the raw Keras call;
* reconstruction quality of bf16 against float32 on real images with the authors' released
  weights (PSNR difference and the fraction of code bits that flip).

Timings: ``time.perf_counter`` around calls whose result is copied to NumPy (so the work is
done), after warm-up calls, median over repeats. ``--quick`` shrinks everything to a smoke test.
Other processes on the machine slow it down: the load average is recorded before and after.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("output_dir", "benchmarks/results", "Where the JSON file goes.")
flags.DEFINE_string("markdown", None, "Where the Markdown table goes (default: BENCHMARKS.md; "
                    "with --quick, OUTPUT_DIR/BENCHMARKS_quick.md; '' for none).")
flags.DEFINE_bool("quick", False, "Smoke test: tiny sizes and repeats (minutes -> seconds); "
                  "its numbers are not benchmarks.")
flags.DEFINE_integer("repeats", 5, "Timed repeats per case (the median is reported).",
                     lower_bound=1)
flags.DEFINE_integer("latency_calls", 30, "Timed calls per serving latency case.", lower_bound=2)
flags.DEFINE_integer("train_steps", 40, "Timed training steps per precision.", lower_bound=1)
flags.DEFINE_integer("memory_large_size", 4096, "Side of the large image in the memory test.",
                     lower_bound=64)
flags.DEFINE_integer("memory_whole_max_size", 1024, "Largest whole-image memory probe; larger "
                     "whole images are extrapolated (their activations may not fit in RAM).",
                     lower_bound=64)
flags.DEFINE_enum("memory_precision", "bfloat16", ["float32", "bfloat16"],
                  "Precision of the memory probes (bf16 keeps the large image fast).")
flags.DEFINE_string("memory_large_config", "small", "Config purifying the large image for "
                    "real in the memory test ('paper' takes ~10 min more on two cores).")
flags.DEFINE_string("reference_dir", None, "The authors' reference files (default: "
                    "$COMDEFEND_REFERENCE_DIR or ../shared/reference beside the repo).")
FLAGS = flags.FLAGS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISIONS = ("float32", "bfloat16")


def model_config_name(quick: bool) -> str:
    """The paper config, or the narrow ``small`` one for a ``--quick`` smoke test."""
    return "small" if quick else "paper"


# ----------------------------------------------------------------------------- helpers
def conv_flops_per_pixel(config) -> int:
    """FLOPs per pixel of one ComDefend forward pass: 2 * 9 * C_in * C_out per 3x3 conv."""
    total = 0
    for first, widths, last in (
            (config.input_channels, config.encoder_widths, config.code_channels),
            (config.code_channels, config.decoder_widths, config.input_channels)):
        channels = (first,) + tuple(widths) + (last,)
        total += sum(2 * 9 * c_in * c_out for c_in, c_out in zip(channels, channels[1:]))
    return total


def time_calls(function, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds per call of ``function()`` (its result is converted to NumPy inside the timing)."""
    import numpy as np

    for _ in range(warmup):
        np.asarray(function())
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        if isinstance(result, dict):
            for value in result.values():
                np.asarray(value)
        else:
            np.asarray(result)
        seconds.append(time.perf_counter() - start)
    return seconds


def median(values):
    import numpy as np

    return float(np.median(values))


def percentile(values, q):
    import numpy as np

    return float(np.percentile(values, q))


def machine_info() -> dict:
    cpu_model, flags_line = None, ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name") and cpu_model is None:
                    cpu_model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags_line:
                    flags_line = line.split(":", 1)[1]
    except OSError:
        pass
    interesting = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
                   "amx_bf16")
    memory_gib = None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            memory_gib = int(meminfo.readline().split()[1]) / 2**20
    except OSError:
        pass
    return {"cpu_model": cpu_model or platform.processor(), "cpu_count": os.cpu_count(),
            "cpu_flags": [f for f in interesting if f in flags_line.split()],
            "memory_gib": memory_gib, "python": platform.python_version()}


def available_memory_mib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# -------------------------------------------------------------------------- ceilings
def measure_ceilings(repeats: int, quick: bool) -> dict:
    """GFLOP/s of a large matmul and of the paper's widest 3x3 convolution, per precision."""
    import tensorflow as tf

    size = 1024 if quick else 4096
    batch, side, c_in, c_out = (8, 32, 128, 256) if quick else (64, 32, 128, 256)
    rng = tf.random.Generator.from_seed(0)
    results = {}
    for precision in PRECISIONS:
        dtype = tf.float32 if precision == "float32" else tf.bfloat16
        left = tf.cast(rng.normal([size, size]), dtype)
        right = tf.cast(rng.normal([size, size]), dtype)
        matmul = tf.function(lambda a, b: tf.matmul(a, b))
        seconds = median(time_calls(lambda: matmul(left, right), repeats))
        results[f"matmul_{precision}"] = {
            "shape": f"{size}x{size} @ {size}x{size}", "seconds": seconds,
            "gflops": 2 * size ** 3 / seconds / 1e9}
        images = tf.cast(rng.uniform([batch, side, side, c_in]), dtype)
        kernel = tf.cast(rng.normal([3, 3, c_in, c_out]) * 0.03, dtype)
        conv = tf.function(lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"))
        seconds = median(time_calls(lambda: conv(images, kernel), repeats))
        results[f"conv_{precision}"] = {
            "shape": f"3x3 conv {c_in}->{c_out} on {batch}x{side}x{side}", "seconds": seconds,
            "gflops": 2 * 9 * c_in * c_out * batch * side * side / seconds / 1e9}
    return results


def best_ceilings(*runs: dict) -> dict:
    """Per precision, the best GFLOP/s of any ceiling kernel in any of the runs."""
    best = {}
    for precision in PRECISIONS:
        best[precision] = max(run[f"{kind}_{precision}"]["gflops"]
                              for run in runs for kind in ("matmul", "conv"))
    return best


# ---------------------------------------------------------------------- purification
def measure_purification(quick: bool, repeats: int) -> list[dict]:
    """Throughput of batch, single-image and patch-wise purification per precision."""
    import numpy as np
    import tensorflow as tf

    from comdefend_tf.training import precision as precision_lib
    from comdefend_tf.config import get_config
    from comdefend_tf.patches import purify_patchwise, receptive_field_radius

    rng = np.random.default_rng(0)
    large = 256 if quick else 1024
    batch = 8 if quick else 64
    cases = [  # name, channels, images shape, method, patch settings
        (f"{batch}x28x28x1 batch", 1, (batch, 28, 28, 1), "whole", None),
        (f"{batch}x32x32x3 batch", 3, (batch, 32, 32, 3), "whole", None),
        (f"{batch}x32x32x3 via purify_patchwise (patch 32)", 3, (batch, 32, 32, 3),
         "patchwise", (32, 0, 64)),
        ("1x224x224x3 image", 3, (1, 224, 224, 3), "whole", None),
        ("1x224x224x3 patch-wise, 7x7 tiles of 32 (the release)", 3, (1, 224, 224, 3),
         "patchwise", (32, 0, 64)),
        (f"1x{large}x{large}x3 patch-wise (tiles 256, overlap 18 = exact, 4 per call)", 3,
         (1, large, large, 3), "patchwise", (256, None, 4)),
    ]
    models = {}
    rows = []
    for precision in PRECISIONS:
        for name, channels, shape, method, patching in cases:
            key = (precision, channels)
            if key not in models:
                model = precision_lib.build_comdefend(get_config(model_config_name(quick),
                                                                 input_channels=channels),
                                                      precision, seed=0)
                models[key] = (model, tf.function(lambda x, m=model: m(x, training=False)))
            model, purify = models[key]
            images = tf.constant(rng.random(shape, dtype=np.float32))
            flops_per_pixel = conv_flops_per_pixel(model.config)
            computed_pixels = shape[0] * shape[1] * shape[2]
            if method == "whole":
                run = lambda: purify(images)  # noqa: E731
            else:
                patch, overlap, per_call = patching
                if overlap is None:
                    overlap = receptive_field_radius(model.config)
                run = lambda p=patch, o=overlap, b=per_call: purify_patchwise(  # noqa: E731
                    purify, images, p, o, b)
                computed_pixels = _patchwise_pixels(shape, patch, overlap)
            if shape[1] >= 512:
                # Warm up on a crop with the same window and chunk shapes (4 windows, 1 call),
                # then time few repeats: each is seconds to minutes.
                crop = images[:, :2 * patch, :2 * patch, :]
                time_calls(lambda: purify_patchwise(purify, crop, patch, overlap, per_call), 1,
                           warmup=0)
                case_repeats = max(1, repeats // 2)
                seconds = median(time_calls(run, case_repeats, warmup=0))
            else:
                case_repeats = repeats
                seconds = median(time_calls(run, case_repeats))
            output_pixels = shape[0] * shape[1] * shape[2]
            rows.append({
                "case": name, "precision": precision, "method": method, "shape": list(shape),
                "seconds": seconds, "images_per_s": shape[0] / seconds,
                "output_megapixels_per_s": output_pixels / seconds / 1e6,
                "gflop_per_image": flops_per_pixel * shape[1] * shape[2] / 1e9,
                "computed_pixel_overhead": computed_pixels / output_pixels,
                "gflops": flops_per_pixel * computed_pixels / seconds / 1e9,
                "repeats": case_repeats})
    return rows


def _patchwise_pixels(shape, patch, overlap) -> int:
    """Pixels actually pushed through the network by purify_patchwise (windows incl. context)."""
    def axis(length):
        patch_len = min(patch, length)
        window = min(patch_len + 2 * overlap, length)
        return window, -(-length // patch_len)

    (row_window, rows), (col_window, cols) = axis(shape[1]), axis(shape[2])
    return shape[0] * rows * cols * row_window * col_window


# ---------------------------------------------------------------------------- memory
def run_memory_probe(size: int, method: str, precision: str, config_name: str,
                     timeout_s: float) -> dict:
    command = [sys.executable, "-m", "benchmarks.memory_probe", f"--size={size}",
               f"--method={method}", f"--precision={precision}", f"--config={config_name}"]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    try:
        finished = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True,
                                  text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"size": size, "method": method, "precision": precision,
                "error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in finished.stdout.splitlines() if line.startswith("{")]
    if finished.returncode != 0 or not lines:
        return {"size": size, "method": method, "precision": precision,
                "error": f"exit {finished.returncode}: {finished.stderr[-500:]}"}
    return json.loads(lines[-1])


def whole_image_bytes_estimate(config, size: int, bytes_per_value: int) -> int:
    """Activation bytes of the widest layer pair (input + output of a conv, plus its ELU)."""
    widths = (config.input_channels,) + tuple(config.encoder_widths) + (config.code_channels,) \
        + tuple(config.decoder_widths) + (config.input_channels,)
    widest = max(a + 2 * b for a, b in zip(widths, widths[1:]))
    return size * size * widest * bytes_per_value


def _linear_in_pixels(first: dict, last: dict, size: int) -> float:
    """Peak MiB at ``size`` from two probes, assuming peak = a + b * pixels."""
    slope = (last["vm_hwm_mib"] - first["vm_hwm_mib"]) / (last["size"] ** 2 - first["size"] ** 2)
    return first["vm_hwm_mib"] + slope * (size ** 2 - first["size"] ** 2)


def measure_memory(quick: bool) -> dict:
    """Peak memory of patch-wise and whole-image purification, each in a fresh process.

    The model config's probes run at two sizes per method and are extrapolated linearly in
    pixels to the large size; the large image itself is purified patch-wise for real with
    ``--memory_large_config`` (default ``small``: the same tiling and stitching, 38x fewer
    FLOPs, so the 4096x4096 run takes a minute rather than ten on two cores).
    """
    from comdefend_tf.config import get_config

    precision = FLAGS.memory_precision
    config_name = model_config_name(quick)
    large_config = "tiny" if quick else FLAGS.memory_large_config
    small, middle, large = (128, 256, 512) if quick else (512, 1024, FLAGS.memory_large_size)
    available = available_memory_mib()
    bytes_per_value = 2 if precision == "bfloat16" else 4
    probes = []
    for method in ("patchwise", "whole"):
        for size in (small, middle):
            estimate_mib = whole_image_bytes_estimate(get_config(config_name), size,
                                                      bytes_per_value) / 2**20
            if method == "whole" and (size > FLAGS.memory_whole_max_size or (
                    available is not None and estimate_mib > 0.5 * available)):
                probes.append({"size": size, "method": method, "precision": precision,
                               "config": config_name,
                               "error": f"skipped: ~{estimate_mib:.0f} MiB of activations"})
                continue
            probes.append(run_memory_probe(size, method, precision, config_name, 900))
    for size in (small, large):
        probes.append(run_memory_probe(size, "patchwise", precision, large_config, 1500))

    def probe(method, size, config):
        return next((p for p in probes if p["method"] == method and p["size"] == size
                     and p["config"] == config and "error" not in p), None)

    extrapolated = {}
    for method in ("patchwise", "whole"):
        first, last = probe(method, small, config_name), probe(method, middle, config_name)
        if first and last:
            extrapolated[method] = _linear_in_pixels(first, last, large)
    measured_small = probe("patchwise", small, large_config)
    measured_large = probe("patchwise", large, large_config)
    paper_small = probe("patchwise", small, config_name)
    if paper_small and measured_small and measured_large and large_config != config_name:
        # The growth with image size (input, stitched rows, output) does not depend on the
        # config; the per-call activations, which do, are the same at both sizes.
        extrapolated["patchwise (measured growth)"] = (
            paper_small["vm_hwm_mib"] + measured_large["vm_hwm_mib"]
            - measured_small["vm_hwm_mib"])
    return {
        "precision": precision, "config": config_name, "large_config": large_config,
        "small_size": small, "middle_size": middle, "large_size": large, "probes": probes,
        "extrapolated_large_mib": extrapolated,
        "patchwise_large_over_small_measured": (
            measured_large["vm_hwm_mib"] / measured_small["vm_hwm_mib"]
            if measured_small and measured_large else None),
        "patchwise_large_over_small_extrapolated": (
            extrapolated["patchwise (measured growth)"] / paper_small["vm_hwm_mib"]
            if "patchwise (measured growth)" in extrapolated else None),
        "memory_available_mib_at_start": available}


# -------------------------------------------------------------------------- training
def measure_training(quick: bool, steps: int) -> dict:
    """Optimizer steps per second (paper config, 32x32x3 photos, batch 20) per precision, and
    the held-out PSNR each precision reaches from the same initial weights."""
    import keras
    import numpy as np

    from comdefend_tf.io import datasets as data_lib
    from comdefend_tf.training import precision as precision_lib
    from comdefend_tf.config import get_config
    from comdefend_tf.model import psnr

    photos = data_lib.load_dataset("photos32")
    train_images, _ = data_lib.take_arrays(photos.train)
    test_images, _ = data_lib.take_arrays(photos.test)
    batch_size = 20
    steps = 3 if quick else steps
    config = get_config(model_config_name(quick))
    initial = precision_lib.build_comdefend(config, "float32", seed=0).get_weights()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(train_images))
    batches = [train_images[np.resize(order, (steps + 2) * batch_size)[i * batch_size:
                                                                      (i + 1) * batch_size]]
               for i in range(steps + 2)]
    results = {"config": config.name, "batch_size": batch_size, "steps": steps,
               "train_images": len(train_images), "test_images": len(test_images)}
    for precision in PRECISIONS:
        keras.utils.set_random_seed(0)
        model = precision_lib.build_comdefend(config, precision, seed=0)
        model.set_weights(initial)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        for warm in batches[:2]:  # traces the train function
            model.train_on_batch(warm)
        seconds = []
        for batch in batches[2:]:
            start = time.perf_counter()
            model.train_on_batch(batch)
            seconds.append(time.perf_counter() - start)
        held_out = float(np.mean(keras.ops.convert_to_numpy(
            psnr(test_images, model.predict(test_images, batch_size=64, verbose=0)))))
        results[precision] = {"seconds_per_step": median(seconds),
                              "images_per_s": batch_size / median(seconds),
                              "gflops": 3 * conv_flops_per_pixel(config) * 32 * 32 * batch_size
                              / median(seconds) / 1e9,
                              "held_out_psnr_db": held_out}
    return results


# --------------------------------------------------------------------------- serving
def measure_serving(quick: bool, calls: int) -> dict:
    """Latency of the raw Keras call and of the exported signatures on one 224x224 image."""
    import numpy as np
    import tensorflow as tf

    from comdefend_tf.training import precision as precision_lib
    from comdefend_tf.config import get_config
    try:
        from comdefend_tf.serving import export as serving_export
        from comdefend_tf.serving import signatures as serving
        from comdefend_tf.serving.settings import ExportSettings
    except ImportError as error:
        return {"error": f"comdefend_tf.serving is not importable: {error}"}
    from PIL import Image

    side = 64 if quick else 224
    calls = 3 if quick else calls
    model = precision_lib.build_comdefend(get_config(model_config_name(quick)), "float32", seed=0)
    image = np.random.default_rng(0).random((1, side, side, 3), dtype=np.float32)
    image_uint8 = np.round(image[0] * 255).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(image_uint8).save(png, format="PNG")
    image_tensor = tf.constant(image)
    png_tensor = tf.constant([png.getvalue()])
    raw_function = tf.function(lambda x: model(x, training=False))
    with tempfile.TemporaryDirectory() as export_base:
        settings = ExportSettings(inference_noise_std=0.0)
        version_dir = serving_export.export_savedmodel(model, export_base, settings=settings)
        loaded = tf.saved_model.load(version_dir)
        purify = loaded.signatures[serving.SIGNATURE_PURIFY]
        purify_bytes = loaded.signatures[serving.SIGNATURE_PURIFY_BYTES]
        cases = {
            "keras eager model(x)": lambda: model(image_tensor, training=False),
            "keras tf.function(model)": lambda: raw_function(image_tensor),
            "SavedModel purify": lambda: purify(images=image_tensor),
            "SavedModel purify_bytes (PNG in, PNG out)": lambda: purify_bytes(
                image_bytes=png_tensor),
        }
        samples = {name: [] for name in cases}
        for name, function in cases.items():  # warm-up
            time_calls(function, 1, warmup=2)
        for _ in range(calls):  # interleaved, so background load hits every case alike
            for name, function in cases.items():
                samples[name] += time_calls(function, 1, warmup=0)
        purified = np.asarray(purify(images=image_tensor)["purified"])
        reference = np.asarray(raw_function(image_tensor))
    latencies = {name: {"p50_ms": 1e3 * percentile(values, 50),
                        "p99_ms": 1e3 * percentile(values, 99), "calls": len(values)}
                 for name, values in samples.items()}
    raw = latencies["keras tf.function(model)"]["p50_ms"]
    for name, row in latencies.items():
        row["overhead_vs_keras_tf_function"] = row["p50_ms"] / raw - 1
    eager = latencies["keras eager model(x)"]["p50_ms"]
    for row in latencies.values():
        row["overhead_vs_keras_eager"] = row["p50_ms"] / eager - 1
    return {"side": side, "latencies": latencies,
            "max_abs_difference_purify_vs_keras": float(np.max(np.abs(purified - reference)))}


# --------------------------------------------------------------------------- quality
def measure_quality(quick: bool) -> list[dict]:
    """bf16 against float32 with the authors' released weights on real images."""
    from comdefend_tf.io import datasets as data_lib
    from comdefend_tf.training import precision as precision_lib

    reference_dir = FLAGS.reference_dir or os.environ.get(
        "COMDEFEND_REFERENCE_DIR", os.path.join(os.path.dirname(REPO_ROOT), "shared",
                                                "reference"))
    weights = os.path.join(reference_dir, "weights")
    count = 32 if quick else 512
    rows = []
    for label, encoder, decoder, dataset in (
            ("released RGB model (enc20/dec20_0.0001), hard code", "enc20_0.0001.npy",
             "dec20_0.0001.npy", "photos32"),
            ("released Fashion-MNIST model (enc/dec_mnist), soft code", "enc_mnist.npy",
             "dec_mnist.npy", "mnist5k")):
        encoder_path, decoder_path = (os.path.join(weights, encoder),
                                      os.path.join(weights, decoder))
        if not (os.path.isfile(encoder_path) and os.path.isfile(decoder_path)):
            rows.append({"model": label, "error": f"weights not found under {weights}"})
            continue
        try:
            from comdefend_tf.weights.importer import load_reference_model
        except ImportError as error:
            rows.append({"model": label, "error": f"comdefend_tf.weights.importer: {error}"})
            continue
        model, _ = load_reference_model(encoder_path, decoder_path, inference_noise_std=0.0)
        source = data_lib.load_dataset(dataset)
        images, _ = data_lib.take_arrays(source.test, count)
        report = precision_lib.quality_check(model, images)
        rows.append({"model": label, "dataset": f"{dataset} held-out", **report.to_dict()})
    return rows


# ---------------------------------------------------------------------------- report
def targets(results: dict) -> list[dict]:
    rows = []
    purification = {(r["case"], r["precision"]): r for r in results["purification"]}
    ceilings = results["ceiling_best_gflops"]
    batch_case = next(r["case"] for r in results["purification"] if "32x32x3 batch" in r["case"])
    float_row = purification[(batch_case, "float32")]
    bf16_row = purification[(batch_case, "bfloat16")]
    fraction = float_row["gflops"] / ceilings["float32"]
    rows.append({"target": "float32 batch purification >= 80% of the float32 ceiling",
                 "measured": f"{100 * fraction:.0f}% ({float_row['gflops']:.0f} of "
                             f"{ceilings['float32']:.0f} GFLOP/s, {batch_case})",
                 "met": fraction >= 0.8})
    speedup = bf16_row["images_per_s"] / float_row["images_per_s"]
    rows.append({"target": "bf16 batch purification >= 5x float32",
                 "measured": f"{speedup:.2f}x ({bf16_row['images_per_s']:.1f} vs "
                             f"{float_row['images_per_s']:.1f} images/s)",
                 "met": speedup >= 5})
    quality = [q for q in results["quality"] if "error" not in q]
    if quality:
        worst_drop = max(q["psnr_drop_db"] for q in quality)
        worst_flips = max(q["bit_flip_fraction"] for q in quality)
        rows.append({"target": "bf16 PSNR within 0.2 dB of float32, <= 1% code bits flipped",
                     "measured": f"worst PSNR drop {worst_drop:+.3f} dB, worst "
                                 f"{100 * worst_flips:.2f}% bits flipped",
                     "met": abs(worst_drop) <= 0.2 and worst_flips <= 0.01})
    memory = results["memory"]
    measured = memory.get("patchwise_large_over_small_measured")
    extrapolated = memory.get("patchwise_large_over_small_extrapolated")
    if measured is not None or extrapolated is not None:
        parts = []
        if measured is not None:
            parts.append(f"{measured:.2f}x measured ({memory['large_config']} config)")
        if extrapolated is not None:
            parts.append(f"{extrapolated:.2f}x estimated ({memory['config']} config: its "
                         f"{memory['small_size']}^2 peak plus the measured growth)")
        rows.append({"target": f"patch-wise peak memory {memory['large_size']}^2 <= 2x "
                               f"{memory['small_size']}^2",
                     "measured": "; ".join(parts),
                     "met": all(r <= 2 for r in (measured, extrapolated) if r is not None)})
    serving_result = results["serving"]
    if "latencies" in serving_result:
        overhead = serving_result["latencies"]["SavedModel purify"][
            "overhead_vs_keras_tf_function"]
        rows.append({"target": "serving overhead <= 10% over the raw Keras call "
                               f"({serving_result['side']}x{serving_result['side']})",
                     "measured": f"purify {100 * overhead:+.1f}% p50 vs tf.function(model)",
                     "met": overhead <= 0.10})
    return rows


ANALYSIS_HEADING = "## Analysis"
ANALYSIS_STALE_NOTE = ("*Written for an earlier run (the date above): the tables are newer. "
                       "Rewrite this analysis for them.*")


def hand_written_analysis(previous_markdown: str | None, date: str) -> str:
    """The hand-written ``## Analysis`` section of an earlier BENCHMARKS.md, to carry over when
    the tables are regenerated ("" when there is none). Its heading names the run it was
    written for (``## Analysis (written by hand for the run of DATE)``); when that is not
    ``date``, a note says the tables are newer. The analysis is the one place where the tables
    are interpreted, so it is kept rather than lost, and never passed off as this run's."""
    if not previous_markdown or f"\n{ANALYSIS_HEADING}" not in previous_markdown:
        return ""
    section = previous_markdown[previous_markdown.index(f"\n{ANALYSIS_HEADING}") + 1:]
    heading, _, body = section.partition("\n")
    written_for = re.search(r"for the run of ([^;)]+)", heading)
    if written_for and written_for.group(1).strip() != date and ANALYSIS_STALE_NOTE not in body:
        body = f"\n{ANALYSIS_STALE_NOTE}\n" + body
    return f"{heading}\n{body.rstrip()}\n"


def markdown(results: dict, previous_markdown: str | None = None) -> str:
    """BENCHMARKS.md for ``results``: generated tables, then the hand-written analysis of an
    earlier file (``hand_written_analysis``), if any."""
    info = results["machine"]
    lines = [
        "# ComDefend benchmarks", "",
        f"Generated by `{results['command']}` on {results['date']} "
        f"({'QUICK SMOKE TEST, not a benchmark' if results['quick'] else 'full run'}, "
        f"{results['total_seconds'] / 60:.1f} min).", "",
        f"Machine: {info['cpu_model']}, {info['cpu_count']} cores, "
        f"{info['memory_gib']:.0f} GiB RAM, CPU flags {', '.join(info['cpu_flags'])}; "
        f"TensorFlow {results['versions']['tensorflow']}, Keras {results['versions']['keras']}, "
        f"Python {info['python']}. Load average (1 min) before/after: "
        f"{results['load_before'][0]:.2f} / {results['load_after'][0]:.2f} (other processes "
        "on the machine slow every case alike; ratios are more stable than absolutes).", "",
        f"bf16 hardware detection (`comdefend_tf.training.precision.bf16_hardware_support`): "
        f"{results['bf16_hardware'][1]} -> {'supported' if results['bf16_hardware'][0] else 'not supported'}; "
        f"`--precision=auto` picks: {results['auto_choice']}.", "",
        "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for row in results["targets"]:
        lines.append(f"| {row['target']} | {row['measured']} | {'yes' if row['met'] else 'NO'} |")
    lines += ["", "## Ceilings (GFLOP/s, median of repeats)", "",
              "| kernel | start of run | end of run |", "|---|---|---|"]
    for key, start in results["ceilings_start"].items():
        end = results["ceilings_end"][key]
        lines.append(f"| {key.split('_')[0]} {key.split('_')[1]}: {start['shape']} | "
                     f"{start['gflops']:.0f} | {end['gflops']:.0f} |")
    ceilings = results["ceiling_best_gflops"]
    lines += ["", f"Best ceiling per precision (the denominator below): float32 "
              f"{ceilings['float32']:.0f} GFLOP/s, bfloat16 {ceilings['bfloat16']:.0f} GFLOP/s.",
              "", f"## Purification throughput ({results['config']} config, random images)", "",
              f"FLOPs: 2*9*C_in*C_out per pixel per 3x3 conv = "
              f"{results['flops_per_pixel_rgb'] / 1e6:.2f} MFLOP per RGB pixel, "
              f"{results['flops_per_pixel_gray'] / 1e6:.2f} MFLOP per gray pixel. GFLOP/s counts "
              "the pixels actually computed (patch-wise windows include their overlap).", "",
              "| case | precision | images/s | output Mpx/s | GFLOP/s | % of ceiling | "
              "bf16 speed-up |", "|---|---|---|---|---|---|---|"]
    by_key = {(r["case"], r["precision"]): r for r in results["purification"]}
    for row in results["purification"]:
        speedup = ""
        if row["precision"] == "bfloat16":
            speedup = f"{row['images_per_s'] / by_key[(row['case'], 'float32')]['images_per_s']:.2f}x"
        lines.append(f"| {row['case']} | {row['precision']} | {row['images_per_s']:.2f} | "
                     f"{row['output_megapixels_per_s']:.3f} | {row['gflops']:.0f} | "
                     f"{100 * row['gflops'] / ceilings[row['precision']]:.0f}% | {speedup} |")
    memory = results["memory"]
    lines += ["", f"## Peak memory (fresh process per row, {memory['precision']})", "",
              "Patch-wise: `purify_patchwise`, tiles 256, overlap 0, 4 windows per call. "
              "Baseline = the process after importing TensorFlow and building the model. "
              "Extrapolated rows: `patchwise`/`whole` assume peak = a + b * pixels through "
              "the two measured sizes of that config (crude: allocator slack at small sizes is "
              "multiplied too); `patchwise (measured growth)` adds the growth measured for real "
              f"with the {memory['large_config']} config to the {memory['config']} config's "
              "small-image peak (the growth is image-sized buffers, independent of the config).",
              "", "| config | image | method | peak VmHWM (MiB) | baseline (MiB) | seconds |",
              "|---|---|---|---|---|---|"]
    for probe in memory["probes"]:
        config_name = probe.get("config", "")
        if "error" in probe:
            lines.append(f"| {config_name} | {probe['size']}x{probe['size']} | {probe['method']} "
                         f"| {probe['error']} | | |")
        else:
            lines.append(f"| {config_name} | {probe['size']}x{probe['size']} | "
                         f"{probe['method']} | {probe['vm_hwm_mib']:.0f} | "
                         f"{probe['baseline_vm_hwm_mib']:.0f} | {probe['seconds']:.1f} |")
    for method, value in memory["extrapolated_large_mib"].items():
        lines.append(f"| {memory['config']} | {memory['large_size']}x{memory['large_size']} | "
                     f"{method}, extrapolated | ~{value:.0f} | | |")
    training = results["training"]
    lines += ["", f"## Training throughput ({training['config']} config, photos32 32x32x3, "
              f"batch {training['batch_size']}, Adam, {training['steps']} timed steps from the "
              "same initial weights)", "",
              "| precision | images/s | GFLOP/s (3x forward) | held-out PSNR after the steps (dB) |",
              "|---|---|---|---|"]
    for precision in PRECISIONS:
        row = training[precision]
        lines.append(f"| {precision} | {row['images_per_s']:.1f} | {row['gflops']:.0f} | "
                     f"{row['held_out_psnr_db']:.2f} |")
    serving_result = results["serving"]
    lines += ["", "## Serving latency (one image, float32, export settings: noise 0, "
              "tiles 256 with overlap 18)", ""]
    if "latencies" in serving_result:
        side = serving_result["side"]
        lines += [f"Image {side}x{side}x3; calls interleaved across cases. Overhead is the p50 "
                  "ratio minus 1. Max |purify - Keras| = "
                  f"{serving_result['max_abs_difference_purify_vs_keras']:.2e}.", "",
                  "| call | p50 (ms) | p99 (ms) | calls | overhead vs tf.function(model) | "
                  "overhead vs eager model(x) |", "|---|---|---|---|---|---|"]
        for name, row in serving_result["latencies"].items():
            lines.append(f"| {name} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['calls']} "
                         f"| {100 * row['overhead_vs_keras_tf_function']:+.1f}% | "
                         f"{100 * row['overhead_vs_keras_eager']:+.1f}% |")
    else:
        lines.append(f"Not measured: {serving_result['error']}")
    lines += ["", "## bf16 against float32 on real images (deterministic purifier, noise 0)", "",
              "| model | images | PSNR float32 (dB) | PSNR bf16 (dB) | drop (dB) | code bits "
              "flipped | max abs pixel difference |", "|---|---|---|---|---|---|---|"]
    for row in results["quality"]:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['error']} | | | | | |")
        else:
            lines.append(f"| {row['model']} ({row['dataset']}) | {row['num_images']} | "
                         f"{row['psnr_float32_db']:.3f} | {row['psnr_bfloat16_db']:.3f} | "
                         f"{row['psnr_drop_db']:+.3f} | {100 * row['bit_flip_fraction']:.3f}% | "
                         f"{row['max_abs_difference']:.4f} |")
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]]
    analysis = "" if results["quick"] else hand_written_analysis(previous_markdown,
                                                                  results["date"])
    return "\n".join(lines) + "\n" + (f"\n{analysis}" if analysis else "")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf
    from tqdm import tqdm

    from comdefend_tf.training import precision as precision_lib
    from comdefend_tf.config import get_config

    started = time.perf_counter()
    quick, repeats = FLAGS.quick, (2 if FLAGS.quick else FLAGS.repeats)
    results = {"command": "PYTHONPATH=. .venv/bin/python -m benchmarks.benchmark "
                          + " ".join(sys.argv[1:]),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "quick": quick, "machine": machine_info(),
               "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
               "load_before": list(os.getloadavg()),
               "bf16_hardware": list(precision_lib.bf16_hardware_support()),
               "auto_choice": None,
               "config": model_config_name(quick),
               "flops_per_pixel_rgb": conv_flops_per_pixel(get_config(model_config_name(quick))),
               "flops_per_pixel_gray": conv_flops_per_pixel(
                   get_config(model_config_name(quick), 1))}
    steps = [("ceilings (start)", lambda: results.__setitem__(
                  "ceilings_start", measure_ceilings(repeats, quick))),
             ("purification", lambda: results.__setitem__(
                  "purification", measure_purification(quick, repeats))),
             ("quality", lambda: results.__setitem__("quality", measure_quality(quick))),
             ("training", lambda: results.__setitem__(
                  "training", measure_training(quick, FLAGS.train_steps))),
             ("serving", lambda: results.__setitem__(
                  "serving", measure_serving(quick, FLAGS.latency_calls))),
             ("ceilings (end)", lambda: results.__setitem__(
                  "ceilings_end", measure_ceilings(repeats, quick))),
             ("memory (child processes)", lambda: results.__setitem__(
                  "memory", measure_memory(quick)))]
    progress = tqdm(steps, desc="benchmark", unit="section")
    for label, step in progress:
        progress.set_postfix_str(label)
        section_start = time.perf_counter()
        step()
        results.setdefault("section_seconds", {})[label] = time.perf_counter() - section_start
    results["ceiling_best_gflops"] = best_ceilings(results["ceilings_start"],
                                                   results["ceilings_end"])
    passed = [q for q in results["quality"] if "error" not in q]
    supported = results["bf16_hardware"][0]
    results["auto_choice"] = ("bfloat16" if supported and passed and all(q["passed"] for q in passed)
                              else "float32")
    results["load_after"] = list(os.getloadavg())
    results["total_seconds"] = time.perf_counter() - started
    results["targets"] = targets(results)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    json_path = os.path.join(FLAGS.output_dir,
                             "benchmark_quick.json" if quick else "benchmark.json")
    with open(json_path, "w") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    print(f"Wrote {json_path}")
    markdown_path = FLAGS.markdown
    if markdown_path is None:
        markdown_path = (os.path.join(FLAGS.output_dir, "BENCHMARKS_quick.md") if quick
                         else "BENCHMARKS.md")
    if markdown_path:
        previous = None
        if os.path.exists(markdown_path):
            with open(markdown_path) as handle:
                previous = handle.read()
        from comdefend_tf.io.atomic import write_text_atomic
        write_text_atomic(markdown_path, markdown(results, previous))
        print(f"Wrote {markdown_path}")
    for row in results["targets"]:
        print(f"{'met ' if row['met'] else 'MISS'}  {row['target']}: {row['measured']}")


if __name__ == "__main__":
    app.run(main)
