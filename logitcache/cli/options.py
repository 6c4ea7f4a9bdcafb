"""Typer options derived from the library's own declarations, so a new option is one edit in the library.

``logitcache train``'s options come from ``TrainConfig``'s fields (their help and CLI hints live in field metadata);
``logitcache build``'s from ``BuildConfig``'s, and its encoding options from the encodings' ``Option``
declarations.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import TYPE_CHECKING, Any, Callable, Optional

from enum import Enum

import typer

if TYPE_CHECKING:
    from logitcache.encoding import Encoding


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def choices(name: str, values: Any) -> type[Enum]:
    """A str Enum of ``values``: how Typer offers a fixed set of choices (plain strings reach the library)."""
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


def plain(options: dict[str, Any]) -> dict[str, Any]:
    """Choice members back to their strings."""
    return {k: v.value if isinstance(v, Enum) else v for k, v in options.items()}


def _optional(tp: Any) -> Any:
    """``X | None`` as ``Optional[X]`` (what Typer understands), ``int | str`` (a number or a word such as ``auto``)
    as ``str``, other types unchanged."""
    args = typing.get_args(tp)
    if set(args) == {int, str}:
        return str
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return Optional[inner]
    return tp


def config_parameters(cls: type, required: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One keyword parameter per dataclass field, with its Typer option (help, choices, bounds, flag)."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        if not meta.get("cli", True):
            continue
        tp = _optional(hints[f.name])
        name, decls, default = f.name, [flag_of(f.name)], f.default
        if "flag" in meta:  # a boolean with one flag; "--quiet" style flags invert the field
            name, default = meta["flag"].lstrip("-").replace("-", "_"), False
            decls = [meta["flag"], *([meta["short"]] if "short" in meta else [])]
        kwargs: dict[str, Any] = {"help": meta.get("help")}
        if "choices" in meta:
            enum = choices(f.name.title().replace("_", ""), meta["choices"])
            tp, default = (Optional[enum], None) if default is None else (enum, enum(default))
        if "low" in meta:
            kwargs["min"] = meta["low"]
        option = typer.Option(... if f.name in required else default, *decls, **kwargs)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=tp))
    return params


def encoding_parameters(encodings: dict[str, type[Encoding]]) -> list[inspect.Parameter]:
    """The options of every registered encoding. Their CLI default is None (not given), so that an option of another
    encoding than the chosen one can be refused; the library fills in the encoding's own defaults."""
    params, seen = [], set()
    for enc in encodings.values():
        for key, opt in enc.options.items():
            if key in seen or not opt.cli:  # an option several encodings share (k): one flag
                continue
            seen.add(key)
            decls = [opt.flags] if opt.flags else [flag_of(key)]
            shown = f"{opt.default}" if not opt.flags else ("on" if opt.default else "off")
            kwargs: dict[str, Any] = {"help": f"{opt.help} (default: {shown})", "show_default": False}
            if opt.low is not None:
                kwargs["min"] = opt.low
            tp: Any = Optional[type(opt.default)]  # built at run time: Typer reads it, a type checker cannot
            params.append(
                inspect.Parameter(
                    key, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(None, *decls, **kwargs), annotation=tp
                )
            )
    return params


def with_parameters(fn: Callable[..., Any], params: list[inspect.Parameter]) -> Callable[..., Any]:
    """``fn(**options)`` presented to Typer as a function with exactly ``params``."""
    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn
