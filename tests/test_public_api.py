"""The package's public names: ``meterkit.__all__`` is sorted, complete and exact."""

from __future__ import annotations

import inspect
import types

import meterkit


def _public_definitions() -> set[str]:
    """Public attributes of the package that are classes or functions defined in meterkit."""
    names = set()
    for name, value in vars(meterkit).items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue  # private names and submodules (meterkit.asgi, …)
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            continue  # e.g. the `annotations` feature of `from __future__ import annotations`
        if getattr(value, "__module__", "").split(".")[0] == "meterkit":
            names.add(name)
    return names


def test_all_is_sorted_without_duplicates() -> None:
    """__all__ is in sorted order and names each export once."""
    assert list(meterkit.__all__) == sorted(meterkit.__all__)
    assert len(set(meterkit.__all__)) == len(meterkit.__all__)


def test_every_exported_name_exists() -> None:
    """Every name in __all__ is an attribute of the package."""
    missing = [name for name in meterkit.__all__ if not hasattr(meterkit, name)]
    assert missing == []


def test_every_public_definition_is_exported() -> None:
    """No public class or function the package exposes is left out of __all__."""
    assert _public_definitions() - set(meterkit.__all__) == set()


def test_star_import_gives_exactly_all() -> None:
    """`from meterkit import *` binds exactly the names of __all__."""
    namespace: dict[str, object] = {}
    exec("from meterkit import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(meterkit.__all__)


def test_exported_errors_share_one_root() -> None:
    """Every exported exception derives from MeterkitError."""
    errors = [
        getattr(meterkit, n)
        for n in meterkit.__all__
        if inspect.isclass(getattr(meterkit, n)) and issubclass(getattr(meterkit, n), BaseException)
    ]
    assert meterkit.InvalidRequestError in errors
    assert all(issubclass(e, meterkit.MeterkitError) for e in errors)


def test_version_is_a_string() -> None:
    """The package has a version string."""
    assert isinstance(meterkit.__version__, str)
    assert meterkit.__version__


def test_framework_adapters_have_public_aliases() -> None:
    """meterkit.fastapi, meterkit.flask and meterkit.django name the adapters that live in
    meterkit.http, as meterkit.asgi and meterkit.wsgi name the middlewares."""
    import meterkit.django
    import meterkit.fastapi
    import meterkit.flask
    import meterkit.http.django
    import meterkit.http.fastapi
    import meterkit.http.flask

    assert meterkit.fastapi.Metered is meterkit.http.fastapi.Metered
    assert meterkit.flask.Metered is meterkit.http.flask.Metered
    assert meterkit.django.MeterMiddleware is meterkit.http.django.MeterMiddleware
    assert meterkit.django.metered is meterkit.http.django.metered
    for module in (meterkit.fastapi, meterkit.flask, meterkit.django):
        assert all(hasattr(module, name) for name in module.__all__)
