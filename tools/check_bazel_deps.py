"""Checks the Bazel BUILD files against the Python sources they describe.

Usage (from the repository root, after tools/bazel_setup.sh)::

    python tools/check_bazel_deps.py [--bazel bazel]

Reads every ``py_library`` / ``py_binary`` / ``py_test`` rule with ``bazel query`` (no build)
and every first-party ``.py`` file with :mod:`ast`, then reports:

* a missing dependency: a target's sources import a first-party module whose file is neither
  in that target's ``srcs`` nor in the ``srcs`` of one of its direct ``deps`` (the package
  ``__init__.py`` files that Python runs on the way, and anything that tests and package-wide
  aggregates such as ``//comdefend_tf:comdefend_tf`` import, only need to be reachable
  transitively);
* a source file listed in a target that does not exist (e.g. not committed yet);
* a source file that no specific target owns (targets named after their package, such as
  ``//comdefend_tf:comdefend_tf``, are globbing aggregates and do not count);
* a program (a file in train/, export/, benchmarks/ or tools/ with an
  ``if __name__ == "__main__":`` block) that is no ``py_binary``'s main, and a
  ``tests/test_*.py`` file that is no ``py_test``'s source;
* as warnings only, direct ``deps`` of libraries and binaries that provide nothing the
  target imports.

Imports of third-party packages are ignored: those resolve from the virtual environment
behind the Python toolchain. Exits with status 1 when any error is found, 0 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field

PY_RULE_CLASSES = ("py_library", "py_binary", "py_test")
PROGRAM_DIRS = ("train", "export", "benchmarks", "tools")
SKIPPED_DIRS = ("third_party", ".venv", ".git", "runs", "build", "dist")


@dataclass
class PyTarget:
    """One Python rule: its label, rule class, source files (repo-relative) and direct deps."""

    label: str
    rule_class: str
    srcs: list[str]
    deps: list[str]
    main: str | None = None
    transitive_srcs: set[str] = field(default_factory=set)

    @property
    def is_aggregate(self) -> bool:
        """True for ``//pkg:pkg`` targets, which glob a whole package for convenience."""
        package, _, name = self.label.partition(":")
        return package.rsplit("/", 1)[-1] == name


def label_to_path(label: str) -> str | None:
    """Maps ``//pkg:file.py`` to ``pkg/file.py``; None for external or generated labels."""
    if not label.startswith("//"):
        return None
    package, _, name = label[2:].partition(":")
    return f"{package}/{name}" if package else name


def query_py_targets(bazel: str, repo_root: str) -> dict[str, PyTarget]:
    """Returns every Python rule in the workspace, keyed by label, from ``bazel query``."""
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
        srcs = [path for path in map(label_to_path, lists.get("srcs", [])) if path]
        label = rule.get("name")
        if main_label is None and rule.get("class") in ("py_binary", "py_test"):
            main_path = f"{label_to_path(label)}.py"
        else:
            main_path = label_to_path(main_label) if main_label else None
        targets[label] = PyTarget(label=label, rule_class=rule.get("class"), srcs=srcs,
                                  deps=lists.get("deps", []), main=main_path)
    for target in targets.values():
        target.transitive_srcs = _transitive_srcs(target.label, targets, {})
    return targets


def _transitive_srcs(label: str, targets: dict[str, PyTarget],
                     memo: dict[str, set[str]]) -> set[str]:
    if label not in memo:
        target = targets.get(label)
        memo[label] = set(target.srcs) if target else set()
        for dep in target.deps if target else []:
            memo[label] |= _transitive_srcs(dep, targets, memo)
    return memo[label]


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
    return paths


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


def check(repo_root: str, targets: dict[str, PyTarget]) -> tuple[list[str], list[str]]:
    """Returns (errors, warnings) as human-readable lines."""
    errors: list[str] = []
    warnings: list[str] = []
    for target in sorted(targets.values(), key=lambda t: t.label):
        dep_srcs = {dep: set(targets[dep].srcs) if dep in targets else set()
                    for dep in target.deps}
        direct = set(target.srcs).union(*dep_srcs.values())
        if target.is_aggregate or target.rule_class == "py_test":  # only need completeness
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
                                  "in no direct dep's srcs")
                used_deps.update(dep for dep, srcs in dep_srcs.items() if imported in srcs)
                for init in package_inits(imported, repo_root):
                    if init not in target.transitive_srcs:
                        errors.append(f"{target.label}: importing {imported} runs {init}, "
                                      "which is in no transitive dep")
                    used_deps.update(dep for dep, srcs in dep_srcs.items() if init in srcs)
        if target.rule_class != "py_test" and not target.is_aggregate:
            for dep in target.deps:
                if dep not in used_deps:
                    warnings.append(f"{target.label}: dep {dep} provides nothing it imports")

    owned = {src for target in targets.values() if not target.is_aggregate
             for src in target.srcs}
    mains = {target.main for target in targets.values() if target.main}
    test_srcs = {src for target in targets.values() if target.rule_class == "py_test"
                 for src in target.srcs}
    for path in first_party_files(repo_root):
        if path not in owned:
            errors.append(f"{path}: in no py_library/py_binary/py_test (other than a "
                          "package-wide aggregate)")
        top = path.split("/", 1)[0]
        name = os.path.basename(path)
        if top == "tests" and name.startswith("test_") and path not in test_srcs:
            errors.append(f"{path}: no py_test runs it")
        if top in PROGRAM_DIRS and path not in mains:
            with open(os.path.join(repo_root, path), encoding="utf-8") as handle:
                if '__name__ == "__main__"' in handle.read():
                    errors.append(f"{path}: a program, but no py_binary has it as main")
    return errors, warnings


def suggest_targets(repo_root: str, targets: dict[str, PyTarget]) -> list[str]:
    """BUILD stanzas for source files that no specific target owns, deps from their imports.

    Each file becomes ``py_binary`` (a program) or ``py_library`` named after the file, in the
    BUILD file of its folder; deps name the specific targets owning the files it imports and
    its package ``__init__.py``. Cycles through ``__init__.py`` need a hand edit.
    """
    owner = {src: target.label for target in targets.values() if not target.is_aggregate
             for src in target.srcs}
    unowned = [path for path in first_party_files(repo_root)
               if path not in owner and not os.path.basename(path).startswith("test_")
               and not path.startswith("tests/")]
    def target_name(file_name: str) -> str:
        return "package" if file_name == "__init__.py" else file_name[:-len(".py")]

    for path in unowned:
        folder, name = os.path.split(path)
        owner[path] = f"//{folder}:{target_name(name)}"
    stanzas = []
    for path in unowned:
        folder, name = os.path.split(path)
        needed = set(imported_files(path, repo_root)) | set(package_inits(path, repo_root)[-1:])
        deps = sorted({owner[file] for file in needed if file != path} - {owner[path]})
        deps = sorted(deps, key=lambda d: (not d.startswith(f"//{folder}:"), d))
        local = [d.replace(f"//{folder}:", ":") for d in deps]
        with open(os.path.join(repo_root, path), encoding="utf-8") as handle:
            is_program = '__name__ == "__main__"' in handle.read()
        rule = "py_binary" if is_program and folder in PROGRAM_DIRS else "py_library"
        lines = [f"# {folder}/BUILD", f"{rule}(", f'    name = "{target_name(name)}",',
                 f'    srcs = ["{name}"],']
        if local:
            lines.append("    deps = [")
            lines.extend(f'        "{dep}",' for dep in local)
            lines.append("    ],")
        lines.append(")")
        stanzas.append("\n".join(lines))
    return stanzas


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bazel", default="bazel", help="bazel executable")
    parser.add_argument("--suggest", action="store_true",
                        help="print BUILD stanzas for files without a target, then check")
    args = parser.parse_args()
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    targets = query_py_targets(args.bazel, repo_root)
    if args.suggest:
        for stanza in suggest_targets(repo_root, targets):
            print(stanza + "\n")
    errors, warnings = check(repo_root, targets)
    for line in warnings:
        print(f"warning: {line}")
    for line in errors:
        print(f"error: {line}")
    print(f"check_bazel_deps: {len(targets)} Python targets, {len(errors)} errors, "
          f"{len(warnings)} warnings")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
