"""Command-line flags made from the settings types, so they are declared once.

Every settings class names the fields that have a flag (``flag_names``); the
flag's help is the field's description (its docstring) with the variable it
is also read from and its default. ``taskloom supervisor``, ``taskloom
worker`` and the client commands all get their flags here, and the CLI and
configuration references in the docs are made from the same data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from taskloom.core.settings import TaskloomSettings

F = TypeVar("F", bound=Callable[..., Any])


def summary(description: str | None) -> str:
    """The first sentence of a field's description, for a help line."""
    text = " ".join((description or "").split())
    for end in (". ", "; "):
        if end in text:
            text = text.split(end, 1)[0]
    return text.rstrip(".").replace("``", "")


def default_of(info: FieldInfo) -> str:
    """A field's default as a person reads it ('' when it has none to show)."""
    if info.default_factory is not None:
        return ""
    value = info.default
    if value is PydanticUndefined or value is None or value == "":
        return ""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()
        )
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def is_flag(info: FieldInfo) -> bool:
    """Whether the field is a switch (``--insecure``) rather than a value."""
    return info.annotation is bool


def settings_options(
    settings: type[TaskloomSettings],
    fields: Iterable[str] | None = None,
    *,
    callback: Callable[[click.Context, click.Parameter, Any], Any] | None = None,
) -> Callable[[F], F]:
    """A decorator adding a click option for each of ``fields`` (default: every
    field with a flag). Values stay strings (the settings validate them) and
    an option not given is None, so the environment applies. With
    ``callback``, values go to it instead of the command's arguments."""
    names = list(settings.flag_names) if fields is None else list(fields)

    def decorate(fn: F) -> F:
        for name in reversed(names):
            info = settings.model_fields[name]
            hint = settings.env_name(name)
            default = default_of(info)
            if default:
                hint += f", {default}"
            help_text = f"{summary(info.description)} [{hint}]"
            flag = settings.flag_names[name]
            extra: dict[str, Any] = {}
            if callback is not None:
                extra = {"expose_value": False, "callback": callback}
            if is_flag(info):
                fn = click.option(flag, name, is_flag=True, default=None, help=help_text, **extra)(
                    fn
                )
            else:
                fn = click.option(flag, name, metavar=_metavar(name), help=help_text, **extra)(fn)
        return fn

    return decorate


def _metavar(name: str) -> str:
    if name.endswith(("_port", "concurrency")):
        return "N"
    if name in ("listen", "supervisor"):
        return "HOST:PORT"
    if name.startswith("tls_") or name.endswith("_file"):
        return "PATH"
    if name.endswith(("_ttl", "_timeout", "_interval")):
        return "DURATION"
    return name.split("_")[-1].upper()
