r"""Kills the export binary at random moments and checks that no partial version is ever visible.

    python tools/fault_inject_export.py --kills=20 --output=fault_inject_export.json

Builds a tiny purifier and classifier (saved model directories in a temporary folder), times
one complete run of ``python -m export.export_savedmodel`` into an export base, then starts the
binary ``--kills`` more times into the same base and SIGKILLs it at a random moment: half of the
kills at a moment uniform over the calibration run's duration (start-up, loading, tracing,
writing), half while the run writes its version: a delay uniform over the calibration run's
writing time (from its hidden folder's appearance to the rename that published the version)
after this run's hidden ``.partial-*`` folder appears (on a loaded machine run
times vary too much for fixed moments to land there). While each run lives, a watcher lists
the base every few milliseconds; after each kill every numeric folder is checked again and
loaded with ``tf.saved_model.load``. A numeric folder counts as *partial* when it lacks ``saved_model.pb``,
``variables/variables.index`` or ``comdefend_export.json`` at any moment, or does not load.

Then one more export must succeed, and no hidden temporary folder of a killed run may remain
(the export removes those of dead processes). Hidden names are never versions to TF Serving:
it only loads children whose names parse as integers (``ParseVersionNumber`` in
``tensorflow_serving/sources/storage_path/file_system_storage_path_source.cc``).

Prints the counts; exits 1 when a partial numeric version was seen, the final export failed or
stale temporary folders remain. ``--output`` writes the report as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

REQUIRED_FILES = ("saved_model.pb", os.path.join("variables", "variables.index"),
                  "comdefend_export.json")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def make_models(folder: str) -> tuple[str, str]:
    """A tiny grey purifier and an 8x8 classifier saved as model directories."""
    import keras

    from comdefend_tf import ComDefend, get_config, save_comdefend
    from comdefend_tf.training import classifier as classifiers

    purifier = ComDefend(get_config("tiny", input_channels=1), seed=1)
    comdefend_dir = os.path.join(folder, "comdefend")
    save_comdefend(purifier, comdefend_dir)
    classifier = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                   keras.layers.Dense(10)], name="fault_injection_classifier")
    classifier_dir = os.path.join(folder, "classifier")
    classifiers.save_classifier(classifier, classifier_dir)
    return comdefend_dir, classifier_dir


def export_command(comdefend_dir: str, classifier_dir: str, export_base: str) -> list[str]:
    return [sys.executable, "-m", "export.export_savedmodel", f"--comdefend_dir={comdefend_dir}",
            f"--classifier_dir={classifier_dir}", f"--export_base={export_base}",
            "--patch_size=16"]


def numeric_children(export_base: str) -> list[str]:
    """Children TF Serving would take for versions: names that parse as integers."""
    names = []
    for name in os.listdir(export_base) if os.path.isdir(export_base) else []:
        try:
            int(name)
        except ValueError:
            continue
        names.append(name)
    return sorted(names, key=int)


def missing_files(version_dir: str) -> list[str]:
    return [name for name in REQUIRED_FILES
            if not os.path.isfile(os.path.join(version_dir, name))]


class Watcher:
    """Lists the export base every ``interval_s`` while a run lives; records every numeric
    folder seen without all of ``REQUIRED_FILES``."""

    def __init__(self, export_base: str, interval_s: float = 0.003):
        self.export_base = export_base
        self.interval_s = interval_s
        self.partial_sightings = []
        self.polls = 0
        self.first_partial_temp_s = None
        self.first_new_version_s = None
        self.partial_appeared = threading.Event()
        self.ignore = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.perf_counter()

    def _run(self):
        while not self._stop.is_set():
            try:
                names = os.listdir(self.export_base) if os.path.isdir(self.export_base) else []
            except OSError:
                names = []
            if self.first_partial_temp_s is None and any(
                    name.startswith(".partial-") and name not in self.ignore for name in names):
                self.first_partial_temp_s = time.perf_counter() - self._start
                self.partial_appeared.set()
            if self.first_new_version_s is None and any(
                    name.isdigit() and name not in self.ignore for name in names):
                self.first_new_version_s = time.perf_counter() - self._start
            for name in names:
                if name.isdigit():
                    missing = missing_files(os.path.join(self.export_base, name))
                    if missing:
                        self.partial_sightings.append({"version": name, "missing": missing})
            self.polls += 1
            time.sleep(self.interval_s)

    def __enter__(self):
        self.ignore = set(os.listdir(self.export_base)) if os.path.isdir(self.export_base) \
            else set()
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_export(command: list[str], export_base: str, kill_at_s: float | None,
               after_partial: bool = False) -> dict:
    """Runs the binary once and SIGKILLs it ``kill_at_s`` seconds after its start (or, with
    ``after_partial``, after its hidden ``.partial-*`` folder appeared) unless it ended first;
    ``kill_at_s=None`` lets it finish. Returns what happened."""
    with Watcher(export_base) as watcher:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        killed = False
        if kill_at_s is not None:
            if after_partial:
                while not watcher.partial_appeared.wait(0.01) and process.poll() is None:
                    pass
            try:
                process.wait(timeout=kill_at_s)
            except subprocess.TimeoutExpired:
                process.kill()  # SIGKILL: no handler, no cleanup, no flush
                killed = True
        stderr = process.communicate()[1].decode(errors="replace")
        elapsed = time.perf_counter() - start
    return {"killed": killed, "returncode": process.returncode, "seconds": round(elapsed, 3),
            "kill_at_s": None if kill_at_s is None else round(kill_at_s, 3),
            "kill_relative_to": "partial folder" if after_partial else "start",
            "first_partial_temp_s": (None if watcher.first_partial_temp_s is None
                                     else round(watcher.first_partial_temp_s, 3)),
            "first_new_version_s": (None if watcher.first_new_version_s is None
                                    else round(watcher.first_new_version_s, 3)),
            "partial_sightings": watcher.partial_sightings, "polls": watcher.polls,
            "stderr_tail": stderr[-1500:] if process.returncode not in (0, -9) else ""}


def check_versions(export_base: str, verified: set) -> list[dict]:
    """Every numeric folder must hold the required files and load; returns the bad ones.
    Folders already verified are not loaded again (versions are never modified in place)."""
    import tensorflow as tf

    bad = []
    for name in numeric_children(export_base):
        if name in verified:
            continue
        version_dir = os.path.join(export_base, name)
        missing = missing_files(version_dir)
        if missing:
            bad.append({"version": name, "missing": missing})
            continue
        try:
            loaded = tf.saved_model.load(version_dir)
            if "purify" not in loaded.signatures:
                raise ValueError("no purify signature")
        except Exception as error:  # any failure to load is a partial version
            bad.append({"version": name, "load_error": f"{type(error).__name__}: {error}"[:300]})
            continue
        verified.add(name)
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="How many runs to SIGKILL.")
    parser.add_argument("--seed", type=int, default=None, help="Seed of the kill moments "
                        "(default: random; the report records the one used).")
    parser.add_argument("--workdir", help="Folder for the models and the export base "
                        "(default: a temporary folder, removed afterwards).")
    parser.add_argument("--output", help="Write the report as JSON here.")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 31)
    rng = random.Random(seed)
    workdir = args.workdir or tempfile.mkdtemp(prefix="fault_inject_export_")
    os.makedirs(workdir, exist_ok=True)
    try:
        comdefend_dir, classifier_dir = make_models(workdir)
        export_base = os.path.join(workdir, "exports")
        command = export_command(comdefend_dir, classifier_dir, export_base)

        calibration = run_export(command, export_base, None)
        if calibration["returncode"] != 0:
            print(f"calibration export failed:\n{calibration['stderr_tail']}", file=sys.stderr)
            return 1
        duration = calibration["seconds"]
        write_start = calibration["first_partial_temp_s"] or duration * 0.8
        # Writing: from the hidden folder's appearance to the rename that publishes it.
        write_end = calibration["first_new_version_s"] or duration
        writing = max(write_end - write_start, 0.05)
        # (seconds, measured from the partial folder?) alternately over the run and the write.
        moments = [(rng.uniform(0.0, duration), False) if index % 2 == 0
                   else (rng.uniform(0.0, writing), True) for index in range(args.kills)]

        verified = set()
        runs, partial_visible = [], 0
        bad = check_versions(export_base, verified)
        for index, (moment, after_partial) in enumerate(moments):
            result = run_export(command, export_base, moment, after_partial)
            result["bad_versions_after"] = check_versions(export_base, verified)
            result["hidden_folders_after"] = sorted(
                name for name in os.listdir(export_base) if name.startswith("."))
            result["versions_after"] = numeric_children(export_base)
            partial_visible += len(result["partial_sightings"]) + len(result["bad_versions_after"])
            runs.append(result)
            state = ("killed" if result["killed"] else f"finished (exit {result['returncode']})")
            origin = "after its .partial folder appeared" if after_partial else "after start"
            print(f"run {index + 1:2d}: {state} at {moment:6.2f} s {origin}; versions "
                  f"{','.join(result['versions_after'])}; hidden "
                  f"{len(result['hidden_folders_after'])}; partial seen "
                  f"{len(result['partial_sightings']) + len(result['bad_versions_after'])}",
                  flush=True)

        leftovers_before = sorted(name for name in os.listdir(export_base)
                                  if name.startswith("."))
        tf_serving_would_load = [name for name in leftovers_before if _parses_as_int64(name)]
        final = run_export(command, export_base, None)
        final_bad = check_versions(export_base, verified)
        leftovers_after = sorted(name for name in os.listdir(export_base)
                                 if name.startswith("."))
        report = {
            "seed": seed, "kills_requested": args.kills,
            "calibration_seconds": duration, "calibration_write_start_s": write_start,
            "runs_killed": sum(run["killed"] for run in runs),
            "runs_finished_before_kill": sum(not run["killed"] for run in runs),
            "runs_killed_while_writing": sum(
                run["killed"] and run["first_partial_temp_s"] is not None
                and run["first_new_version_s"] is None for run in runs),
            "calibration_writing_seconds": round(writing, 3),
            "partial_numeric_versions_visible": partial_visible + len(bad) + len(final_bad)
            + len(final["partial_sightings"]),
            "watch_polls": sum(run["polls"] for run in runs),
            "hidden_temporaries_before_final_export": leftovers_before,
            "hidden_names_tf_serving_would_load": tf_serving_would_load,
            "final_export_returncode": final["returncode"],
            "final_versions": numeric_children(export_base),
            "hidden_temporaries_after_final_export": leftovers_after,
            "runs": runs,
        }
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    ok = (report["partial_numeric_versions_visible"] == 0
          and report["final_export_returncode"] == 0
          and not report["hidden_temporaries_after_final_export"]
          and not report["hidden_names_tf_serving_would_load"])
    report["ok"] = ok
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)
    print(f"kills: {report['runs_killed']} of {args.kills} runs (the other "
          f"{report['runs_finished_before_kill']} finished first); killed while writing a "
          f"version: {report['runs_killed_while_writing']}; seed {seed}")
    print(f"partial numeric versions visible: {report['partial_numeric_versions_visible']} "
          f"({report['watch_polls']} listings of the export base while runs lived, and a load "
          f"of every numeric folder after each kill)")
    print(f"hidden temporary folders left by killed runs: "
          f"{len(report['hidden_temporaries_before_final_export'])} (names TF Serving would "
          f"load: {len(report['hidden_names_tf_serving_would_load'])})")
    print(f"subsequent export: {'succeeded' if final['returncode'] == 0 else 'FAILED'}; hidden "
          f"folders left after it: {len(report['hidden_temporaries_after_final_export'])}; "
          f"versions {','.join(report['final_versions'])}")
    print(f"result: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def _parses_as_int64(name: str) -> bool:
    """Whether TF Serving's ``strings::safe_strto64`` would read ``name`` as a version (an
    optional sign and digits, surrounding whitespace allowed)."""
    stripped = name.strip()
    body = stripped[1:] if stripped[:1] in "+-" else stripped
    return bool(body) and body.isdigit()


if __name__ == "__main__":
    sys.exit(main())
