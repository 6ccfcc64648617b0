"""Importing what the operator names on the command line (``module`` or ``module:attribute``).

The only imports tidings drives by input, and that input is the operator's command line, never
message data. The current directory is searched after installed packages, so nothing installed
is shadowed by a file lying around.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from types import ModuleType

import click

from tidings._untrusted import RedactingFilter

__all__ = ["configure_logging", "import_module", "load_attribute"]


def configure_logging(loglevel: str, *urls: str | None) -> None:
    """Log to stderr at ``loglevel``, every line and traceback with the URLs' secrets redacted.

    For the long-running commands (``tidings relay``, ``tidings worker``): a driver's error or
    traceback that echoes a database or broker URL, or its password, prints ``***`` instead.
    """
    logging.basicConfig(
        level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    redacting = RedactingFilter()
    redacting.urls.update(url for url in urls if url)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redacting)


def import_module(name: str, option: str) -> ModuleType:
    """Import module ``name`` for ``option``; a click error that says why if it fails."""
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        msg = f"cannot import {name!r} for {option} ({exc}): is it on PYTHONPATH?"
        raise click.ClickException(msg) from exc
    except Exception as exc:  # the module may raise anything
        msg = f"importing {name} for {option} failed: {type(exc).__name__}: {exc}"
        raise click.ClickException(msg) from exc


def load_attribute(spec: str, option: str, example: str) -> object:
    """Return the object ``module:attribute`` names (dotted attributes allowed).

    Raises:
        click.UsageError: ``spec`` is not of the form ``module:attribute``.
        click.ClickException: the module cannot be imported or lacks the attribute.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        msg = f"{option} takes module:attribute, e.g. {example}, not {spec!r}"
        raise click.UsageError(msg)
    target: object = import_module(module_name, option)
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            msg = f"{option} {spec}: {type(exc).__name__}: {exc}"
            raise click.ClickException(msg) from exc
    return target
