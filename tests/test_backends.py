"""The purifier is written with keras.ops only: it runs, with the same numbers, on the JAX
backend of Keras 3 (what JAX users of Keras get), from a .keras file trained under TensorFlow."""

import json
import subprocess
import sys

import numpy as np
import pytest

from comdefend_tf.config import get_config
from comdefend_tf.model import ComDefend, save_comdefend
from tests.conftest import REPO_ROOT, subprocess_env

JAX_SCRIPT = """
import json, sys
import numpy as np
import keras
assert keras.backend.backend() == "jax", keras.backend.backend()
import comdefend_tf
from comdefend_tf.patches import purify_patchwise
model = comdefend_tf.load_comdefend(sys.argv[1])
images = np.load(sys.argv[2])
purified = np.asarray(model(images))
bits = np.asarray(model.code_bits(images))
tiled = np.asarray(purify_patchwise(model, images, 8, 6))
np.savez(sys.argv[3], purified=purified, bits=bits, tiled=tiled)
print(json.dumps({"tensorflow_imported": "tensorflow" in sys.modules}))
"""


def test_saved_purifier_runs_on_the_jax_backend(tmp_path):
    pytest.importorskip("jax")
    model = ComDefend(get_config("tiny"), seed=0)
    save_comdefend(model, str(tmp_path / "model"))
    images = np.random.default_rng(0).random((2, 16, 12, 3), dtype=np.float32)
    np.save(tmp_path / "images.npy", images)
    result = subprocess.run(
        [sys.executable, "-c", JAX_SCRIPT, str(tmp_path / "model"), str(tmp_path / "images.npy"),
         str(tmp_path / "out.npz")], cwd=REPO_ROOT, env=subprocess_env(KERAS_BACKEND="jax"),
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"tensorflow_imported": False}
    jax_outputs = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(jax_outputs["purified"], np.asarray(model(images)), atol=1e-5)
    np.testing.assert_array_equal(jax_outputs["bits"], np.asarray(model.code_bits(images)))
    np.testing.assert_allclose(jax_outputs["tiled"], jax_outputs["purified"], atol=1e-5)
