"""The top-level `hf_distill` namespace: exactly the public API, every name resolvable and documented, imports lazy.

Written over `hf_distill.__all__`, so that names added later are checked too.
"""

import ast
import inspect
import pathlib
import subprocess
import sys

import pytest

import hf_distill

PACKAGE_DIR = pathlib.Path(hf_distill.__file__).parent
HEAVY_MODULES = ("torch", "transformers", "trl", "datasets", "accelerate", "peft")


def _attribute_docstrings() -> dict[str, str]:
    """Docstrings of module-level constants (a string literal right after `NAME = ...`) anywhere in the package."""
    docs: dict[str, str] = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        body = ast.parse(path.read_text(encoding="utf-8")).body
        for statement, following in zip(body, body[1:]):
            if not (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                continue
            targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
            for target in targets:
                if isinstance(target, ast.Name):
                    docs[target.id] = following.value.value
    return docs


def test_dir_is_exactly_the_public_api():
    assert dir(hf_distill) == sorted({*hf_distill.__all__, "__version__"})
    assert len(set(hf_distill.__all__)) == len(hf_distill.__all__), "duplicates in __all__"
    # still true once the lazy names (and with them the submodules) have been imported
    for name in hf_distill.__all__:
        getattr(hf_distill, name)
    assert dir(hf_distill) == sorted({*hf_distill.__all__, "__version__"})
    for internal in ("importlib", "annotations", "TYPE_CHECKING", "Any", "trainer", "config", "losses"):
        assert internal not in dir(hf_distill)


def test_lazy_names_are_all_public():
    assert set(hf_distill._LAZY) <= set(hf_distill.__all__)


@pytest.mark.parametrize("name", hf_distill.__all__)
def test_public_name_resolves_and_is_documented(name):
    obj = getattr(hf_distill, name)
    assert obj is not None
    if inspect.isclass(obj):
        doc = vars(obj).get("__doc__")  # its own, not one inherited from a base class
    elif callable(obj):
        doc = obj.__doc__
    else:  # a constant: documented by a string literal after its assignment
        doc = _attribute_docstrings().get(name)
    assert doc and doc.strip(), f"hf_distill.{name} has no docstring"


def test_version():
    assert isinstance(hf_distill.__version__, str) and hf_distill.__version__[0].isdigit()


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        hf_distill.not_a_name  # noqa: B018
    assert not hasattr(hf_distill, "Any")
    assert not hasattr(hf_distill, "TYPE_CHECKING")


def test_import_and_dir_stay_lazy():
    code = (
        "import sys, hf_distill; names = dir(hf_distill); "
        f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_parser_stays_lazy():
    # `hf-distill --help` and flag checking need no torch either
    code = (
        "import sys\nfrom hf_distill.cli.main import build_parser\nbuild_parser()\n"
        f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
