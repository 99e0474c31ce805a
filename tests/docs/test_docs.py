"""The documentation stays true to the code.

* Every command line in README.md, docs/*.md, BENCHMARKS.md and tools/*.sh that runs one of
  our programs (``python -m train.X``, ``python -m export.X``, a ``comdefend-*`` console script,
  ``python tools/X.py``, ...) names only flags that program defines; so do the prose lists of
  one program's flags, and every backticked ``--flag`` is some program's.
* The serving signatures the docs name are the export's, and README.md, docs/serving.md and
  docs/security.md name every one of them.
* Benchmark figures live in BENCHMARKS.md only (its hand-written analysis names the run it
  interprets and survives a rerun); README.md's robustness headline is the one in docs/results/;
  the training-noise table's figures are not repeated around it.
* The demo trains each config at a learning rate that README says does not collapse it.
* README.md's exit-status table is ``comdefend_tf/cli/exit_codes.py``.
* Every module, test, script and page path, and every ``comdefend_tf.x.y`` name the docs give,
  exists.

Fast (no training): the flags of every binary come from one child process that imports them.
"""

from __future__ import annotations

import ast
import functools
import glob
import importlib
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import REPO_ROOT, subprocess_env

DOCS = ["README.md"] + sorted(os.path.relpath(path, REPO_ROOT)
                              for path in glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))
COMMAND_SOURCES = DOCS + ["BENCHMARKS.md"] + sorted(
    os.path.relpath(path, REPO_ROOT) for path in glob.glob(os.path.join(REPO_ROOT, "tools", "*.sh")))
BINARY_PACKAGES = ("train", "export", "benchmarks", "tools")


def _read(relative_path: str) -> str:
    with open(os.path.join(REPO_ROOT, relative_path), encoding="utf-8") as file:
        return file.read()


# ------------------------------------------------------------------------ command lines
def _binary_modules() -> list[str]:
    """Every absl program of the repository (``train.train_comdefend``, ...)."""
    modules = []
    for package in BINARY_PACKAGES:
        for path in sorted(glob.glob(os.path.join(REPO_ROOT, package, "*.py"))):
            source = open(path, encoding="utf-8").read()
            if "from absl import" in source and "app.run(" in source:
                modules.append(f"{package}.{os.path.basename(path)[:-3]}")
    return modules


# Runs in a child process: imports each binary in turn, records the flags it adds to absl's
# registry (plus absl's own), then removes them and forgets the project's modules so that the
# next binary defines its flags afresh. TensorFlow and Keras are imported once, before.
FLAG_LISTER = r"""
import importlib, json, sys
import absl.app, absl.logging
from absl import flags
import tensorflow, keras
PROJECT = ("train", "export", "benchmarks", "tools", "comdefend_tf", "tests")
base = set(flags.FLAGS)
result = {}
for module in sys.argv[1:]:
    before = set(sys.modules)
    try:
        importlib.import_module(module)
        added = set(flags.FLAGS) - base
        names = set(flags.FLAGS)
        booleans = [name for name in names if flags.FLAGS[name].boolean]
        extra = []
        if module == "export.purify_dataset":
            # Flags absl does not know go to Beam as pipeline options.
            from apache_beam.options.pipeline_options import PipelineOptions
            parsers = []
            PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)
            extra = [option[2:] for option in parsers[0]._option_string_actions
                     if option.startswith("--")]
        result[module] = {"flags": sorted(names | set(extra)), "booleans": sorted(booleans),
                          "error": None}
    except BaseException as error:  # an import failure is reported per binary
        added = set(flags.FLAGS) - base
        result[module] = {"flags": [], "booleans": [], "error": f"{type(error).__name__}: {error}"}
    for name in added:
        delattr(flags.FLAGS, name)
    for name in set(sys.modules) - before:
        if name.split(".")[0] in PROJECT:
            del sys.modules[name]
print("FLAGS_JSON " + json.dumps(result))
"""


@functools.lru_cache(maxsize=None)
def binary_flags() -> dict:
    """{module: {"flags": [...], "booleans": [...], "error": str | None}}, one child process."""
    modules = _binary_modules()
    completed = subprocess.run([sys.executable, "-c", FLAG_LISTER, *modules], cwd=REPO_ROOT,
                               env=subprocess_env(), capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = [line for line in completed.stdout.splitlines() if line.startswith("FLAGS_JSON ")]
    assert line, completed.stdout[-2000:] + completed.stderr[-2000:]
    return json.loads(line[-1][len("FLAGS_JSON "):])


@functools.lru_cache(maxsize=None)
def console_scripts() -> dict[str, str]:
    """``comdefend-train`` -> ``train.train_comdefend`` (pyproject -> cli.console.PROGRAMS)."""
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as file:
        scripts = tomllib.load(file)["project"]["scripts"]
    console = importlib.import_module("comdefend_tf.cli.console")
    result = {}
    for script, target in scripts.items():
        module_name, function = target.split(":")
        assert module_name == "comdefend_tf.cli.console", target
        program = console.PROGRAMS[function]  # comdefend_tf.train.train_comdefend
        result[script] = program[len("comdefend_tf."):]
    return result


def argparse_flags(script: str) -> set[str]:
    """``--name`` options of an argparse script under tools/, read from its source (and from the
    tests/fixtures module a thin tools/ wrapper runs)."""
    sources = [os.path.join(REPO_ROOT, script)]
    text = _read(script)
    for fixture in re.findall(r"from tests\.fixtures\.(\w+) import", text):
        sources.append(os.path.join(REPO_ROOT, "tests", "fixtures", fixture + ".py"))
    names = {"help"}
    for source in sources:
        names |= set(re.findall(r"add_argument\(\s*(?:\"-\w\",\s*)?[\"']--([\w-]+)[\"']",
                                open(source, encoding="utf-8").read()))
    return names


def _join_continuations(text: str) -> list[str]:
    lines, current = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            lines.append(current + line)
            current = ""
    if current:
        lines.append(current)
    return lines


def command_candidates(relative_path: str) -> list[str]:
    """Text that may hold command lines: shell scripts whole; in Markdown, fenced and indented
    code (backslash continuations joined) and inline code spans."""
    text = _read(relative_path)
    if relative_path.endswith(".sh"):
        return _join_continuations(text)
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    candidates = []
    for block in fenced:
        candidates += _join_continuations(block)
    indented = "\n".join(line for line in prose.splitlines() if line.startswith("    "))
    candidates += _join_continuations(indented)
    candidates += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
    return candidates


PROGRAM = re.compile(
    r"(?:python3?|\$\{?py\}?\"?|\"\$py\")\s+(?:-[A-Za-z]+\s+)*-m\s+"
    r"(?:comdefend_tf\.)?((?:train|export|benchmarks|tools)\.\w+)"
    r"|python3?\s+(tools/\w+\.py)"
    r"|bazel run //(train|export):(\w+)"
    r"|(?<![\w/-])(comdefend-[a-z-]+)(?=\s|$)")
FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)")


def _program_of(match: re.Match) -> tuple[str, str] | None:
    """('absl', module) or ('argparse', script path) for a PROGRAM match, None if not ours."""
    module, script, bazel_package, bazel_target, console = match.groups()
    if module:
        return "absl", module
    if script:
        return "argparse", script
    if bazel_package:
        return "absl", f"{bazel_package}.{bazel_target}"
    if console in console_scripts():
        return "absl", console_scripts()[console]
    return None


def commands_in(relative_path: str) -> list[tuple[str, str, list[str], str]]:
    """(kind, program, flags used, the command text) for every command line of a file."""
    found = []
    for candidate in command_candidates(relative_path):
        comment = re.search(r"(?:^|\s)#\s", candidate)
        code = candidate[:comment.start()] if comment else candidate
        matches = list(PROGRAM.finditer(code))
        for index, match in enumerate(matches):
            program = _program_of(match)
            if program is None:
                continue
            end = matches[index + 1].start() if index + 1 < len(matches) else len(code)
            arguments = re.split(r"&&|\|\||\s\|\s|;", code[match.end():end])[0]
            if index + 1 == len(matches) and comment:
                arguments += " " + candidate[comment.start():]  # "# --flag ..." notes
            found.append((*program, FLAG.findall(arguments), match.group(0) + arguments))
    return found


def _unknown_flags(kind: str, program: str, used: list[str]) -> list[str] | str:
    if kind == "argparse":
        known, booleans = argparse_flags(program), set()
    else:
        listing = binary_flags().get(program)
        if listing is None:
            return f"{program} is not a program of this repository"
        if listing["error"]:
            return f"{program} does not import: {listing['error']}"
        known, booleans = set(listing["flags"]), set(listing["booleans"])
    return [flag for flag in used
            if flag not in known and not (flag.startswith("no") and flag[2:] in booleans)]


@pytest.mark.parametrize("relative_path", COMMAND_SOURCES)
def test_command_lines_name_only_flags_that_exist(relative_path):
    problems = []
    for kind, program, used, command in commands_in(relative_path):
        unknown = _unknown_flags(kind, program, used)
        if unknown:
            problems.append(f"{program}: {unknown} in: {command.strip()[:200]}")
    assert not problems, f"{relative_path}:\n" + "\n".join(problems)


def test_the_command_extraction_finds_the_documented_commands():
    """Guards the extraction itself: continuations, inline spans, comments, console scripts."""
    readme = commands_in("README.md")
    by_program = {}
    for _, program, used, _ in readme:
        by_program.setdefault(program, set()).update(used)
    assert {"learning_rate", "noise_warmup_steps", "model_dir"} <= by_program["train.train_comdefend"]
    assert {"encoder_weights", "decoder_weights", "inference_noise_std"} <= by_program[
        "train.import_reference_weights"]
    assert {"threat_models", "defenses"} <= by_program["train.evaluate"]
    assert "purifier_dir" in by_program["train.train_classifier"]  # an inline span
    assert "protocol" in by_program["export.serving_client"]  # a "# --flag" note
    assert {"train_mode", "train_noise_std"} <= {
        flag for _, program, used, _ in commands_in("tools/noise_sweep.sh") for flag in used
        if program == "train.train_comdefend"}
    beam = {flag for _, program, used, _ in commands_in("docs/beam.md") for flag in used
            if program == "export.purify_dataset"}
    assert {"runner", "flink_master", "extra_package"} <= beam
    assert _unknown_flags("absl", "train.train_comdefend", ["learning_rate", "no_such_flag"]) == [
        "no_such_flag"]
    assert _unknown_flags("absl", "export.purify_dataset", ["runner", "model_dir"]) == []
    assert console_scripts()["comdefend-train"] == "train.train_comdefend"


def test_every_binary_imports_and_lists_its_flags():
    listing = binary_flags()
    assert {"train.train_comdefend", "export.export_savedmodel", "export.purify_dataset",
            "benchmarks.benchmark"} <= set(listing)
    failures = {module: entry["error"] for module, entry in listing.items() if entry["error"]}
    assert not failures
    # Each binary sees its own flags, not those of the binaries imported before it.
    assert "learning_rate" in listing["train.train_comdefend"]["flags"]
    assert "export_base" not in listing["train.train_comdefend"]["flags"]
    assert "export_base" in listing["export.export_savedmodel"]["flags"]


# Flags of programs that are not ours, named in the docs.
EXTERNAL_FLAGS = {"no-deps",                                   # pip
                  "inputs",                                    # saved_model_cli run
                  "model_base_path", "rest_api_port", "port", "model_name"}  # model server


# Prose that lists one program's flags: (file, text where the list starts, where it ends, program).
FLAG_LISTS = [
    ("README.md", "Flags: `--dataset`", "Unset model flags", "train.train_comdefend"),
    ("README.md", "## Purifying files and whole datasets", "`python -m export.purify_dataset",
     "export.purify_images"),
    ("docs/robustness.md", "Flags: `--threat_models`", "(`--help`", "train.robustness_report"),
    ("docs/reference_demo.md", "Purify options:", "The command never", "export.purify_images"),
    ("docs/serving.md", "## Export", "Writes are atomic", "export.export_savedmodel"),
    ("docs/security.md", "| limit (flag) | default |", "Each refused file", "export.purify_images"),
    ("docs/beam.md", "The model: `--model_dir`", "Every input ends up", "export.purify_dataset"),
]


@pytest.mark.parametrize("relative_path, start, end, program", FLAG_LISTS)
def test_flags_listed_in_prose_belong_to_their_program(relative_path, start, end, program):
    text = _read(relative_path)
    assert start in text and end in text.split(start, 1)[1], (start, end)
    listed = [flag for flag in FLAG.findall(text.split(start, 1)[1].split(end, 1)[0])
              if flag not in EXTERNAL_FLAGS]
    assert len(listed) >= 3
    assert not _unknown_flags("absl", program, listed)


@pytest.mark.parametrize("relative_path", [path for path in DOCS if path != "docs/bazel.md"])
def test_every_flag_the_prose_names_is_a_flag_of_some_program(relative_path):
    known = set(EXTERNAL_FLAGS)
    for entry in binary_flags().values():
        known |= set(entry["flags"])
    for script in glob.glob(os.path.join(REPO_ROOT, "tools", "*.py")):
        known |= argparse_flags(os.path.relpath(script, REPO_ROOT))
    named = set(re.findall(r"`--([A-Za-z][\w-]*)", _read(relative_path)))
    assert not named - known


def test_console_scripts_named_in_the_docs_exist():
    known = set(console_scripts())
    problems = []
    for relative_path in DOCS:
        for name in re.findall(r"`(comdefend-[a-z-]+)`", _read(relative_path)):
            if name not in known and name != "comdefend-tf":
                problems.append(f"{relative_path}: {name}")
    assert not problems


# ------------------------------------------------------------------- serving signatures
def _serving_modules() -> list:
    """Every module of comdefend_tf/serving/ (the package is free to move code between them)."""
    import pkgutil
    import comdefend_tf.serving as package
    return [importlib.import_module(f"{package.__name__}.{info.name}")
            for info in pkgutil.iter_modules(package.__path__)]


def _serving_attribute(name: str):
    for module in _serving_modules():
        if hasattr(module, name):
            return getattr(module, name)
    raise AssertionError(f"no module of comdefend_tf/serving/ defines {name}")


@functools.lru_cache(maxsize=None)
def exported_signatures() -> frozenset[str]:
    """The signature names of an export with a classifier (tiny purifier, no tracing)."""
    import keras
    from comdefend_tf import ComDefend, get_config
    purifier = ComDefend(get_config("tiny", input_channels=1), seed=0)
    classifier = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                   keras.layers.Dense(3)])
    functions = _serving_attribute("build_serving_functions")(purifier, classifier)
    return frozenset(functions.signatures) | {_serving_attribute("SIGNATURE_DEFAULT")}


def _signature_constants() -> set[str]:
    return {value for module in _serving_modules() for name, value in vars(module).items()
            if name.startswith("SIGNATURE_") and isinstance(value, str)}


def _binary_names() -> set[str]:
    return {module.split(".")[-1] for module in _binary_modules()}


def signatures_named_in(relative_path: str) -> set[str]:
    """Backticked ``purify*``/``classify*``/``serving_default`` names in the sections (text
    between headings) that speak of signatures; binaries such as ``purify_images`` excluded."""
    names = set()
    text = re.sub(r"^```[^\n]*\n.*?^```", "", _read(relative_path), flags=re.S | re.M)
    for section in re.split(r"^#+ ", text, flags=re.M):
        if "signature" in section.lower():
            names |= set(re.findall(r"`((?:purify|classify|serving_default)\w*)`", section))
    return names - _binary_names()


def test_the_signature_constants_are_the_export():
    assert _signature_constants() == exported_signatures()
    assert {"purify", "purify_bytes", "purify_examples", "classify",
            "serving_default"} <= exported_signatures()


@pytest.mark.parametrize("relative_path", DOCS)
def test_docs_name_only_signatures_the_export_has(relative_path):
    assert signatures_named_in(relative_path) <= exported_signatures()


@pytest.mark.parametrize("relative_path", ["README.md", "docs/serving.md", "docs/security.md"])
def test_the_serving_docs_name_every_signature(relative_path):
    missing = exported_signatures() - signatures_named_in(relative_path)
    assert not missing, f"{relative_path} does not name {sorted(missing)}"


def test_the_saved_model_cli_listing_in_serving_md_is_the_export():
    listed = set(re.findall(r"signature_def\['(\w+)'\]", _read("docs/serving.md")))
    assert listed - {"__saved_model_init_op"} == set(exported_signatures())


# ------------------------------------------------------------- numbers with one home
def _decimals(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w.])\d+\.\d+(?![\w.]*\d)", text))


def _section(text: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"no section '## {heading}'"
    return match.group(1)


def _settings_in_benchmarks() -> set[str]:
    """Settings of the code that BENCHMARKS.md states beside its measurements: --precision=auto's
    quality gate (PSNR within 0.2 dB). The docs may quote these."""
    from comdefend_tf.training import precision
    return {f"{precision.MAX_PSNR_DROP_DB:g}"}


@pytest.mark.parametrize("relative_path", ["README.md", "docs/performance.md"])
def test_benchmark_figures_are_quoted_only_in_benchmarks_md(relative_path):
    benchmarks = _read("BENCHMARKS.md")
    text = _read(relative_path)
    if relative_path == "README.md":
        text = _section(text, "Performance")
    measured = _decimals(benchmarks) - _settings_in_benchmarks()
    quoted = sorted(number for number in _decimals(text) if number in measured)
    assert not quoted, f"{relative_path} repeats BENCHMARKS.md's figures {quoted}: link to it"
    # Speed-ups and run times are measured figures too, however rounded.
    assert not re.findall(r"\b\d+(?:\.\d+)?x\b", text), "a speed-up: link to BENCHMARKS.md"
    assert not re.findall(r"\b\d+(?:\s*-\s*\d+)?\s*min(?:utes?)?\b", text), (
        "a benchmark run time: BENCHMARKS.md records it")
    assert "BENCHMARKS.md" in text


def test_the_benchmarks_analysis_names_the_run_it_interprets():
    benchmarks = _read("BENCHMARKS.md")
    generated = re.search(r"^Generated by .* on (\d{4}-\d\d-\d\d \d\d:\d\d UTC)", benchmarks,
                          flags=re.M).group(1)
    heading = re.search(r"^## Analysis \(written by hand for the run of ([^;)]+)", benchmarks,
                        flags=re.M)
    assert heading, "BENCHMARKS.md's analysis does not say which run it was written for"
    assert heading.group(1).strip() == generated or "Written for an earlier run" in benchmarks


CARRY_ANALYSIS = r"""
import sys
from benchmarks.benchmark import ANALYSIS_STALE_NOTE, hand_written_analysis
old = open(sys.argv[1]).read()
same = hand_written_analysis(old, "2026-11-27 08:33 UTC")
newer = hand_written_analysis(old, "2030-01-01 00:00 UTC")
again = hand_written_analysis("# tables\n\n" + newer, "2031-01-01 00:00 UTC")
assert same.startswith("## Analysis (written by hand for the run of 2026-11-27 08:33 UTC")
assert ANALYSIS_STALE_NOTE not in same and ANALYSIS_STALE_NOTE in newer
assert again == newer and again.count(ANALYSIS_STALE_NOTE) == 1
assert "15.06 against 15.27 dB" in newer
assert hand_written_analysis("# tables only\n", "2030-01-01 00:00 UTC") == ""
print("ok")
"""


def test_regenerating_benchmarks_md_keeps_the_analysis_and_marks_it_stale(tmp_path):
    """benchmarks/benchmark.py rewrites the tables; the hand-written analysis is carried over,
    with a note once the tables are newer than the run it interprets. (A child process: the
    benchmark defines absl flags that other binaries share.)"""
    previous = tmp_path / "BENCHMARKS.md"
    previous.write_text(_read("BENCHMARKS.md"))
    completed = subprocess.run([sys.executable, "-c", CARRY_ANALYSIS, str(previous)],
                               cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 0 and completed.stdout.strip() == "ok", completed.stderr[-2000:]


def test_the_readme_robustness_headline_is_the_one_in_docs_results():
    """Every number of README's robustness paragraph is in one of the reports it names."""
    readme = _read("README.md")
    paragraph = _section(readme, "Attack evaluation").split("### Adaptive robustness report")[1]
    named = sorted(set(re.findall(r"docs/results/(\w+)", paragraph)))
    assert named, "the headline names no docs/results/ report"
    held = set()
    for folder in named:
        reports = [name for name in ("robustness_report.md", "results.md")
                   if os.path.isfile(os.path.join(REPO_ROOT, "docs", "results", folder, name))]
        assert reports, f"docs/results/{folder} holds no report"
        for name in reports:
            held |= _decimals(_read(os.path.join("docs", "results", folder, name)))
    quoted = _decimals(paragraph)
    assert len(quoted) >= 5
    missing = sorted(number for number in quoted if number not in held)
    assert not missing, f"README quotes {missing}, which the reports {named} do not hold"


def test_the_noise_table_figures_are_not_repeated_in_its_prose():
    """README's training-noise table is the home of its figures: the prose around it quotes
    none of them, rounded or not (a repeat drifts: it once said 23.72 beside the table's 23.71)."""
    readme = _read("README.md")
    section = readme.split("### Training noise and learning rate: what works")[1].split("\n## ")[0]
    table = [float(number) for line in section.splitlines() if line.startswith("|")
             for number in _decimals(line)]
    prose = "\n".join(line for line in section.splitlines() if not line.startswith("|"))
    assert len(table) >= 20
    repeats = sorted(number for number in _decimals(prose)
                     if any(abs(float(number) - value) <= 0.005 * value for value in table))
    assert not repeats, f"the prose repeats the table's figures {repeats}"


# ------------------------------------------------------------------------------ the demo
@pytest.mark.parametrize("config, learning_rate", [("small", "1e-3"), ("tiny", "1e-3"),
                                                   ("paper", "1e-4"), ("released_gray", "1e-4")])
def test_the_demo_trains_each_config_at_a_rate_that_does_not_collapse_it(tmp_path, config,
                                                                          learning_rate):
    """README: the release widths collapse on the digits at 1e-3 and train at 1e-4; the demo
    must pick the rate by config (run with a stand-in Python that records its arguments)."""
    recorder = tmp_path / "python"
    recorder.write_text('#!/bin/sh\necho "$@" >> "$CALLS"\n')
    recorder.chmod(0o755)
    environment = dict(os.environ, PY=str(recorder), CALLS=str(tmp_path / "calls"),
                       COMDEFEND_CONFIG=config)
    environment.pop("COMDEFEND_LEARNING_RATE", None)
    completed = subprocess.run(["bash", os.path.join(REPO_ROOT, "tools", "demo.sh"),
                                str(tmp_path / "runs")], env=environment, capture_output=True,
                               text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    training = [call for call in calls if call.startswith("-m train.train_comdefend")]
    assert len(training) == 1 and len(calls) == 8
    assert f"--config={config}" in training[0].split()
    assert f"--learning_rate={learning_rate}" in training[0].split()
    environment["COMDEFEND_LEARNING_RATE"] = "3e-4"  # the override still wins
    (tmp_path / "calls").unlink()
    subprocess.run(["bash", os.path.join(REPO_ROOT, "tools", "demo.sh"), str(tmp_path / "runs")],
                   env=environment, capture_output=True, text=True, timeout=60, check=True)
    assert "--learning_rate=3e-4" in (tmp_path / "calls").read_text().split()


# ----------------------------------------------------------------------- exit statuses
def test_the_readme_exit_status_table_is_exit_codes_py():
    exit_codes = importlib.import_module("comdefend_tf.cli.exit_codes")
    constants = {name: value for name, value in vars(exit_codes).items()
                 if name.isupper() and isinstance(value, int)}
    section = _section(_read("README.md"), "Exit status")
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*`(\w+)`\s*\|\s*([^|]+)\|", section, flags=re.M)
    assert {(int(code), name) for code, name, _ in rows} == {
        (value, name) for name, value in constants.items()}
    for code, _, meaning in rows:
        assert meaning.strip().startswith(exit_codes.MEANINGS[int(code)]), meaning


# ------------------------------------------------------------------- paths and names
PATH = re.compile(r"(?<![\w/.$-])((?:comdefend_tf|tests|tools|train|export|benchmarks|docs)"
                  r"/[\w./-]*\w)(?:::(\w+))?([*<]?)")
DOTTED = re.compile(r"(?<![\w/.])(comdefend_tf(?:\.\w+)+)")
FROM_IMPORT = re.compile(r"from (comdefend_tf[\w.]*) import ([\w, ]+)")


@functools.lru_cache(maxsize=None)
def _package_dirs() -> dict[str, str]:
    """pyproject's package-dir: the wheel installs train/ as comdefend_tf.train, ..."""
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as file:
        return tomllib.load(file)["tool"]["setuptools"].get("package-dir", {})


def _module_path(dotted: str) -> str:
    for package, folder in _package_dirs().items():
        if dotted == package or dotted.startswith(package + "."):
            dotted = folder + dotted[len(package):]
    return dotted.replace(".", os.sep)


def _module_exists(dotted: str) -> bool:
    relative = _module_path(dotted)
    return (os.path.isfile(os.path.join(REPO_ROOT, relative + ".py"))
            or os.path.isfile(os.path.join(REPO_ROOT, relative, "__init__.py")))


def _defines(module_path: str, name: str) -> bool:
    """Whether a module (file) defines or imports ``name`` at its top level, or has a
    submodule of that name."""
    relative = _module_path(module_path)
    package_dir = os.path.join(REPO_ROOT, relative)
    if os.path.isfile(os.path.join(package_dir, name + ".py")) or os.path.isfile(
            os.path.join(package_dir, name, "__init__.py")):
        return True
    source_path = (os.path.join(package_dir, "__init__.py") if os.path.isdir(package_dir)
                   else os.path.join(REPO_ROOT, relative + ".py"))
    tree = ast.parse(open(source_path, encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            if node.name == name:
                return True
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(target, ast.Name) and target.id == name for target in targets):
                return True
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((alias.asname or alias.name.split(".")[0]) == name for alias in node.names):
                return True
    return False


def _dotted_name_exists(dotted: str) -> bool:
    """``comdefend_tf.io.images.read_image``: the longest module prefix, then one attribute
    (a class attribute after it is not checked)."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        module = ".".join(parts[:split])
        if _module_exists(module):
            return split == len(parts) or _defines(module, parts[split])
    return False


@pytest.mark.parametrize("relative_path", DOCS + ["BENCHMARKS.md"])
def test_paths_and_names_in_the_docs_exist(relative_path):
    text = _read(relative_path)
    problems = []
    for path, test_name, pattern in PATH.findall(text):
        if pattern:
            continue  # a pattern such as tests/test_*.py
        if path.split("/")[0] in ("train", "export", "benchmarks", "tools") and "." not in path:
            continue  # prose such as "train/inference"; their files have an extension
        full = os.path.join(REPO_ROOT, path)
        if not os.path.exists(full):
            problems.append(path)
        elif test_name and not re.search(rf"^def {test_name}\(", _read(path), flags=re.M):
            problems.append(f"{path}::{test_name}")
    for dotted in DOTTED.findall(text):
        if not _dotted_name_exists(dotted):
            problems.append(dotted)
    for module, names in FROM_IMPORT.findall(text):
        for name in (name.strip() for name in names.split(",")):
            if not _module_exists(module) or not _defines(module, name):
                problems.append(f"from {module} import {name}")
    assert not problems, f"{relative_path} names what does not exist: {problems}"
