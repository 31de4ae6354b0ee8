"""requirements.txt names every third-party package the code (cifar/, stages/, tools/) imports directly, so an
install from it runs every stage and tool; packages only the tests use may be listed too. The imports are read
with ast, and mapped to their distributions by importlib.metadata, as installed here."""
import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CODE = ["cifar", "stages", "tools"]  # the project's own packages


def normalized(name):
    """A distribution's name as pip compares them (PEP 503): PyYAML and pyyaml, a_b and A.B alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports(text):
    """The top-level modules a Python source imports absolutely, less the standard library and the project."""
    modules = set()
    for node in ast.walk(ast.parse(text)):  # every import, a function's own too (onnxruntime is imported late)
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:  # a relative import is the project's
            modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - set(CODE)


def required(text):
    """The normalized distribution names of a requirements file's lines."""
    names = (re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#")[0]) for line in text.splitlines())
    return {normalized(name.group(1)) for name in names if name}


def test_every_package_the_code_imports_is_required():
    listed = required((REPO / "requirements.txt").read_text())
    distributions = packages_distributions()
    missing = {}
    for path in sorted(p for folder in CODE for p in (REPO / folder).rglob("*.py")):
        for module in third_party_imports(path.read_text()):
            names = distributions.get(module, [f"{module}, not installed"])
            if not {normalized(name) for name in names} & listed:
                missing.setdefault(f"{' or '.join(names)} (import {module})", path.relative_to(REPO).as_posix())
    assert not missing, "requirements.txt lacks " + "; ".join(f"{dist}, which {path} imports"
                                                              for dist, path in sorted(missing.items()))


def test_the_checks_find_what_they_look_for():
    """The extraction itself, so a check that finds nothing cannot pass by accident."""
    source = ("import os, numpy.linalg as la\nfrom PIL import Image\nfrom . import model\nfrom cifar.data import x\n"
              "import stages.train\ndef f():\n    import yaml\n")
    assert third_party_imports(source) == {"numpy", "PIL", "yaml"}
    assert required("# torch\ntorch==2.14.1\nPyYAML>=6.0  # yaml\n  Foo_Bar.baz[extra]>=1\n\n") == {
        "torch", "pyyaml", "foo-bar-baz"}
    assert {normalized(name) for name in packages_distributions()["yaml"]} == {"pyyaml"}
