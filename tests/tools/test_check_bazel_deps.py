"""Tests for tools/check_bazel_deps.py: the BUILD reader, the checks, and this repository."""

import os

import pytest

from tests.conftest import REPO_ROOT
from tools import check_bazel_deps as checker


def _write(root, files):
    for path, text in files.items():
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w", encoding="utf-8") as handle:
            handle.write(text)


def _targets(*specs):
    targets = {}
    for label, rule_class, srcs, deps, main in specs:
        targets[label] = checker.PyTarget(label=label, rule_class=rule_class, srcs=srcs,
                                          deps=deps, main=main)
    _refresh(targets)
    return targets


def _refresh(targets):
    for target in targets.values():
        target.transitive_srcs = checker._transitive_srcs(target.label, targets, {})


_REPO = {
    "lib/__init__.py": "from lib import base\n",
    "lib/base.py": "import numpy\n",
    "lib/extra.py": "from lib import base\nfrom lib.base import numpy\n",
    "train/__init__.py": "",
    "train/run.py": ("def main():\n    from lib import extra  # local import counts too\n"
                   "if __name__ == \"__main__\":\n    main()\n"),
    "tests/test_extra.py": "from lib import extra\n",
    "tests/main.py": "",
}


def _accurate_targets():
    return _targets(
        ("//lib:core", "py_library", ["lib/__init__.py", "lib/base.py"], [], None),
        ("//lib:extra", "py_library", ["lib/extra.py"], ["//lib:core"], None),
        ("//lib:lib", "py_library", [], ["//lib:core", "//lib:extra"], None),
        ("//train:package", "py_library", ["train/__init__.py"], [], None),
        ("//train:run", "py_binary", ["train/run.py"], ["//train:package", "//lib:extra"],
         "train/run.py"),
        ("//tests:test_extra", "py_test", ["tests/test_extra.py", "tests/main.py"],
         ["//lib:lib"], "tests/main.py"),
    )


def test_accurate_build_has_no_errors_or_warnings(tmp_path):
    _write(tmp_path, _REPO)
    errors, warnings = checker.check(str(tmp_path), _accurate_targets())
    assert errors == []
    assert warnings == []


def test_unused_dep_is_a_warning(tmp_path):
    _write(tmp_path, _REPO)
    targets = _accurate_targets()
    targets["//train:run"].deps.append("//train:other")
    targets["//train:other"] = checker.PyTarget("//train:other", "py_library", ["tests/main.py"],
                                                [])
    errors, warnings = checker.check(str(tmp_path), targets)
    assert errors == []
    assert warnings == ["//train:run: dep //train:other provides nothing it imports"]


def test_missing_direct_dep_is_reported_with_its_owner_for_function_level_import(tmp_path):
    _write(tmp_path, _REPO)
    targets = _accurate_targets()
    targets["//train:run"].deps = ["//train:package", "//lib:core"]
    _refresh(targets)
    errors, warnings = checker.check(str(tmp_path), targets)
    assert errors == ["//train:run: train/run.py imports lib/extra.py, which is in no direct "
                      "dep's srcs (add //lib:extra)"]
    assert warnings == []  # //lib:core still provides lib/__init__.py, which the import runs


def test_package_init_must_be_reachable_transitively(tmp_path):
    _write(tmp_path, _REPO)
    targets = _accurate_targets()
    targets["//lib:extra"].deps = []
    targets["//lib:extra"].srcs = ["lib/extra.py", "lib/base.py"]
    _refresh(targets)
    errors, _ = checker.check(str(tmp_path), targets)
    assert ("//lib:extra: lib/extra.py lives in a package whose lib/__init__.py is in no "
            "transitive dep") in errors


def test_unowned_file_program_without_binary_and_untested_file_are_reported(tmp_path):
    _write(tmp_path, {**_REPO, "lib/new.py": "",
                      "train/serve.py": "if __name__ == \"__main__\":\n    pass\n",
                      "tests/io/test_new.py": ""})
    errors, _ = checker.check(str(tmp_path), _accurate_targets())
    assert "lib/new.py: in no py_library/py_binary/py_test" in errors
    assert "train/serve.py: a program, but no py_binary has it as main" in errors
    assert "tests/io/test_new.py: no py_test runs it" in errors
    assert len(errors) == 5  # serve.py and test_new.py are also unowned


def test_a_test_main_does_not_count_as_a_binary(tmp_path):
    _write(tmp_path, {**_REPO, "train/serve.py": "if __name__ == \"__main__\":\n    pass\n"})
    targets = _accurate_targets()
    targets["//tests:serve"] = checker.PyTarget("//tests:serve", "py_test", ["train/serve.py"],
                                                ["//train:package"], "train/serve.py")
    _refresh(targets)
    errors, _ = checker.check(str(tmp_path), targets)
    assert errors == ["train/serve.py: a program, but no py_binary has it as main"]


def test_relative_and_submodule_imports_resolve_to_files(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from . import b\nfrom .c import x\n",
                      "pkg/b.py": "", "pkg/c.py": "x = 1\n"})
    assert checker.imported_files("pkg/a.py", str(tmp_path)) == {"pkg/b.py", "pkg/c.py"}
    assert checker.package_inits("pkg/a.py", str(tmp_path)) == ["pkg/__init__.py"]


def test_labels_normalize_as_bazel_spells_them():
    assert checker.label_to_path("//comdefend_tf:model.py") == "comdefend_tf/model.py"
    assert checker.label_to_path("@bazel_tools//tools:x") is None
    assert checker.normalize_label(":io", "comdefend_tf") == "//comdefend_tf:io"
    assert checker.normalize_label("x.py", "a/b") == "//a/b:x.py"
    assert checker.normalize_label("//comdefend_tf/attacks", "train") == \
        "//comdefend_tf/attacks:attacks"
    assert checker.normalize_label("//:pytest_config", "tests") == "//:pytest_config"
    assert checker.normalize_label("@r//p:t", "x") == "@r//p:t"


def test_suggest_writes_binary_stanzas_with_deps_from_imports(tmp_path):
    _write(tmp_path, {**_REPO,
                      "train/serve.py": ("from lib import extra\nfrom train import helper\n"
                                         "if __name__ == \"__main__\":\n    pass\n"),
                      "train/helper.py": "from lib.base import numpy\n"})
    targets = _accurate_targets()
    targets["//train:train"] = checker.PyTarget(
        "//train:train", "py_library", ["train/__init__.py", "train/helper.py",
                                        "train/run.py", "train/serve.py"], ["//lib:extra"])
    assert checker.suggest_binaries(str(tmp_path), targets) == [
        "# train/BUILD\npy_binary(\n    name = \"serve\",\n    srcs = [\"serve.py\"],\n"
        "    deps = [\n        \":train\",\n        \"//lib:extra\",\n    ],\n)",
    ]


def test_a_target_without_srcs_only_gathers_deps(tmp_path):
    _write(tmp_path, _REPO)
    targets = _accurate_targets()
    targets["//lib:lib"].deps.append("//train:package")  # unused, but nothing to check
    errors, warnings = checker.check(str(tmp_path), targets)
    assert errors == [] and warnings == []


def test_listed_source_that_does_not_exist_is_reported(tmp_path):
    _write(tmp_path, _REPO)
    targets = _accurate_targets()
    targets["//lib:extra"].srcs.append("lib/gone.py")
    errors, _ = checker.check(str(tmp_path), targets)
    assert errors == ["//lib:extra: source lib/gone.py does not exist"]


def test_unknown_deps_and_cycles_are_reported(tmp_path):
    _write(tmp_path, _REPO)
    targets = _accurate_targets()
    targets["//lib:core"].deps = ["//lib:extra", "//lib/io:io"]
    _refresh(targets)
    errors, _ = checker.check(str(tmp_path), targets)
    assert errors == ["//lib:core: dep //lib/io:io is no py_library/py_binary/py_test",
                      "//lib:core: dependency cycle //lib:core -> //lib:extra -> //lib:core"]


# ------------------------------------------------------------------------ the BUILD reader

_BUILD_REPO = {
    "WORKSPACE": "",
    ".bazelignore": ".venv\n",
    ".venv/BUILD": "this is no Starlark(",
    "BUILD": 'package(default_visibility = ["//visibility:public"])\n'
             'filegroup(name = "cfg", srcs = glob(["*.toml"]))\n',
    "lib/BUILD": (
        'load("@rules_python//python:defs.bzl", "py_library")\n'
        '_CORE = ["sub/__init__.py", "sub/a.py"]\n'
        'py_library(name = "core", srcs = glob(["*.py"]) + _CORE)\n'
        'py_library(\n    name = "sub",\n'
        '    srcs = glob(["sub/**/*.py"], exclude = _CORE),\n'
        '    deps = [":core"] + select({"//conditions:default": ["//lib/deep"]}),\n)\n'),
    "lib/__init__.py": "", "lib/base.py": "",
    "lib/sub/__init__.py": "", "lib/sub/a.py": "", "lib/sub/b.py": "",
    "lib/sub/inner/c.py": "", "lib/sub/notes.txt": "",
    "lib/deep/BUILD": ('py_library(name = "deep", srcs = glob(["**/*.py"]),\n'
                       '           deps = ["//lib:core", "//lib:gone"])\n'),
    "lib/deep/__init__.py": "", "lib/deep/x/y.py": "",
    "tests/BUILD": (
        '[\n    py_test(\n        name = f[:-len(".py")],\n'
        '        srcs = [f, "main.py"],\n        main = "main.py",\n'
        '        args = ["$(rootpath %s)" % f],\n        deps = ["//lib:sub"],\n    )\n'
        '    for f in glob(["**/test_*.py"])\n]\n'
        'py_binary(name = "tool", srcs = ["tool.py"])\n'),
    "tests/main.py": "", "tests/tool.py": "", "tests/test_a.py": "", "tests/io/test_b.py": "",
}


def test_build_files_are_read_with_globs_selects_and_comprehensions(tmp_path):
    _write(tmp_path, _BUILD_REPO)
    targets = checker.read_build_files(str(tmp_path))
    assert {label: (t.rule_class, t.srcs, t.deps, t.main) for label, t in targets.items()} == {
        "//lib:core": ("py_library", ["lib/__init__.py", "lib/base.py", "lib/sub/__init__.py",
                                      "lib/sub/a.py"], [], None),
        "//lib:sub": ("py_library", ["lib/sub/b.py", "lib/sub/inner/c.py"],
                      ["//lib/deep:deep", "//lib:core"], None),
        "//lib/deep:deep": ("py_library", ["lib/deep/__init__.py", "lib/deep/x/y.py"],
                            ["//lib:core", "//lib:gone"], None),
        "//tests:io/test_b": ("py_test", ["tests/io/test_b.py", "tests/main.py"],
                              ["//lib:sub"], "tests/main.py"),
        "//tests:test_a": ("py_test", ["tests/test_a.py", "tests/main.py"], ["//lib:sub"],
                           "tests/main.py"),
        "//tests:tool": ("py_binary", ["tests/tool.py"], [], "tests/tool.py"),
    }
    assert targets["//lib:sub"].transitive_srcs >= {"lib/deep/x/y.py", "lib/base.py"}


def test_glob_matches_as_bazel_does(tmp_path):
    _write(tmp_path, _BUILD_REPO)
    packages = checker.find_packages(str(tmp_path))
    assert sorted(packages) == ["", "lib", "lib/deep", "tests"]  # .bazelignore'd .venv left out
    root = str(tmp_path)
    assert checker.glob_files(root, "lib", packages, ["*.py"]) == ["__init__.py", "base.py"]
    assert checker.glob_files(root, "lib", packages, ["**/*.py"], ["sub/**"]) == [
        "__init__.py", "base.py"]  # never into lib/deep, which has its own BUILD
    assert checker.glob_files(root, "lib", packages, ["sub/*"]) == [
        "sub/__init__.py", "sub/a.py", "sub/b.py", "sub/notes.txt"]
    assert checker.glob_files(root, "tests", packages, ["**/test_?.py"]) == [
        "io/test_b.py", "test_a.py"]


def test_a_broken_build_file_names_itself(tmp_path):
    _write(tmp_path, {**_BUILD_REPO, "lib/deep/BUILD": 'py_library(name = "deep", srcs = [\n'})
    with pytest.raises(checker.BuildFileError, match="lib/deep/BUILD"):
        checker.read_build_files(str(tmp_path))
    _write(tmp_path, {"lib/deep/BUILD": 'py_library(name = "d")\npy_library(name = "d")\n'})
    with pytest.raises(checker.BuildFileError, match="'d' is defined twice"):
        checker.read_build_files(str(tmp_path))
    _write(tmp_path, {"lib/deep/BUILD": 'fail("not supported")\n'})
    assert checker.main(["--repo_root", str(tmp_path)]) == 1


def test_readings_of_the_reader_and_bazel_query_are_compared():
    ours = _accurate_targets()
    theirs = _accurate_targets()
    assert checker.compare_readings(ours, theirs) == []
    theirs["//lib:extra"].deps = ["//lib:core", "//lib:lib"]
    del theirs["//train:package"]
    assert checker.compare_readings(ours, theirs) == [
        "//train:package: the BUILD reader has it, bazel query does not",
        "//lib:extra: deps read as ['//lib:core'], bazel query says ['//lib:core', '//lib:lib']",
    ]


def test_main_reports_and_sets_the_exit_status(tmp_path, capsys):
    _write(tmp_path, _BUILD_REPO)
    assert checker.main(["--repo_root", str(tmp_path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "warning: //lib/deep:deep: dep //lib:gone provides nothing it imports",
        "warning: //lib:sub: dep //lib/deep:deep provides nothing it imports",
        "error: //lib/deep:deep: dep //lib:gone is no py_library/py_binary/py_test",
        "check_bazel_deps: 6 Python targets, 1 errors, 2 warnings",
    ]


@pytest.mark.skipif("TEST_SRCDIR" in os.environ,
                    reason="Bazel's runfiles hold no BUILD files; tools/bazel_test.sh runs the "
                           "check on the source tree itself")
def test_this_repositorys_build_files_match_the_imports():
    """The check `make test` relies on: every BUILD file of this checkout is accurate."""
    targets = checker.read_build_files(REPO_ROOT)
    errors, _ = checker.check(REPO_ROOT, targets)
    assert errors == []
    assert {"//comdefend_tf:core", "//comdefend_tf:io", "//train:train_comdefend",
            "//tests:tools/test_check_bazel_deps"} <= set(targets)
