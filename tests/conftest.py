"""Shared test settings: quiet TensorFlow logs, repo root on sys.path, reference fixtures dir,
and the two test tiers.

Tiers: ``make test`` runs everything; ``make test-fast`` (``pytest -m "not slow"``) leaves out
the tests marked ``slow`` here, by name, so the test files themselves stay unmarked. A test is
slow when a child Python runs one of our programs (train/, export/, a console script), pip, or
a script that trains or runs a model; when it forks a corpus of hostile inputs; or when it
trains for more than about 15 s in-process (durations of a full run, 2 workers). Child
processes that only import modules or list flags (tests/docs) stay fast. Every
``wheel_check`` test is slow too.
tests/tools/test_test_tiers.py checks that each name below still names a test or fixture.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pytest  # noqa: E402

# Fixtures that run a program in a child process; every test using one (directly or through
# another fixture) is slow.
SLOW_FIXTURES = frozenset({
    "exported",            # export/test_export_savedmodel.py: export.export_savedmodel
    "fresh_process",       # export/test_export_savedmodel.py: loads the export with python -I
    "multiprocess_run",    # purification/test_beam.py: export.purify_dataset, 2 processes
    "folder_setup",        # train/test_evaluate.py: train.train_classifier
    "report_run",          # train/test_robustness_report.py: train.robustness_report
})

# Test functions (every parametrization, in whichever file they live) that are slow.
SLOW_TESTS = frozenset({
    # Programs and scripts run in a child Python.
    # Adversarial classifiers and a LiteRT purifier as defenses (issues 23, 24).
    "test_adversarial_training_and_a_litert_purifier_in_one_report",
    "test_adversarially_trained_classifiers_alone_and_behind_comdefend",
    "test_a_litert_purifier_is_a_defense_of_the_paper_table",
    "test_a_randomized_litert_purifier_gets_draws_and_only_its_threat_models",
    # Adversarial training (issue 23): two logical devices, and the binary's flags.
    "test_mirrored_strategy_trains_adversarially_on_two_logical_devices",
    "test_binary_refuses_bad_adversarial_flags_and_prints_the_summary_line",
    # LiteRT (issue 24): export.export_litert, export.purify_images and fresh interpreters in
    # child processes.
    "test_writes_the_model_and_its_record",
    "test_converts_a_serving_export_noise_off",
    "test_bad_requests_end_in_one_error_line_and_write_nothing",
    "test_an_existing_output_is_kept_without_overwrite",
    "test_fresh_processes_draw_different_noise",
    "test_cli_purifies_with_a_tflite_model",
    "test_fresh_processes_draw_fresh_noise_unless_a_seed_was_exported",
    "test_cli_writes_good_images_names_bad_ones_and_fails",
    "test_binary_exits_1_on_a_bad_request",
    "test_cli_sends_files_and_writes_purified_pngs",
    "test_cli_fails_loudly_when_the_server_drops_an_output",
    "test_cli_never_writes_into_an_input_folder_even_with_overwrite",
    "test_saved_purifier_runs_on_the_jax_backend",
    "test_saved_file_does_not_determine_the_inference_noise",
    "test_without_the_data_extra_the_readme_training_command_says_what_to_install",
    "test_console_entry_turns_a_missing_library_into_one_line",
    "test_installed_wheel_has_one_top_level_package_and_every_script_lists_its_flags",
    "test_bad_flags_fail_clearly",
    "test_mirrored_strategy_trains_behind_a_purifier_built_in_its_scope",
    "test_train_binary_writes_model_and_reports_psnr",
    "test_train_binary_rejects_bad_flags",
    "test_mirrored_strategy_trains_on_two_logical_devices",
    "test_multi_worker_strategy_with_two_processes",
    "test_binary_refuses_a_collapsed_model_and_keeps_the_previous_one",
    "test_binary_exits_non_zero_on_nan_and_the_run_resumes",
    "test_training_binary_writes_the_pictures_every_epoch",
    "test_import_binary_writes_a_model_dir_that_loads",
    "test_import_command_prints_an_error_line_for_a_hostile_encoder",
    "test_two_concurrent_runs_never_replace_each_others_outputs",
    "test_an_output_folder_that_is_a_file_is_an_error_line",
    "test_hostile_images_cost_little_time_and_memory_in_a_child",
    # The hostile weight-file corpus: 100 files, each imported in a forked child.
    "test_hostile_corpus_every_file_refused_none_crashing",
    # In-process training of about 25 s.
    "test_training_drives_loss_down_and_psnr_up",
})


def is_slow(item) -> bool:
    """True when ``item`` (a collected pytest test) belongs to the slow tier."""
    name = getattr(item, "originalname", None) or item.name.split("[", 1)[0]
    return (name in SLOW_TESTS or item.get_closest_marker("wheel_check") is not None
            or not SLOW_FIXTURES.isdisjoint(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_slow(item):
            item.add_marker(pytest.mark.slow)


def reference_dir() -> str:
    """The authors' reference fixtures: $COMDEFEND_REFERENCE_DIR or ../shared/reference."""
    return os.environ.get("COMDEFEND_REFERENCE_DIR",
                          os.path.join(os.path.dirname(REPO_ROOT), "shared", "reference"))


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO_ROOT


def subprocess_env(**extra) -> dict:
    """Environment for a child Python that imports this repo (for binaries and multi-process
    tests)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env
