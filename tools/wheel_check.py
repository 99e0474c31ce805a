"""Builds the comdefend-tf wheel and checks it the way a user installs it: the core alone, in a
fresh virtual environment, offline.

    python tools/wheel_check.py --wheelhouse=.wheelhouse [--work_dir=DIR]

(``make wheel-check`` fills ``.wheelhouse`` with the core's pinned wheels first.) Steps:

1. Builds the wheel from a copy of the packaged sources (``pip wheel --no-deps
   --no-build-isolation``; the checkout gets no ``build/`` folder) and checks its layout: one
   top-level package, ``comdefend_tf`` (the binaries as ``comdefend_tf.train.*`` and
   ``comdefend_tf.export.*``), every source file of ``comdefend_tf/``, ``train/`` and
   ``export/`` inside, and a console script for every binary.
2. Creates a fresh virtual environment (no system site-packages) and installs the wheel's core
   with ``pip install --no-index --find-links WHEELHOUSE -c requirements.txt``: nothing comes
   from an index or from pip's configuration.
3. Runs, from a folder outside the checkout, with an import hook that records every attempt to
   import an eval-only or data library (``FORBIDDEN_MODULES``):
   every console script's ``--help`` (its flags, or one line naming what to install; never a
   traceback); ``comdefend-train`` for a few steps on a folder of the embedded MNIST digits
   written as PNGs (and its TensorBoard pictures); ``comdefend-purify`` on one PNG;
   ``comdefend-export``; and the one-line errors of ``--dataset=mnist5k`` (the ``[data]``
   extra) and of ``comdefend-purify-dataset`` (the ``[beam]`` extra).
4. Fails if any command fails, if a successful core command tried to import a forbidden
   module, if an extra's distribution got installed with the core, or if the commands ran
   another copy of ``comdefend_tf`` than the installed one.

Prints each step's time and the core install's site-packages size; exits 1 listing every
failed check.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

PACKAGED_FILES = ("pyproject.toml", "README.md")
PACKAGED_DIRS = {"comdefend_tf": "comdefend_tf", "train": "comdefend_tf/train",
                 "export": "comdefend_tf/export"}
# Libraries the core must never import (top-level module names): the evaluation's, the data
# extra's and Beam's.
FORBIDDEN_MODULES = ("art", "foolbox", "eagerpy", "cleverhans", "matplotlib", "sklearn",
                     "skimage", "mlxtend", "pandas", "tensorflow_datasets", "apache_beam",
                     "tensorflow_serving")
# Distributions of the extras that must not arrive with the core.
EXTRA_DISTRIBUTIONS = ("adversarial-robustness-toolbox", "foolbox", "eagerpy", "cleverhans",
                       "matplotlib", "scikit-learn", "scikit-image", "mlxtend", "pandas",
                       "tensorflow-datasets", "apache-beam", "jax", "pytest")
# Console scripts that must print their flags with the core alone.
CORE_SCRIPTS = ("comdefend-train", "comdefend-import-weights", "comdefend-purify",
                "comdefend-export")
_DEFINE = re.compile(r"flags\.DEFINE_\w+\(\s*\"(\w+)\"")

_AUDIT_SITECUSTOMIZE = '''"""Written by tools/wheel_check.py: records comdefend_tf's attempts to
import forbidden libraries (Keras' own optional probes for pandas, sklearn, ... are not ours)."""
import atexit
import json
import os
import sys

_FORBIDDEN = frozenset(os.environ["WHEEL_CHECK_FORBIDDEN"].split(","))
_attempted = set()


class _ImportRecorder:
    """A meta-path finder that finds nothing and remembers who asked for what."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        top = name.partition(".")[0]
        if top not in _FORBIDDEN:
            return None
        frame = sys._getframe(1)
        # The code that asked: the first frame outside the import machinery.
        while frame is not None and ("importlib" in frame.f_code.co_filename
                                     or frame.f_code.co_filename == __file__
                                     or frame.f_code.co_filename.endswith("/optional.py")):
            frame = frame.f_back
        if frame is not None and "/comdefend_tf/" in frame.f_code.co_filename:
            where = frame.f_code.co_filename.split("/comdefend_tf/", 1)[1]
            _attempted.add(f"{top} (comdefend_tf/{where}:{frame.f_lineno})")
        return None


sys.meta_path.insert(0, _ImportRecorder)


@atexit.register
def _report():
    package = sys.modules.get("comdefend_tf")
    with open(os.environ["WHEEL_CHECK_AUDIT"], "w") as handle:
        json.dump({"attempted": sorted(_attempted),
                   "comdefend_tf": getattr(package, "__file__", None)}, handle)
'''


def pip_environment() -> dict:
    """The environment for pip: no configuration file and no PIP_* variables, so the only
    sources are the ones given on the command line."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


# ----------------------------------------------------------------------------------- wheel
def build_wheel(repo_root: str, work_dir: str) -> str:
    """Builds the wheel from a copy of the packaged sources; returns its path."""
    source = os.path.join(work_dir, "source")
    os.makedirs(source)
    for name in PACKAGED_FILES:
        shutil.copy(os.path.join(repo_root, name), source)
    for name in PACKAGED_DIRS:
        shutil.copytree(os.path.join(repo_root, name), os.path.join(source, name),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "BUILD"))
    dist = os.path.join(work_dir, "dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--wheel-dir", dist, source],
                   check=True, env=pip_environment(), cwd=work_dir)
    wheels = glob.glob(os.path.join(dist, "*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel in {dist}, found {wheels}")
    return wheels[0]


def binaries(repo_root: str) -> dict[str, str]:
    """``{installed module: source file}`` of every program in train/ and export/ (a file with
    an ``if __name__ == "__main__":`` block)."""
    found = {}
    for folder in ("train", "export"):
        for path in sorted(glob.glob(os.path.join(repo_root, folder, "*.py"))):
            with open(path, encoding="utf-8") as handle:
                tree = ast.parse(handle.read())
            if any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
                   for node in tree.body):
                module = os.path.splitext(os.path.basename(path))[0]
                found[f"comdefend_tf.{folder}.{module}"] = path
    return found


def defined_flags(path: str) -> list[str]:
    """The flag names a binary's source defines with ``flags.DEFINE_*("name", ...)``."""
    with open(path, encoding="utf-8") as handle:
        return _DEFINE.findall(handle.read())


def console_scripts(wheel: str) -> dict[str, str]:
    """``{script name: "module:function"}`` from the wheel's entry_points.txt."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = archive.read(name).decode()
    scripts, section = {}, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[console_scripts]" and "=" in line:
            script, target = (part.strip() for part in line.split("=", 1))
            scripts[script] = target
    return scripts


def layout_problems(wheel: str, repo_root: str) -> list[str]:
    """What is wrong with the wheel's contents (empty when nothing is)."""
    problems = []
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    top_level = {name.split("/", 1)[0] for name in names}
    generic = sorted(top for top in top_level
                     if top != "comdefend_tf" and not top.endswith(".dist-info"))
    if generic:
        problems.append(f"the wheel installs top-level names besides comdefend_tf: {generic}")
    for folder, installed in PACKAGED_DIRS.items():
        for path in glob.glob(os.path.join(repo_root, folder, "**", "*.py"), recursive=True):
            relative = os.path.relpath(path, os.path.join(repo_root, folder))
            wanted = f"{installed}/{relative}".replace(os.sep, "/")
            if wanted not in names:
                problems.append(f"{folder}/{relative} is not in the wheel (as {wanted})")
    programs = script_programs(wheel)
    for module in binaries(repo_root):
        if module not in programs.values():
            problems.append(f"no console script runs {module}")
    for script, module in programs.items():
        if module not in binaries(repo_root):
            problems.append(f"console script {script} runs {module}, which is no binary")
    return problems


def script_programs(wheel: str) -> dict[str, str | None]:
    """``{script name: the binary module it runs}`` (through ``comdefend_tf.cli.console``; None for
    a script that points elsewhere)."""
    from comdefend_tf.cli import console

    programs = {}
    for script, target in console_scripts(wheel).items():
        module, _, function = target.partition(":")
        programs[script] = console.PROGRAMS.get(function) if module == console.__name__ else None
    return programs


# ---------------------------------------------------------------------------- fresh venv
def make_core_venv(venv_dir: str, wheel: str, wheelhouse: str, constraints: str) -> None:
    """A fresh virtual environment with the wheel's core installed offline."""
    subprocess.run([sys.executable, "-m", "venv", venv_dir], check=True)
    subprocess.run([os.path.join(venv_dir, "bin", "python"), "-m", "pip", "install", "--quiet",
                    "--no-index", "--find-links", wheelhouse, "-c", constraints, wheel],
                   check=True, env=pip_environment())


def site_packages(venv_dir: str) -> str:
    paths = glob.glob(os.path.join(venv_dir, "lib", "python3*", "site-packages"))
    if len(paths) != 1:
        raise RuntimeError(f"expected one site-packages in {venv_dir}, found {paths}")
    return paths[0]


def disk_usage(path: str) -> str:
    """``du -sh``'s size of ``path``."""
    return subprocess.run(["du", "-sh", path], capture_output=True, text=True,
                          check=True).stdout.split()[0]


def installed_distributions(venv_dir: str) -> set[str]:
    listing = subprocess.run([os.path.join(venv_dir, "bin", "python"), "-m", "pip", "list",
                              "--format=json"], capture_output=True, text=True, check=True,
                             env=pip_environment()).stdout
    return {entry["name"].lower().replace("_", "-") for entry in json.loads(listing)}


def write_digit_pngs(folder: str, count: int) -> list[str]:
    """Writes ``count`` of the embedded MNIST digits (mnist5k, read here with this
    interpreter's [data] extra) as ``folder/<label>/<index>.png``; returns the paths."""
    from comdefend_tf.io import datasets as data
    from comdefend_tf.io import images as image_io

    images, labels = data.take_arrays(data.load_dataset("mnist5k").train, count)
    paths = []
    for index, (image, label) in enumerate(zip(images, labels)):
        class_dir = os.path.join(folder, str(int(label)))
        os.makedirs(class_dir, exist_ok=True)
        paths.append(os.path.join(class_dir, f"{index:04d}.png"))
        image_io.write_png(paths[-1], image)
    return paths


class ScriptRunner:
    """Runs the console scripts in ``bin_dir`` from ``work_dir`` (outside the checkout) with the
    import audit; ``python_path`` folders come first on the path (a ``pip --target``
    install)."""

    def __init__(self, bin_dir: str, work_dir: str, python_path: tuple[str, ...] = ()):
        self.bin_dir, self.work_dir, self.python_path = bin_dir, work_dir, python_path
        self.audit_dir = os.path.join(work_dir, "audit")
        os.makedirs(self.audit_dir, exist_ok=True)
        with open(os.path.join(self.audit_dir, "sitecustomize.py"), "w") as handle:
            handle.write(_AUDIT_SITECUSTOMIZE)
        self.count = 0
        self._lock = threading.Lock()

    def run(self, script: str, *args: str, timeout: float = 600):
        """``(CompletedProcess, audit dict or None)`` of ``script args``."""
        with self._lock:
            self.count += 1
            audit_path = os.path.join(self.audit_dir, f"audit-{self.count}.json")
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
        env.update(PATH=self.bin_dir + os.pathsep + env.get("PATH", ""),
                   PYTHONPATH=os.pathsep.join((*self.python_path, self.audit_dir)),
                   PYTHONNOUSERSITE="1", TF_CPP_MIN_LOG_LEVEL="2",
                   KERAS_HOME=os.path.join(self.work_dir, "keras_home"),
                   WHEEL_CHECK_FORBIDDEN=",".join(FORBIDDEN_MODULES),
                   WHEEL_CHECK_AUDIT=audit_path)
        result = subprocess.run([os.path.join(self.bin_dir, script), *args],
                                cwd=self.work_dir, env=env, capture_output=True, text=True,
                                timeout=timeout)
        audit = None
        if os.path.exists(audit_path):
            with open(audit_path) as handle:
                audit = json.load(handle)
        return result, audit


def run_helps(runner: ScriptRunner, scripts, workers: int = 3) -> dict:
    """``{script: (CompletedProcess, audit)}`` of ``script --help`` for every script, a few at a
    time (each mostly waits for TensorFlow's import)."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {script: pool.submit(runner.run, script, "--help", timeout=600)
                   for script in scripts}
        return {script: future.result() for script, future in futures.items()}


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def one_line_install_message(result) -> bool:
    """Exit status 1, no traceback, and a stderr line naming a pip install command."""
    return (result.returncode == 1 and "Traceback" not in result.stderr
            and any("pip install" in line for line in result.stderr.splitlines()))


def help_problems(script: str, result, flag_names: list[str]) -> list[str]:
    """What is wrong with ``script --help``'s output: every flag the binary defines must be
    listed (absl's --help exits with status 1)."""
    if "Traceback" in result.stderr or result.returncode != 1:
        return [f"{script} --help: exit status {result.returncode}\n{_tail(result.stderr)}"]
    missing = [name for name in flag_names
               if f"--{name}" not in result.stdout and f"--[no]{name}" not in result.stdout]
    return [f"{script} --help does not list {missing}"] if missing else []


def import_audit_problems(what: str, audit: dict | None, installed_root: str) -> list[str]:
    """What the import audit of one command shows to be wrong: comdefend_tf code asked for a
    forbidden library, or the comdefend_tf that ran is not the one under ``installed_root``."""
    if audit is None:
        return [f"{what}: the import audit recorded nothing (did the process crash?)"]
    problems = []
    if audit["attempted"]:
        problems.append(f"{what} tried to import {audit['attempted']} with the core alone")
    if audit["comdefend_tf"] and not os.path.realpath(audit["comdefend_tf"]).startswith(
            os.path.realpath(installed_root) + os.sep):
        problems.append(f"{what} ran {audit['comdefend_tf']}, not the installed package")
    return problems


def check(repo_root: str, wheelhouse: str, work_dir: str, log=print) -> list[str]:
    """Runs every step of the module docstring in ``work_dir``; returns the failures."""
    failures = []
    started = time.monotonic()

    def step(message):
        log(f"[{time.monotonic() - started:6.1f} s] {message}")

    wheel = build_wheel(repo_root, work_dir)
    step(f"built {os.path.basename(wheel)} ({os.path.getsize(wheel) // 1024} KiB)")
    failures += layout_problems(wheel, repo_root)
    programs = script_programs(wheel)
    sources = binaries(repo_root)

    venv_dir = os.path.join(work_dir, "core-venv")
    make_core_venv(venv_dir, wheel, wheelhouse, os.path.join(repo_root, "requirements.txt"))
    step(f"fresh venv with the core installed offline from {wheelhouse}: "
         f"{disk_usage(site_packages(venv_dir))} in site-packages")
    unwanted = sorted(installed_distributions(venv_dir) & set(EXTRA_DISTRIBUTIONS))
    if unwanted:
        failures.append(f"the core install brought extras' distributions: {unwanted}")

    runner = ScriptRunner(os.path.join(venv_dir, "bin"), work_dir)
    installed = os.path.realpath(site_packages(venv_dir))

    def audit_problems(what, audit):
        return import_audit_problems(what, audit, installed)

    helps = run_helps(runner, sorted(programs))
    for script, module in sorted(programs.items()):
        result, audit = helps[script]
        source = sources.get(module)
        flag_names = defined_flags(source) if source else []
        if script in CORE_SCRIPTS or not one_line_install_message(result):
            failures += help_problems(script, result, flag_names)
            if script in CORE_SCRIPTS:
                failures += audit_problems(f"{script} --help", audit)
    step(f"--help of {len(programs)} console scripts")

    digits_dir = os.path.join(work_dir, "digits")
    digit_pngs = write_digit_pngs(digits_dir, 160)
    model_dir = os.path.join(work_dir, "model")
    result, audit = runner.run(
        "comdefend-train", f"--dataset=folder:{digits_dir}", "--config=tiny", "--epochs=1",
        "--steps_per_epoch=4", "--batch_size=16", "--summary_images=4",
        "--collapse_margin_db=-1", f"--model_dir={model_dir}")
    if result.returncode != 0:
        failures.append(f"comdefend-train on PNG digits: exit status {result.returncode}\n"
                        f"{_tail(result.stderr)}")
    else:
        failures += audit_problems("comdefend-train", audit)
        for wanted in ("comdefend.keras", os.path.join("logs", "images")):
            if not os.path.exists(os.path.join(model_dir, wanted)):
                failures.append(f"comdefend-train wrote no {wanted}")
    step(f"comdefend-train: 4 steps on {len(digit_pngs)} PNG digits")

    inputs_dir = os.path.join(work_dir, "inputs")
    os.makedirs(inputs_dir)
    shutil.copy(digit_pngs[0], os.path.join(inputs_dir, "digit.png"))
    purified_dir = os.path.join(work_dir, "purified")
    result, audit = runner.run("comdefend-purify", f"--model_dir={model_dir}",
                               f"--input={os.path.join(inputs_dir, 'digit.png')}",
                               f"--output_dir={purified_dir}")
    if result.returncode != 0:
        failures.append(f"comdefend-purify: exit status {result.returncode}\n"
                        f"{_tail(result.stderr)}")
    else:
        failures += audit_problems("comdefend-purify", audit)
        from PIL import Image

        with Image.open(os.path.join(purified_dir, "digit.png")) as image:
            if image.size != (28, 28):
                failures.append(f"comdefend-purify wrote a {image.size} image, not 28x28")
    step("comdefend-purify on one PNG")

    export_base = os.path.join(work_dir, "export")
    result, audit = runner.run("comdefend-export", f"--comdefend_dir={model_dir}",
                               f"--export_base={export_base}")
    if result.returncode != 0:
        failures.append(f"comdefend-export: exit status {result.returncode}\n"
                        f"{_tail(result.stderr)}")
    else:
        failures += audit_problems("comdefend-export", audit)
        if not glob.glob(os.path.join(export_base, "*", "saved_model.pb")):
            failures.append(f"comdefend-export wrote no VERSION/saved_model.pb in {export_base}")
    step("comdefend-export")

    result, audit = runner.run("comdefend-train", "--dataset=mnist5k",
                               f"--model_dir={os.path.join(work_dir, 'no-model')}")
    if not (one_line_install_message(result) and "pip install 'comdefend-tf[data]'"
            in result.stderr):
        failures.append(f"comdefend-train --dataset=mnist5k without [data]: exit status "
                        f"{result.returncode}, expected one line naming the [data] extra\n"
                        f"{_tail(result.stderr)}")
    # The audit's own check: this command does ask for mlxtend, so the hook must have seen it.
    if not audit or not any(name.startswith("mlxtend ") for name in audit["attempted"]):
        failures.append(f"the import audit missed --dataset=mnist5k's import of mlxtend: {audit}")
    result, _ = runner.run("comdefend-purify-dataset", f"--input={inputs_dir}",
                           f"--output_dir={os.path.join(work_dir, 'beam-out')}",
                           f"--model_dir={model_dir}")
    if not (one_line_install_message(result) and "pip install 'comdefend-tf[beam]'"
            in result.stderr):
        failures.append(f"comdefend-purify-dataset without [beam]: exit status "
                        f"{result.returncode}, expected one line naming the [beam] extra\n"
                        f"{_tail(result.stderr)}")
    step("one-line errors of the [data] and [beam] features")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheelhouse", required=True,
                        help="Folder of the core's wheels (make wheelhouse fills .wheelhouse).")
    parser.add_argument("--work_dir", help="Folder for the wheel, venv and outputs (default: a "
                        "temporary folder, removed afterwards).")
    args = parser.parse_args(argv)
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    wheelhouse = os.path.abspath(args.wheelhouse)
    if not os.path.isdir(wheelhouse):
        print(f"wheel_check: no wheelhouse at {wheelhouse} (make wheelhouse)", file=sys.stderr)
        return 1
    if args.work_dir:
        os.makedirs(args.work_dir, exist_ok=True)
        failures = check(repo_root, wheelhouse, os.path.abspath(args.work_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="wheel_check.") as work_dir:
            failures = check(repo_root, wheelhouse, work_dir)
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    print("wheel check: " + ("ok" if not failures else f"{len(failures)} failure(s)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
