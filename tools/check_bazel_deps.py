"""Checks the Bazel BUILD files against the Python sources they describe, without Bazel.

Usage (from the repository root; any Python 3.10+, no Bazel needed)::

    python tools/check_bazel_deps.py [--suggest] [--bazel bazel]

Reads every BUILD file itself (Starlark is close enough to Python to evaluate the rules with
small stand-ins for ``py_library``, ``glob`` and friends; see :func:`read_build_files`) and
every first-party ``.py`` file with :mod:`ast`, then reports as errors:

* a missing dependency: a library's or program's sources import a first-party module whose
  file is neither in its own ``srcs`` nor in a direct dep's ``srcs`` (tests, and the package
  ``__init__.py`` files that Python runs on the way, only need it reachable through deps);
* a source file listed in a target that does not exist (e.g. not committed yet);
* a ``.py`` file that no ``py_library`` / ``py_binary`` / ``py_test`` lists in ``srcs``;
* a program (a file in train/, export/, benchmarks/ or tools/ with an
  ``if __name__ == "__main__":`` block) that is no ``py_binary``'s main, and a
  ``tests/**/test_*.py`` file that is no ``py_test``'s source;

and as warnings, direct deps of libraries and binaries that provide nothing they import.
Third-party imports are ignored: they resolve from the virtual environment behind the Python
toolchain. ``--bazel BAZEL`` also reads the targets with ``bazel query`` and fails when the
two readings differ (tools/bazel_test.sh does this). Exit status 1 on any error, else 0.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field

PY_RULE_CLASSES = ("py_library", "py_binary", "py_test")
PROGRAM_DIRS = ("train", "export", "benchmarks", "tools")
SKIPPED_DIRS = ("third_party", ".venv", ".git", "runs", "build", "dist")
BUILD_FILE_NAMES = ("BUILD.bazel", "BUILD")
# The Python built-ins a BUILD file may use (Starlark has these, or close equivalents).
_STARLARK_BUILTINS = ("all", "any", "bool", "dict", "enumerate", "getattr", "hasattr", "int",
                      "len", "list", "max", "min", "print", "range", "reversed", "sorted",
                      "str", "tuple", "type", "zip", "True", "False", "None")


@dataclass
class PyTarget:
    """One Python rule: its label, rule class, source files (repo-relative) and direct deps."""

    label: str
    rule_class: str
    srcs: list[str]
    deps: list[str]
    main: str | None = None
    transitive_srcs: set[str] = field(default_factory=set)


class BuildFileError(Exception):
    """A BUILD file that cannot be read: its path and what went wrong."""


def label_to_path(label: str) -> str | None:
    """Maps ``//pkg:file.py`` to ``pkg/file.py``; None for external or generated labels."""
    if not label.startswith("//"):
        return None
    package, _, name = label[2:].partition(":")
    return f"{package}/{name}" if package else name


def normalize_label(label: str, package: str) -> str:
    """``:x`` / ``x`` / ``//p`` / ``//p:x`` written in ``package`` -> ``//p:x``."""
    if label.startswith("@"):
        return label
    if label.startswith("//"):
        path, colon, name = label[2:].partition(":")
        return f"//{path}:{name if colon else path.rsplit('/', 1)[-1]}"
    return f"//{package}:{label[1:] if label.startswith(':') else label}"


# ------------------------------------------------------------------------- BUILD file reader

def _ignored_dirs(repo_root: str) -> set[str]:
    ignored = set(SKIPPED_DIRS)
    bazelignore = os.path.join(repo_root, ".bazelignore")
    if os.path.isfile(bazelignore):
        with open(bazelignore, encoding="utf-8") as handle:
            ignored.update(line.strip().strip("/") for line in handle
                           if line.strip() and not line.startswith("#"))
    return ignored


def find_packages(repo_root: str) -> dict[str, str]:
    """Every Bazel package of the workspace: repo-relative folder ('' for the root) -> BUILD."""
    ignored = _ignored_dirs(repo_root)
    packages = {}
    for folder, subfolders, files in os.walk(repo_root):
        relative = os.path.relpath(folder, repo_root).replace(os.sep, "/")
        relative = "" if relative == "." else relative
        subfolders[:] = sorted(
            name for name in subfolders
            if not name.startswith((".", "bazel-", "__pycache__"))
            and (f"{relative}/{name}" if relative else name) not in ignored)
        build = next((name for name in BUILD_FILE_NAMES if name in files), None)
        if build:
            packages[relative] = f"{relative}/{build}" if relative else build
    return packages


def _glob_regex(pattern: str) -> re.Pattern:
    """Bazel glob -> regex: ``*`` stays within a path segment, ``**`` spans whole segments."""
    parts = []
    for index, segment in enumerate(pattern.split("/")):
        last = index == len(pattern.split("/")) - 1
        if segment == "**":
            parts.append("(?:[^/]+/)*" if not last else "(?:[^/]+/)*[^/]+")
            continue
        text = "".join("[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char)
                       for char in segment)
        parts.append(text if last else text + "/")
    return re.compile("".join(parts) + r"\Z")


def glob_files(repo_root: str, package: str, packages, include, exclude=()) -> list[str]:
    """Files of ``package`` matching ``include`` minus ``exclude``, relative to the package,
    sorted; never descends into a sub-package (a folder with its own BUILD file)."""
    base = os.path.join(repo_root, package)
    candidates = []
    for folder, subfolders, files in os.walk(base):
        relative = os.path.relpath(folder, base).replace(os.sep, "/")
        relative = "" if relative == "." else relative
        full = "/".join(part for part in (package, relative) if part)
        subfolders[:] = sorted(name for name in subfolders if name != "__pycache__"
                               and (f"{full}/{name}" if full else name) not in packages)
        candidates.extend(f"{relative}/{name}" if relative else name for name in files)
    included = [_glob_regex(pattern) for pattern in include]
    excluded = [_glob_regex(pattern) for pattern in exclude]
    return sorted(path for path in candidates
                  if any(regex.match(path) for regex in included)
                  and not any(regex.match(path) for regex in excluded))


def _read_package(repo_root: str, package: str, build_file: str, packages,
                  targets: dict[str, PyTarget]) -> None:
    with open(os.path.join(repo_root, build_file), encoding="utf-8") as handle:
        source = handle.read()
    try:
        tree = ast.parse(source, filename=build_file)
    except SyntaxError as error:
        raise BuildFileError(f"{build_file}: {error}") from error

    def py_rule(rule_class):
        def rule(name, srcs=(), deps=(), main=None, **_ignored):
            label = f"//{package}:{name}"
            files = [label_to_path(normalize_label(src, package)) for src in srcs]
            if rule_class == "py_library":
                main_path = None
            elif main is None:
                main_path = label_to_path(f"//{package}:{name}.py")
            else:
                main_path = label_to_path(normalize_label(main, package))
            if label in targets:
                raise BuildFileError(f"{build_file}: target {name!r} is defined twice")
            targets[label] = PyTarget(label, rule_class, [path for path in files if path],
                                      sorted(normalize_label(dep, package) for dep in deps),
                                      main_path)
        return rule

    def glob(include, exclude=(), exclude_directories=1, allow_empty=True):
        return glob_files(repo_root, package, packages, include, exclude)

    def select(branches, no_match_error=""):
        merged = []
        for value in branches.values():
            merged.extend(item for item in value if item not in merged)
        return merged

    def fail(message="", attr=None):
        raise BuildFileError(f"{build_file}: fail({message!r})")

    def ignored_rule(*_args, **_kwargs):
        return None

    names = {**{name: getattr(builtins, name) for name in _STARLARK_BUILTINS},
             **{rule_class: py_rule(rule_class) for rule_class in PY_RULE_CLASSES},
             "glob": glob, "select": select, "fail": fail}
    scope = {"__builtins__": names}
    # Every other name a BUILD file calls (package, load, filegroup, alias, exports_files,
    # sh_binary, loaded macros...) declares nothing Python-related here.
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in names:
            scope.setdefault(node.id, ignored_rule)
    try:
        exec(compile(tree, build_file, "exec"), scope)  # noqa: S102 (the repository's own BUILD)
    except BuildFileError:
        raise
    except Exception as error:  # a Starlark construct this reader does not imitate
        raise BuildFileError(f"{build_file}: {type(error).__name__}: {error}") from error


def read_build_files(repo_root: str) -> dict[str, PyTarget]:
    """Every Python rule of every BUILD file under ``repo_root``, keyed by label.

    Rules run with stand-ins: ``py_library`` / ``py_binary`` / ``py_test`` record the target,
    ``glob`` lists files as Bazel does (``**`` spans folders, never into a sub-package),
    ``select`` merges its branches, and any other rule or macro is ignored.
    """
    targets: dict[str, PyTarget] = {}
    packages = find_packages(repo_root)
    for package, build_file in sorted(packages.items()):
        _read_package(repo_root, package, build_file, packages, targets)
    for target in targets.values():
        target.transitive_srcs = _transitive_srcs(target.label, targets, {})
    return targets


def query_py_targets(bazel: str, repo_root: str) -> dict[str, PyTarget]:
    """Every Python rule in the workspace, keyed by label, from ``bazel query``."""
    command = [bazel, "query", "--output=xml", 'kind("py_(library|binary|test) rule", //...)']
    completed = subprocess.run(command, cwd=repo_root, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"bazel query failed ({completed.returncode}):\n{completed.stderr}")
    targets: dict[str, PyTarget] = {}
    for rule in ElementTree.fromstring(completed.stdout).iter("rule"):
        lists = {element.get("name"): [label.get("value") for label in element.iter("label")]
                 for element in rule.findall("list")}
        main_element = rule.find("label[@name='main']")
        main_label = main_element.get("value") if main_element is not None else None
        label = rule.get("name")
        if rule.get("class") == "py_library":
            main_path = None
        elif main_label is None:
            main_path = f"{label_to_path(label)}.py"
        else:
            main_path = label_to_path(main_label)
        srcs = [path for path in map(label_to_path, lists.get("srcs", [])) if path]
        targets[label] = PyTarget(label=label, rule_class=rule.get("class"), srcs=srcs,
                                  deps=sorted(lists.get("deps", [])), main=main_path)
    for target in targets.values():
        target.transitive_srcs = _transitive_srcs(target.label, targets, {})
    return targets


def compare_readings(ours: dict[str, PyTarget], bazels: dict[str, PyTarget]) -> list[str]:
    """Differences between this reader's targets and ``bazel query``'s, as error lines."""
    errors = [f"{label}: bazel query has it, the BUILD reader does not"
              for label in sorted(set(bazels) - set(ours))]
    errors += [f"{label}: the BUILD reader has it, bazel query does not"
               for label in sorted(set(ours) - set(bazels))]
    for label in sorted(set(ours) & set(bazels)):
        mine, theirs = ours[label], bazels[label]
        for name in ("rule_class", "srcs", "deps", "main"):
            if _comparable(getattr(mine, name)) != _comparable(getattr(theirs, name)):
                errors.append(f"{label}: {name} read as {getattr(mine, name)!r}, bazel query "
                              f"says {getattr(theirs, name)!r}")
    return errors


def _comparable(value):
    return sorted(value) if isinstance(value, list) else value


def _transitive_srcs(label: str, targets: dict[str, PyTarget],
                     memo: dict[str, set[str]]) -> set[str]:
    if label not in memo:
        target = targets.get(label)
        memo[label] = set(target.srcs) if target else set()
        for dep in target.deps if target else []:
            memo[label] |= _transitive_srcs(dep, targets, memo)
    return memo[label]


# ------------------------------------------------------------------------------ the sources

def first_party_files(repo_root: str) -> list[str]:
    """Every repo-relative ``.py`` path under the top-level source folders."""
    paths = []
    for entry in sorted(os.listdir(repo_root)):
        if entry.startswith((".", "bazel-")) or entry in SKIPPED_DIRS:
            continue
        if not os.path.isdir(os.path.join(repo_root, entry)):
            continue
        for folder, subfolders, files in os.walk(os.path.join(repo_root, entry)):
            subfolders[:] = sorted(name for name in subfolders
                                   if not name.startswith((".", "__pycache__")))
            paths.extend(os.path.relpath(os.path.join(folder, name), repo_root)
                         for name in sorted(files) if name.endswith(".py"))
    return [path.replace(os.sep, "/") for path in paths]


def module_file(module: str, repo_root: str) -> str | None:
    """The repo-relative file of a first-party module name, or None when there is none."""
    base = module.replace(".", "/")
    for candidate in (f"{base}.py", f"{base}/__init__.py"):
        if os.path.isfile(os.path.join(repo_root, candidate)):
            return candidate
    return None


def package_inits(module_path: str, repo_root: str) -> list[str]:
    """The existing ``__init__.py`` files Python runs before importing ``module_path``."""
    parts = module_path.split("/")[:-1]
    inits = []
    for depth in range(1, len(parts) + 1):
        candidate = "/".join(parts[:depth]) + "/__init__.py"
        if os.path.isfile(os.path.join(repo_root, candidate)):
            inits.append(candidate)
    return inits


def imported_files(path: str, repo_root: str) -> set[str]:
    """Repo-relative files of the first-party modules that ``path`` imports, anywhere in it.

    ``from pkg import sub`` with ``sub`` a module counts as importing ``pkg/sub.py`` only;
    ``pkg/__init__.py`` is then a package init, needed transitively (see package_inits).
    """
    with open(os.path.join(repo_root, path), encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), filename=path)
    package = path[:-len(".py")].replace("/", ".").rsplit(".", 1)[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names
                          if module_file(f"{base}.{alias.name}", repo_root)]
            names.extend(submodules)
            if len(submodules) < len(node.names):
                names.append(base)
    files = set()
    for name in names:
        found = module_file(name, repo_root) if name else None
        if found and found != path:
            files.add(found)
    return files


def _is_program(path: str, repo_root: str) -> bool:
    with open(os.path.join(repo_root, path), encoding="utf-8") as handle:
        return '__name__ == "__main__"' in handle.read()


# -------------------------------------------------------------------------------- the check

def _owners(targets: dict[str, PyTarget]) -> dict[str, str]:
    """File -> the library that lists it (the one with the fewest srcs when several do)."""
    owners: dict[str, str] = {}
    ranked = sorted(targets.values(), key=lambda t: (t.rule_class != "py_library",
                                                     len(t.srcs), t.label))
    for target in ranked:
        for src in target.srcs:
            owners.setdefault(src, target.label)
    return owners


def _owned_by(path: str, owners: dict[str, str]) -> str:
    return f" (add {owners[path]})" if path in owners else ""


def check(repo_root: str, targets: dict[str, PyTarget]) -> tuple[list[str], list[str]]:
    """Returns (errors, warnings) as human-readable lines."""
    errors: list[str] = []
    warnings: list[str] = []
    owners = _owners(targets)
    for target in sorted(targets.values(), key=lambda t: t.label):
        dep_srcs = {dep: set(targets[dep].srcs) if dep in targets else set()
                    for dep in target.deps}
        direct = set(target.srcs).union(*dep_srcs.values())
        if target.rule_class == "py_test":  # tests only need every import reachable
            direct = target.transitive_srcs
        used_deps = set()
        for source in target.srcs:
            if not os.path.isfile(os.path.join(repo_root, source)):
                errors.append(f"{target.label}: source {source} does not exist")
                continue
            if not source.endswith(".py"):
                continue
            for init in package_inits(source, repo_root):
                if init != source and init not in target.transitive_srcs:
                    errors.append(f"{target.label}: {source} lives in a package whose {init} "
                                  "is in no transitive dep")
                used_deps.update(dep for dep, srcs in dep_srcs.items() if init in srcs)
            for imported in sorted(imported_files(source, repo_root)):
                if imported not in direct:
                    errors.append(f"{target.label}: {source} imports {imported}, which is "
                                  f"in no direct dep's srcs{_owned_by(imported, owners)}")
                used_deps.update(dep for dep, srcs in dep_srcs.items() if imported in srcs)
                for init in package_inits(imported, repo_root):
                    if init not in target.transitive_srcs:
                        errors.append(f"{target.label}: importing {imported} runs {init}, "
                                      f"which is in no transitive dep{_owned_by(init, owners)}")
                    used_deps.update(dep for dep, srcs in dep_srcs.items() if init in srcs)
        if target.rule_class != "py_test" and target.srcs:
            for dep in target.deps:
                if dep not in used_deps:
                    warnings.append(f"{target.label}: dep {dep} provides nothing it imports")

    errors += _dependency_problems(targets)
    owned = {src for target in targets.values() for src in target.srcs}
    mains = {target.main for target in targets.values() if target.rule_class == "py_binary"}
    test_srcs = {src for target in targets.values() if target.rule_class == "py_test"
                 for src in target.srcs}
    for path in first_party_files(repo_root):
        if path not in owned:
            errors.append(f"{path}: in no py_library/py_binary/py_test")
        top = path.split("/", 1)[0]
        name = os.path.basename(path)
        if top == "tests" and name.startswith("test_") and path not in test_srcs:
            errors.append(f"{path}: no py_test runs it")
        if top in PROGRAM_DIRS and path not in mains and _is_program(path, repo_root):
            errors.append(f"{path}: a program, but no py_binary has it as main")
    return errors, warnings


def _dependency_problems(targets: dict[str, PyTarget]) -> list[str]:
    """Deps that name no Python target, and dependency cycles (Bazel refuses both)."""
    problems = [f"{target.label}: dep {dep} is no py_library/py_binary/py_test"
                for target in sorted(targets.values(), key=lambda t: t.label)
                for dep in target.deps if dep not in targets and not dep.startswith("@")]
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(label: str) -> None:
        state[label] = "open"
        path.append(label)
        for dep in targets[label].deps:
            if state.get(dep) == "open":
                cycle = path[path.index(dep):] + [dep]
                problems.append(f"{dep}: dependency cycle {' -> '.join(cycle)}")
            elif dep in targets and dep not in state:
                visit(dep)
        path.pop()
        state[label] = "done"

    for label in sorted(targets):
        if label not in state:
            visit(label)
    return problems


def suggest_binaries(repo_root: str, targets: dict[str, PyTarget]) -> list[str]:
    """``py_binary`` stanzas for programs that no binary runs, deps from their imports.

    The deps name the library owning the program itself (the folder's glob) and, for each
    first-party module it imports, the library owning that file; a file with no owner yet
    needs a library first (the check names it).
    """
    owner = _owners(targets)
    mains = {target.main for target in targets.values() if target.rule_class == "py_binary"}
    stanzas = []
    for path in first_party_files(repo_root):
        folder, name = os.path.split(path)
        if (folder not in PROGRAM_DIRS or path in mains or path not in owner
                or not _is_program(path, repo_root)):
            continue
        needed = imported_files(path, repo_root) | {path}
        deps = sorted({owner[file] for file in needed if file in owner},
                      key=lambda dep: (not dep.startswith(f"//{folder}:"), dep))
        lines = [f"# {folder}/BUILD", "py_binary(", f'    name = "{name[:-len(".py")]}",',
                 f'    srcs = ["{name}"],', "    deps = ["]
        lines += [f'        "{dep.replace(f"//{folder}:", ":")}",' for dep in deps]
        stanzas.append("\n".join(lines + ["    ],", ")"]))
    return stanzas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bazel", default=None,
                        help="also read the targets with this bazel executable's query and "
                             "fail when it disagrees with the BUILD reader")
    parser.add_argument("--suggest", action="store_true",
                        help="print py_binary stanzas for programs without one, then check")
    parser.add_argument("--repo_root", default=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), help="workspace to check (default: this checkout)")
    args = parser.parse_args(argv)
    try:
        targets = read_build_files(args.repo_root)
    except BuildFileError as error:
        print(f"error: {error}")
        return 1
    errors: list[str] = []
    if args.bazel:
        errors += compare_readings(targets, query_py_targets(args.bazel, args.repo_root))
    if args.suggest:
        for stanza in suggest_binaries(args.repo_root, targets):
            print(stanza + "\n")
    check_errors, warnings = check(args.repo_root, targets)
    errors += check_errors
    for line in warnings:
        print(f"warning: {line}")
    for line in errors:
        print(f"error: {line}")
    print(f"check_bazel_deps: {len(targets)} Python targets, {len(errors)} errors, "
          f"{len(warnings)} warnings")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
