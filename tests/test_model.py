"""ComCNN / ResCNN architecture, the ComDefend model's modes, loss terms and serialisation."""

import numpy as np
import pytest
import keras

from comdefend_tf.config import ComDefendConfig, get_config
from comdefend_tf.model import ComDefend, load_comdefend, psnr, save_comdefend


def _conv_shapes(model):
    return [tuple(layer.kernel.shape) for layer in model.layers
            if isinstance(layer, keras.layers.Conv2D)]


def test_paper_config_matches_the_released_rgb_architecture():
    model = ComDefend(get_config("paper"))
    assert model.encoder.count_params() == 783_372
    assert model.decoder.count_params() == 783_363
    widths = [3, 16, 32, 64, 128, 256, 128, 64, 32, 12]
    assert _conv_shapes(model.encoder) == [(3, 3, a, b) for a, b in zip(widths, widths[1:])]
    widths = [12, 32, 64, 128, 256, 128, 64, 32, 16, 3]
    assert _conv_shapes(model.decoder) == [(3, 3, a, b) for a, b in zip(widths, widths[1:])]


def test_released_gray_config_matches_the_released_one_channel_architecture():
    model = ComDefend(get_config("released_gray"))
    assert model.encoder.count_params() == 813_220
    assert model.decoder.count_params() == 813_217
    widths = [1, 32, 64, 128, 256, 128, 64, 64, 32, 4]
    assert _conv_shapes(model.encoder) == [(3, 3, a, b) for a, b in zip(widths, widths[1:])]


def test_paper_config_for_one_channel_uses_four_code_channels():
    config = get_config("paper", input_channels=1)
    assert (config.input_channels, config.code_channels) == (1, 4)
    assert config.encoder_widths == get_config("paper").encoder_widths


def test_config_validation_and_json_round_trip():
    config = get_config("tiny", train_noise_std=3.0, train_mode="straight_through")
    assert ComDefendConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="train_mode"):
        get_config("tiny", train_mode="hard")
    with pytest.raises(ValueError, match="unknown config"):
        get_config("huge")
    with pytest.raises(ValueError, match="unknown ComDefendConfig fields"):
        ComDefendConfig.from_dict({"widths": [1]})


@pytest.mark.parametrize("shape", [(1, 7, 13, 3), (2, 32, 32, 3), (1, 5, 401, 3)])
def test_any_image_size_keeps_shape_and_range(shape):
    model = ComDefend(get_config("tiny"), seed=0)
    images = np.random.default_rng(0).random(shape, dtype=np.float32)
    outputs = model.forward(images)
    assert outputs["purified"].shape == shape
    assert outputs["code_logits"].shape == shape[:3] + (12,)
    purified = np.asarray(outputs["purified"])
    assert purified.min() >= 0.0 and purified.max() <= 1.0
    assert set(np.unique(np.asarray(outputs["code"]))) <= {0.0, 1.0}


def test_inference_modes_and_noise():
    images = np.random.default_rng(1).random((2, 12, 12, 3), dtype=np.float32)
    hard = ComDefend(get_config("tiny", inference_mode="hard"), seed=0)
    outputs = hard.forward(images)
    np.testing.assert_array_equal(np.asarray(outputs["code"]),
                                  (np.asarray(outputs["code_logits"]) > 0).astype(np.float32))
    soft = hard.with_inference(mode="soft")
    soft_outputs = soft.forward(images)
    np.testing.assert_allclose(np.asarray(soft_outputs["code"]),
                               1 / (1 + np.exp(-np.asarray(outputs["code_logits"]))), atol=1e-6)
    # Deterministic at noise 0, random when inference noise is set; weights are shared.
    np.testing.assert_array_equal(np.asarray(hard(images)), np.asarray(hard(images)))
    noisy = hard.with_inference(noise_std=50.0, seed=1)
    assert noisy.encoder is hard.encoder
    assert not np.array_equal(np.asarray(noisy(images)), np.asarray(noisy(images)))


def test_training_mode_uses_training_noise_and_soft_code():
    model = ComDefend(get_config("tiny", train_noise_std=20.0), seed=0)
    images = np.random.default_rng(2).random((2, 8, 8, 3), dtype=np.float32)
    outputs = model.forward(images, training=True)
    difference = np.asarray(outputs["noisy_logits"]) - np.asarray(outputs["code_logits"])
    assert 15.0 < difference.std() < 25.0
    np.testing.assert_allclose(np.asarray(outputs["code"]), np.asarray(outputs["soft_code"]))
    st = ComDefend(get_config("tiny", train_mode="straight_through"), seed=0)
    code = np.asarray(st.forward(images, training=True)["code"])
    assert set(np.unique(code)) <= {0.0, 1.0}


def test_loss_terms_are_the_papers_plain_means():
    model = ComDefend(get_config("tiny", lambda_code=0.5), seed=0)
    images = np.random.default_rng(3).random((3, 6, 6, 3), dtype=np.float32)
    outputs = model.forward(images)
    terms = model.loss_terms(images, outputs)
    purified, soft = np.asarray(outputs["purified"]), np.asarray(outputs["soft_code"])
    np.testing.assert_allclose(np.asarray(terms["mse"]).mean(), np.mean((purified - images) ** 2),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(terms["code_penalty"]).mean(), 0.5 * np.mean(soft ** 2),
                               rtol=1e-5)


def test_psnr_in_db():
    images = np.zeros((1, 4, 4, 1), np.float32)
    noisy = images + 0.1
    np.testing.assert_allclose(np.asarray(psnr(images, noisy)), [20.0], rtol=1e-5)


def test_training_drives_loss_down_and_psnr_up():
    rng = np.random.default_rng(0)
    # Smooth images: a fixed small batch the tiny model can learn to reconstruct.
    base = rng.random((16, 4, 4, 1)).astype(np.float32)
    images = np.repeat(np.repeat(base, 3, axis=1), 3, axis=2)
    model = ComDefend(get_config("small", input_channels=1, train_noise_std=2.0), seed=0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    before = float(np.mean(np.asarray(psnr(images, model(images)))))
    history = model.fit(images, batch_size=16, epochs=300, verbose=0)
    after = float(np.mean(np.asarray(psnr(images, model(images)))))
    losses = history.history["loss"]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert after > before + 5.0
    assert {"mse", "code_penalty", "psnr", "near_zero"} <= set(history.history)


def test_keras_file_round_trip_gives_identical_outputs(tmp_path):
    model = ComDefend(get_config("tiny", inference_noise_std=0.0), seed=0)
    images = np.random.default_rng(4).random((2, 9, 11, 3), dtype=np.float32)
    save_comdefend(model, str(tmp_path), {"psnr_db": 1.0})
    loaded = load_comdefend(str(tmp_path))
    assert loaded.config == model.config
    np.testing.assert_array_equal(np.asarray(loaded(images)), np.asarray(model(images)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comdefend.keras", "config.json",
                                                          "metrics.json"]


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ComDefend model"):
        load_comdefend(str(tmp_path / "missing"))
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot load a Keras model"):
        load_comdefend(str(bad))
    other = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    other.save(str(tmp_path / "other.keras"))
    with pytest.raises(ValueError, match="not a ComDefend model"):
        load_comdefend(str(tmp_path / "other.keras"))


def test_noise_warmup_ramps_the_training_noise_with_the_optimizer_step():
    model = ComDefend(get_config("tiny", train_noise_std=10.0, noise_warmup_steps=4), seed=0)
    images = np.zeros((4, 8, 8, 3), np.float32)

    def noise_std():
        outputs = model.forward(images, training=True)
        return float(np.std(np.asarray(outputs["noisy_logits"] - outputs["code_logits"])))

    assert model.noise_warmup_scale() is None  # no optimizer yet: full noise
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    assert noise_std() == 0.0  # step 0
    model.optimizer.iterations.assign(2)
    assert 4.0 < noise_std() < 6.0  # half way: std 5
    model.optimizer.iterations.assign(40)
    assert 9.0 < noise_std() < 11.0  # capped at the full std
    assert float(model.noise_warmup_scale(step=1)) == 0.25
    # Inference noise is never scaled.
    np.testing.assert_array_equal(np.asarray(model.forward(images)["noisy_logits"]),
                                  np.asarray(model.forward(images)["code_logits"]))


def test_with_inference_shares_weights_without_duplicating_them(tmp_path):
    model = ComDefend(get_config("tiny"), seed=0)
    noisy = model.with_inference(noise_std=1.0, mode="soft")
    assert len(noisy.get_weights()) == len(model.get_weights()) == 12
    assert noisy.config.inference_noise_std == 1.0 and noisy.config.inference_mode == "soft"
    noisy.set_weights(model.get_weights())  # the same layout: precision conversion relies on it
    save_comdefend(noisy, str(tmp_path))
    assert load_comdefend(str(tmp_path)).config == noisy.config


_DRAW_SCRIPT = """
import sys
import numpy as np
from comdefend_tf.model import load_comdefend
seed = None if sys.argv[2] == "none" else int(sys.argv[2])
model = load_comdefend(sys.argv[1], seed=seed)
logits = np.zeros((1, 4, 4, model.config.code_channels), np.float32)
print(" ".join(f"{v:.6f}" for v in np.asarray(model.code_noise(logits)).ravel()[:8]))
"""


def _noise_in_fresh_process(model_dir, seed):
    import subprocess
    import sys
    from tests.conftest import REPO_ROOT, subprocess_env
    result = subprocess.run([sys.executable, "-c", _DRAW_SCRIPT, model_dir, seed],
                            capture_output=True, text=True, cwd=REPO_ROOT, env=subprocess_env(),
                            timeout=300, check=True)
    return result.stdout.strip().splitlines()[-1]


def test_saved_file_does_not_determine_the_inference_noise(tmp_path):
    # Trained with seed 0, as the training binary does; the file must not replay its draws.
    model = ComDefend(get_config("tiny", inference_noise_std=1.0), seed=0)
    model(np.zeros((1, 4, 4, 3), np.float32))
    model_dir = str(tmp_path / "model")
    save_comdefend(model, model_dir)
    first, second = (_noise_in_fresh_process(model_dir, "none") for _ in range(2))
    assert first != second
    assert _noise_in_fresh_process(model_dir, "7") == _noise_in_fresh_process(model_dir, "7")
