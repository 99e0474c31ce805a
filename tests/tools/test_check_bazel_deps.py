"""Tests for tools/check_bazel_deps.py on small synthetic repositories (no Bazel needed)."""

import os

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
    for target in targets.values():
        target.transitive_srcs = checker._transitive_srcs(target.label, targets, {})
    return targets


_REPO = {
    "lib/__init__.py": "from lib import base\n",
    "lib/base.py": "import numpy\n",
    "lib/extra.py": "from lib import base\nfrom lib.base import numpy\n",
    "train/__init__.py": "",
    "train/run.py": ("def main():\n    from lib import extra  # local import counts too\n"
                   "if __name__ == \"__main__\":\n    main()\n"),
    "tests/test_extra.py": "from lib import extra\n",
}


def _accurate_targets():
    return _targets(
        ("//lib:core", "py_library", ["lib/__init__.py", "lib/base.py"], [], None),
        ("//lib:extra", "py_library", ["lib/extra.py"], ["//lib:core"], None),
        ("//lib:lib", "py_library", ["lib/__init__.py", "lib/base.py", "lib/extra.py"],
         ["//lib:extra"], None),
        ("//train:package", "py_library", ["train/__init__.py"], [], None),
        ("//train:run", "py_binary", ["train/run.py"], ["//train:package", "//lib:extra"],
         "train/run.py"),
        ("//tests:test_extra", "py_test", ["tests/test_extra.py", "tests/main.py"],
         ["//lib:lib"], "tests/main.py"),
    )


def test_accurate_build_has_no_errors_or_warnings(tmp_path):
    _write(tmp_path, {**_REPO, "tests/main.py": ""})
    errors, warnings = checker.check(str(tmp_path), _accurate_targets())
    assert errors == []
    assert warnings == []


def test_unused_dep_is_a_warning(tmp_path):
    _write(tmp_path, {**_REPO, "tests/main.py": ""})
    targets = _accurate_targets()
    targets["//train:run"].deps.append("//train:other")
    targets["//train:other"] = checker.PyTarget("//train:other", "py_library", ["tests/main.py"],
                                                [])
    errors, warnings = checker.check(str(tmp_path), targets)
    assert errors == []
    assert warnings == ["//train:run: dep //train:other provides nothing it imports"]


def test_missing_direct_dep_is_reported_for_function_level_import(tmp_path):
    _write(tmp_path, {**_REPO, "tests/main.py": ""})
    targets = _accurate_targets()
    targets["//train:run"].deps = ["//train:package", "//lib:core"]
    targets["//train:run"].transitive_srcs = checker._transitive_srcs("//train:run", targets, {})
    errors, warnings = checker.check(str(tmp_path), targets)
    assert errors == ["//train:run: train/run.py imports lib/extra.py, which is in no direct "
                      "dep's srcs"]
    assert warnings == []  # //lib:core still provides lib/__init__.py, which the import runs


def test_package_init_must_be_reachable_transitively(tmp_path):
    _write(tmp_path, {**_REPO, "tests/main.py": ""})
    targets = _accurate_targets()
    targets["//lib:extra"].deps = []
    targets["//lib:extra"].srcs = ["lib/extra.py", "lib/base.py"]
    for target in targets.values():
        target.transitive_srcs = checker._transitive_srcs(target.label, targets, {})
    errors, _ = checker.check(str(tmp_path), targets)
    assert ("//lib:extra: lib/extra.py lives in a package whose lib/__init__.py is in no "
            "transitive dep") in errors


def test_unowned_file_program_without_binary_and_untested_file_are_reported(tmp_path):
    _write(tmp_path, {**_REPO, "tests/main.py": "", "lib/new.py": "",
                      "train/serve.py": "if __name__ == \"__main__\":\n    pass\n",
                      "tests/test_new.py": ""})
    errors, _ = checker.check(str(tmp_path), _accurate_targets())
    assert "lib/new.py: in no py_library/py_binary/py_test (other than a package-wide " \
           "aggregate)" in errors
    assert "train/serve.py: a program, but no py_binary has it as main" in errors
    assert "tests/test_new.py: no py_test runs it" in errors
    assert len(errors) == 5  # serve.py and test_new.py are also unowned


def test_relative_and_submodule_imports_resolve_to_files(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from . import b\nfrom .c import x\n",
                      "pkg/b.py": "", "pkg/c.py": "x = 1\n"})
    assert checker.imported_files("pkg/a.py", str(tmp_path)) == {"pkg/b.py", "pkg/c.py"}
    assert checker.package_inits("pkg/a.py", str(tmp_path)) == ["pkg/__init__.py"]


def test_label_to_path_and_aggregates():
    assert checker.label_to_path("//comdefend_tf:model.py") == "comdefend_tf/model.py"
    assert checker.label_to_path("@bazel_tools//tools:x") is None
    aggregate = checker.PyTarget("//comdefend_tf/attacks:attacks", "py_library", [], [])
    specific = checker.PyTarget("//comdefend_tf/attacks:apgd", "py_library", [], [])
    assert aggregate.is_aggregate and not specific.is_aggregate


def test_suggest_writes_stanzas_with_deps_from_imports(tmp_path):
    _write(tmp_path, {**_REPO, "tests/main.py": "",
                      "train/serve.py": ("from lib import extra\nfrom train import helper\n"
                                         "if __name__ == \"__main__\":\n    pass\n"),
                      "train/helper.py": "from lib.base import numpy\n"})
    stanzas = checker.suggest_targets(str(tmp_path), _accurate_targets())
    assert stanzas == [
        "# train/BUILD\npy_library(\n    name = \"helper\",\n    srcs = [\"helper.py\"],\n"
        "    deps = [\n        \":package\",\n        \"//lib:core\",\n    ],\n)",
        "# train/BUILD\npy_binary(\n    name = \"serve\",\n    srcs = [\"serve.py\"],\n"
        "    deps = [\n        \":helper\",\n        \":package\",\n        \"//lib:extra\",\n"
        "    ],\n)",
    ]


def test_aggregates_only_need_transitive_completeness(tmp_path):
    _write(tmp_path, {**_REPO, "tests/main.py": "", "train/train.py": "from lib import extra\n"})
    targets = _accurate_targets()
    targets["//train:train"] = checker.PyTarget("//train:train", "py_library",
                                                ["train/train.py"], ["//train:run"])
    targets["//train:train"].transitive_srcs = checker._transitive_srcs(
        "//train:train", targets, {})
    errors, warnings = checker.check(str(tmp_path), targets)
    assert errors == ["train/train.py: in no py_library/py_binary/py_test (other than a "
                      "package-wide aggregate)"]
    assert warnings == []


def test_listed_source_that_does_not_exist_is_reported(tmp_path):
    _write(tmp_path, {**_REPO, "tests/main.py": ""})
    targets = _accurate_targets()
    targets["//lib:extra"].srcs.append("lib/gone.py")
    errors, _ = checker.check(str(tmp_path), targets)
    assert errors == ["//lib:extra: source lib/gone.py does not exist"]
