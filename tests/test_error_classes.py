"""Every error fasttrak raises derives from ``ft.FastTrakError`` (and from the fitting
built-in exception), checked on the source: each ``raise X(...)`` / ``raise X`` of every
module under fasttrak/ is resolved and its class checked."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import typing
from pathlib import Path

import numpy as np
import pytest

import fasttrak as ft
from fasttrak import errors

PACKAGE = Path(ft.__file__).resolve().parent
ROOT = PACKAGE.parent

# Modules not checked yet (none: every module raises fasttrak's errors).
PENDING: set[str] = set()

# The CLI reports errors the way click does: click.ClickException and its subclasses.
ALLOWED = {"fasttrak/cli.py": ("click", "ClickException")}


def is_pending(relative: str) -> bool:
    return any(
        relative.startswith(entry) if entry.endswith("/") else relative == entry
        for entry in PENDING
    )


def module_files() -> list[str]:
    files = sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py"))
    return [f for f in files if not is_pending(f)]


def module_name(relative: str) -> str:
    parts = list(Path(relative).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def raise_sites(tree: ast.AST) -> list[tuple[ast.Raise, set[str]]]:
    """Each ``raise`` with an exception, and the names bound by the ``except ... as name``
    handlers around it (re-raising one of those is a re-raise of a caught error)."""
    sites: list[tuple[ast.Raise, set[str]]] = []

    def visit(node: ast.AST, caught: frozenset[str]) -> None:
        if isinstance(node, ast.Raise) and node.exc is not None:
            sites.append((node, set(caught)))
        if isinstance(node, ast.ExceptHandler) and node.name:
            caught = caught | {node.name}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            caught = frozenset()  # a nested function does not see the handler's variable
        for child in ast.iter_child_nodes(node):
            visit(child, caught)

    visit(tree, frozenset())
    return sites


def resolve(expr: ast.expr, namespace: dict[str, object]) -> object:
    """The object a Name or dotted Attribute refers to in ``namespace`` (then builtins)."""
    if isinstance(expr, ast.Name):
        if expr.id in namespace:
            return namespace[expr.id]
        if hasattr(builtins, expr.id):
            return getattr(builtins, expr.id)
        raise LookupError(expr.id)
    if isinstance(expr, ast.Attribute):
        return getattr(resolve(expr.value, namespace), expr.attr)
    raise LookupError(ast.unparse(expr))


def raised_class(obj: object) -> object:
    """The class ``raise obj(...)`` raises: ``obj`` itself, or for a function that builds the
    error, the class its return annotation names."""
    if inspect.isclass(obj):
        return obj
    if inspect.isfunction(obj):
        return typing.get_type_hints(obj).get("return")
    return obj


def violations(relative: str) -> list[str]:
    """The raise sites of module ``relative`` whose error is no FastTrakError."""
    allowed: tuple[type, ...] = ()
    if relative in ALLOWED:
        module, name = ALLOWED[relative]
        allowed = (getattr(importlib.import_module(module), name),)
    namespace = vars(importlib.import_module(module_name(relative)))
    return check_source((ROOT / relative).read_text(), namespace, allowed, relative)


def check_source(
    source: str, namespace: dict[str, object], allowed: tuple[type, ...], label: str
) -> list[str]:
    found = []
    for node, caught in raise_sites(ast.parse(source, filename=label)):
        exc = node.exc
        assert exc is not None
        target = exc.func if isinstance(exc, ast.Call) else exc
        where = f"{label}:{node.lineno}: raise {ast.unparse(target)}"
        if isinstance(target, ast.Name) and target.id in caught and target is exc:
            continue  # re-raising a caught error object: `except E as err: ... raise err`
        if not isinstance(target, (ast.Name, ast.Attribute)):
            found.append(f"{where} (not a name: cannot check it)")
            continue
        try:
            cls = raised_class(resolve(target, namespace))
        except (LookupError, AttributeError):
            found.append(f"{where} (cannot resolve the name in the module)")
            continue
        if not (inspect.isclass(cls) and issubclass(cls, BaseException)):
            found.append(f"{where} ({cls!r} is not an exception class)")
        elif not issubclass(cls, errors.FastTrakError) and not issubclass(cls, allowed):
            found.append(f"{where} ({cls.__module__}.{cls.__qualname__} is no FastTrakError)")
    return found


@pytest.mark.parametrize("relative", module_files())
def test_every_raise_is_a_fasttrak_error(relative):
    assert violations(relative) == []


def test_the_walk_sees_raises():
    """The walk finds the package's modules and their raise sites (a guard against a
    test that checks nothing)."""
    files = module_files()
    assert "fasttrak/checkpoints.py" in files and "fasttrak/tasks/text.py" in files
    sites = sum(len(raise_sites(ast.parse((ROOT / f).read_text()))) for f in files)
    assert sites > 100


SAMPLE = """
def caught():
    try:
        pass
    except OSError as err:
        raise err
    except KeyError as err2:
        raise ValueError("x") from err2
    raise DataError("fine")


def make_error() -> DataError:
    return DataError("fine")


def built():
    raise make_error()


def numpy_error():
    raise np.linalg.LinAlgError("no")


def not_caught(err):
    raise err


def allowed():
    raise Allowed("ok")
"""


def test_the_check_finds_builtin_errors_and_skips_re_raises():
    class Allowed(Exception):
        pass

    namespace: dict[str, object] = {"np": np, "DataError": errors.DataError, "Allowed": Allowed}
    exec(SAMPLE, namespace)
    found = check_source(SAMPLE, namespace, (Allowed,), "sample.py")
    assert [line.split(" (")[0] for line in found] == [
        "sample.py:8: raise ValueError",
        "sample.py:21: raise np.linalg.LinAlgError",
        "sample.py:25: raise err",
    ]
    assert "builtins.ValueError is no FastTrakError" in found[0]
    assert "cannot resolve" in found[2]
    assert check_source(SAMPLE, namespace, (), "sample.py")[-1].startswith("sample.py:29:")


def test_fasttrak_error_is_exported():
    assert ft.FastTrakError is errors.FastTrakError
    assert "FastTrakError" in ft.__all__


def error_classes() -> list[type]:
    return [
        obj
        for obj in vars(errors).values()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == errors.__name__
    ]


@pytest.mark.parametrize("cls", error_classes(), ids=lambda c: c.__name__)
def test_each_error_class_has_a_builtin_base(cls):
    assert issubclass(cls, errors.FastTrakError)
    if cls is errors.FastTrakError:
        assert cls.__bases__ == (Exception,)
        return
    builtin_bases = [
        base
        for base in cls.__mro__
        if base.__module__ == "builtins" and base not in (Exception, BaseException, object)
    ]
    assert builtin_bases, f"{cls.__name__} derives from no built-in exception but Exception"


def test_data_key_error_prints_its_message_unquoted():
    error = errors.DataKeyError("the batch has no 'labels'")
    assert isinstance(error, KeyError) and isinstance(error, ft.FastTrakError)
    assert str(error) == "the batch has no 'labels'"


def test_every_error_class_is_exported():
    import fasttrak as ft
    from fasttrak import errors

    for name, value in vars(errors).items():
        if isinstance(value, type) and issubclass(value, errors.FastTrakError):
            assert getattr(ft, name) is value, f"ft.{name} is not exported"
