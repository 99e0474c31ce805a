"""Console-script entry points of the installed package (``comdefend-train``, ...): each runs
one absl binary of ``train/`` or ``export/`` (installed as ``comdefend_tf.train.*`` and
``comdefend_tf.export.*``) exactly as ``python -m`` runs it.

Why not point the scripts at the binaries' own ``run()``: a console script imports its entry
function before calling it, so the binary's flags would belong to the imported module, while
absl's ``--help`` lists only the flags and docstring of the main module (``sys.argv[0]``); the
help would list no flag at all. Executing the module as ``__main__`` (``runpy``, as ``python
-m`` does) keeps ``--help`` complete.

This is the command-line layer, so unlike the library it prints and exits: a binary that needs
an extra which is not installed (``optional.MissingExtra``, raised while the binary imports or
runs) ends with that one line on stderr and exit status 1 instead of a traceback.
"""

from __future__ import annotations

import runpy

from comdefend_tf import optional

# Entry function name -> the binary it runs. pyproject.toml's [project.scripts] names these
# functions; tools/wheel_check.py checks that every binary has one.
PROGRAMS = {
    "train_comdefend": "comdefend_tf.train.train_comdefend",
    "train_classifier": "comdefend_tf.train.train_classifier",
    "evaluate": "comdefend_tf.train.evaluate",
    "robustness_report": "comdefend_tf.train.robustness_report",
    "import_reference_weights": "comdefend_tf.train.import_reference_weights",
    "purify_images": "comdefend_tf.export.purify_images",
    "export_savedmodel": "comdefend_tf.export.export_savedmodel",
    "serving_client": "comdefend_tf.export.serving_client",
    "purify_dataset": "comdefend_tf.export.purify_dataset",
    "export_litert": "comdefend_tf.export.export_litert",
}


def run_program(module: str) -> None:
    """Runs ``module`` as ``__main__`` with the command line of this process (its exit status
    is the program's: absl programs end with ``sys.exit``).

    Raises:
      SystemExit: status 1 with ``error: <one line naming the pip command>`` when the program
        needs a library that is not installed.
    """
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except optional.MissingExtra as error:
        raise SystemExit(f"error: {error}") from None


def train_comdefend():
    run_program(PROGRAMS["train_comdefend"])


def train_classifier():
    run_program(PROGRAMS["train_classifier"])


def evaluate():
    run_program(PROGRAMS["evaluate"])


def robustness_report():
    run_program(PROGRAMS["robustness_report"])


def import_reference_weights():
    run_program(PROGRAMS["import_reference_weights"])


def purify_images():
    run_program(PROGRAMS["purify_images"])


def export_savedmodel():
    run_program(PROGRAMS["export_savedmodel"])


def serving_client():
    run_program(PROGRAMS["serving_client"])


def purify_dataset():
    run_program(PROGRAMS["purify_dataset"])


def export_litert():
    run_program(PROGRAMS["export_litert"])
