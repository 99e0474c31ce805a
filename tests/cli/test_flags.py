"""comdefend_tf.cli.flags: each shared flag is defined once, with its choices and bounds; and the
exit-status table of comdefend_tf.cli.exit_codes."""

import pathlib
import re

import pytest
from absl import flags

from comdefend_tf.cli import exit_codes
from comdefend_tf.cli import flags as cli_flags
from comdefend_tf.training import precision

REPO = pathlib.Path(__file__).resolve().parents[2]


def _parse(define, *args, **kwargs):
    """Defines flags into a fresh registry, parses ``args`` and returns the registry."""
    values = flags.FlagValues()
    define(*kwargs.pop("define_args", ()), flag_values=values, **kwargs)
    values(["program", *args])
    return values


@pytest.mark.parametrize("name, low, high", [
    ("jpeg_quality", 1, 100), ("bit_depth", 1, 8), ("median_size", 1, 15)])
def test_baseline_flags_enforce_the_defenses_bounds(name, low, high):
    assert getattr(_parse(cli_flags.define_baseline_flags, f"--{name}={low}"), name) == low
    assert getattr(_parse(cli_flags.define_baseline_flags, f"--{name}={high}"), name) == high
    for bad in (low - 1, high + 1):
        with pytest.raises(flags.IllegalFlagValueError):
            _parse(cli_flags.define_baseline_flags, f"--{name}={bad}")


def test_baseline_flag_defaults():
    values = _parse(cli_flags.define_baseline_flags)
    assert (values.jpeg_quality, values.bit_depth, values.median_size) == (75, 4, 3)


def test_baseline_bounds_match_what_the_defenses_accept():
    from comdefend_tf.evaluation import baselines
    low, high = cli_flags.MEDIAN_SIZE_BOUNDS
    baselines.MedianFilter(high)
    with pytest.raises(ValueError):
        baselines.MedianFilter(high + 1)
    low, high = cli_flags.JPEG_QUALITY_BOUNDS
    baselines.JpegDefense(low)
    with pytest.raises(ValueError):
        baselines.JpegDefense(high + 1)


def test_inference_noise_flag_keeps_each_binarys_default_and_refuses_negatives():
    assert _parse(cli_flags.define_inference_noise_flag).inference_noise_std is None
    assert _parse(cli_flags.define_inference_noise_flag,
                  define_args=(0.0,)).inference_noise_std == 0.0
    assert _parse(cli_flags.define_inference_noise_flag,
                  "--inference_noise_std=1.5").inference_noise_std == 1.5
    with pytest.raises(flags.IllegalFlagValueError):
        _parse(cli_flags.define_inference_noise_flag, "--inference_noise_std=-0.1")


def test_precision_flag_offers_the_binarys_choices_only():
    values = _parse(cli_flags.define_precision_flag, "--precision=auto")
    assert values.precision == "auto"
    assert list(values["precision"].parser.enum_values) == list(precision.PRECISIONS)
    narrow = {"choices": ("float32", "bfloat16")}
    assert _parse(cli_flags.define_precision_flag, "--precision=bfloat16",
                  **narrow).precision == "bfloat16"
    with pytest.raises(flags.IllegalFlagValueError):
        _parse(cli_flags.define_precision_flag, "--precision=auto", **narrow)


def test_precision_flag_refuses_unknown_choices_and_defaults():
    with pytest.raises(ValueError, match="float16"):
        cli_flags.define_precision_flag(choices=("float32", "float16"),
                                        flag_values=flags.FlagValues())
    with pytest.raises(ValueError, match="auto"):
        cli_flags.define_precision_flag(choices=("float32",), default="auto",
                                        flag_values=flags.FlagValues())


def test_one_help_text_whatever_the_binarys_choices_or_default():
    wide, narrow = flags.FlagValues(), flags.FlagValues()
    cli_flags.define_precision_flag(flag_values=wide)
    cli_flags.define_precision_flag(choices=("float32", "bfloat16"), flag_values=narrow)
    assert wide["precision"].help == "<float32|bfloat16|auto>: " + cli_flags.PRECISION_HELP
    assert narrow["precision"].help == "<float32|bfloat16>: " + cli_flags.PRECISION_HELP
    none_default, zero_default = flags.FlagValues(), flags.FlagValues()
    cli_flags.define_inference_noise_flag(flag_values=none_default)
    cli_flags.define_inference_noise_flag(0.0, flag_values=zero_default)
    assert (none_default["inference_noise_std"].help == zero_default["inference_noise_std"].help
            == cli_flags.INFERENCE_NOISE_HELP)


def test_data_flags_and_their_color_modes():
    values = _parse(cli_flags.define_data_flags, "--color_mode=rgb", "--image_size=32,32",
                    "--data_dir=/tmp/tfds")
    assert values.dataset == "mnist5k"
    assert values.color_mode == "rgb"
    assert values.image_size == ["32", "32"]
    assert values.data_dir == "/tmp/tfds" and values.manual_dir is None
    with pytest.raises(flags.IllegalFlagValueError):
        _parse(cli_flags.define_data_flags, "--color_mode=cmyk")


def test_load_data_refuses_a_malformed_image_size():
    values = _parse(cli_flags.define_data_flags, "--image_size=32,wide")
    with pytest.raises(flags.ValidationError, match="HEIGHT,WIDTH"):
        cli_flags.load_data_from_flags(flag_values=values)


def test_model_dir_flags_by_name():
    values = _parse(cli_flags.define_model_dir_flags, "--classifier_dir=runs/c",
                    define_args=("classifier_dir", "comdefend_dir"))
    assert values.classifier_dir == "runs/c" and values.comdefend_dir is None
    assert "purified_classifier_dir" not in values
    with pytest.raises(ValueError, match="model_dri"):
        cli_flags.define_model_dir_flags("model_dri", flag_values=flags.FlagValues())


def test_training_run_flags_take_the_binarys_defaults_and_strategies():
    values = _parse(cli_flags.define_training_run_flags, "--strategy=mirrored",
                    define_args=(5, 64, ("default", "mirrored"), 100))
    assert (values.epochs, values.batch_size, values.checkpoint_every_steps) == (5, 64, 100)
    assert values.strategy == "mirrored" and values.learning_rate == 1e-3
    with pytest.raises(flags.IllegalFlagValueError):
        _parse(cli_flags.define_training_run_flags, "--strategy=multi_worker",
               define_args=(5, 64, ("default", "mirrored"), 100))
    with pytest.raises(flags.IllegalFlagValueError):
        _parse(cli_flags.define_training_run_flags, "--epochs=0",
               define_args=(1, 20, ("default",), 100))


def test_a_flag_defined_twice_is_an_error():
    values = flags.FlagValues()
    cli_flags.define_baseline_flags(flag_values=values)
    with pytest.raises(flags.DuplicateFlagError):
        cli_flags.define_baseline_flags(flag_values=values)


def test_shared_flags_belong_to_the_binary_that_defines_them():
    values = flags.FlagValues()
    cli_flags.define_baseline_flags(flag_values=values)
    key_flags = {flag.name for flag in values.get_key_flags_for_module(__name__)}
    assert {"jpeg_quality", "bit_depth", "median_size"} <= key_flags


BINARIES = sorted((REPO / "train").glob("*.py")) + sorted((REPO / "export").glob("*.py"))


@pytest.mark.parametrize("name", ["inference_noise_std", "precision", "jpeg_quality",
                                  "bit_depth", "median_size", "dataset", "image_size",
                                  "color_mode", "manual_dir", "classifier_dir", "comdefend_dir",
                                  "purified_classifier_dir", "max_image_pixels",
                                  "max_file_bytes", "max_files", "tile_above_pixels"])
def test_no_binary_redefines_a_shared_flag(name):
    pattern = re.compile(r"DEFINE_\w+\(\s*[\"']" + name + r"[\"']")
    assert BINARIES
    for path in BINARIES:
        assert not pattern.search(path.read_text()), f"{path.name} redefines --{name}"


def test_file_limit_flags_default_to_the_library_and_refuse_nonsense():
    values = _parse(cli_flags.define_file_limit_flags)
    assert [values[name].value for name in ("max_image_pixels", "max_file_bytes", "max_files",
                                            "tile_above_pixels")] == [None, None, None, None]
    assert _parse(cli_flags.define_file_limit_flags, "--tile_above_pixels=0").tile_above_pixels == 0
    for bad in ("--max_image_pixels=0", "--max_file_bytes=-1", "--max_files=0",
                "--tile_above_pixels=-1"):
        with pytest.raises(flags.IllegalFlagValueError):
            _parse(cli_flags.define_file_limit_flags, bad)


def test_exit_codes_table():
    assert (exit_codes.OK, exit_codes.COULD_NOT_START, exit_codes.SOME_REFUSED) == (0, 1, 2)
    assert set(exit_codes.MEANINGS) == {0, 1, 2}
    for name in ("OK", "COULD_NOT_START", "SOME_REFUSED"):
        assert re.search(rf"^{getattr(exit_codes, name)}\s+{name}\s", exit_codes.__doc__,
                         re.MULTILINE), name
