"""The public API: every exported name exists and is documented in numpydoc form; the modules' doctests pass."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re

import pytest

import relpos_ref as rp

PUBLIC = [n for n in rp.__all__ if n != "__version__"]
SECTION = re.compile(r"^(?P<title>[A-Z][A-Za-z ]+)\n-{3,}$", re.M)


def sections(doc: str) -> dict[str, str]:
    """numpydoc sections of a dedented docstring: title -> body."""
    heads = list(SECTION.finditer(doc))
    out = {}
    for k, m in enumerate(heads):
        end = heads[k + 1].start() if k + 1 < len(heads) else len(doc)
        out[m.group("title")] = doc[m.end() : end]
    return out


def documented_names(body: str) -> set[str]:
    """Parameter names of a numpydoc Parameters body (``a, b : type`` lines at column 0)."""
    names = set()
    for line in body.splitlines():
        m = re.match(r"^([A-Za-z_][A-Za-z_0-9]*(?:\s*,\s*[A-Za-z_][A-Za-z_0-9]*)*)\s*(?::.*)?$", line)
        if m:
            names.update(n.strip() for n in m.group(1).split(","))
    return names


def signature_params(obj) -> list[str]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(target)
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in sig.parameters.values() if p.name not in ("self", "cls") and p.kind not in skip]


def test_all_names_exist_and_are_unique():
    assert len(set(rp.__all__)) == len(rp.__all__)
    for name in rp.__all__:
        assert hasattr(rp, name), name
    assert isinstance(rp.__version__, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", rp.__version__)


@pytest.mark.parametrize("name", PUBLIC)
def test_numpydoc_docstring(name):
    obj = getattr(rp, name)
    doc = inspect.getdoc(obj)
    assert doc, f"{name} has no docstring"
    summary = doc.splitlines()[0]
    assert summary.strip(), f"{name}: the first line must be a one-line summary"
    assert doc.count("\n") >= 2, f"{name}: a summary alone is not a numpydoc docstring"
    found = sections(doc)
    params = signature_params(obj)
    if name == "BiasFamily":
        # Abstract base: documents its attributes and the subclass contract instead of constructor parameters.
        assert "Attributes" in found
        assert "Notes" in found
        return
    if params:
        assert "Parameters" in found, f"{name}: no Parameters section"
        missing = [p for p in params if p not in documented_names(found["Parameters"])]
        assert not missing, f"{name}: parameters not documented: {missing}"
    if inspect.isfunction(obj):
        assert "Returns" in found, f"{name}: no Returns section"


@pytest.mark.parametrize(
    "name", [n for n in PUBLIC if inspect.isclass(getattr(rp, n)) and issubclass(getattr(rp, n), rp.BiasFamily)]
)
def test_family_methods_documented(name):
    cls = getattr(rp, name)
    for attr, value in inspect.getmembers(cls):
        if attr.startswith("_"):
            continue
        if callable(value) or isinstance(inspect.getattr_static(cls, attr), property):
            assert inspect.getdoc(value if callable(value) else inspect.getattr_static(cls, attr)), f"{name}.{attr}"
    for method in ("bias", "bias_vjp", "parameters", "options", "astype"):
        assert inspect.getdoc(getattr(cls, method)), f"{name}.{method}"


def _modules() -> list[str]:
    names = ["relpos_ref"]
    for info in pkgutil.walk_packages(rp.__path__, prefix="relpos_ref."):
        last = info.name.rsplit(".", 1)[-1]
        if last == "conftest" or last.startswith("test_"):
            continue  # pytest plugin and test modules, not library code
        names.append(info.name)
    return sorted(names)


MODULES = _modules()
CORE_WITH_EXAMPLES = ["relpos_ref.positions", "relpos_ref.families.t5", "relpos_ref.families.alibi"]


@pytest.mark.parametrize("module_name", MODULES)
def test_doctests(module_name):
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # an optional dependency (CuPy, ...) missing here
        pytest.skip(f"{module_name} cannot be imported here: {exc}")
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(module, module_name, globs={})
    for test in tests:
        runner.run(test, out=lambda text: None)
    result = runner.summarize(verbose=False)
    if module_name in CORE_WITH_EXAMPLES:
        assert result.attempted > 0, f"{module_name}: expected doctest examples"
    if result.failed:
        # Re-run the failing examples with a reporter so the message shows what went wrong.
        report: list[str] = []
        for test in tests:
            doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE).run(
                test, out=report.append
            )
        pytest.fail(
            f"{result.failed} of {result.attempted} doctest examples failed in {module_name}:\n" + "".join(report)
        )


def test_core_modules_are_covered():
    for name in CORE_WITH_EXAMPLES:
        assert name in MODULES
