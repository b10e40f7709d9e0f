"""Check a composed config against the signatures of its ``_target_`` classes before any work.

Hydra already rejects override keys that are not in the config and reports missing mandatory
values lazily; this module catches the rest at the entry point, in seconds: a key that the target
does not accept (a typo such as ``model.net.channels_mult``), a missing required argument, and a
value whose type contradicts a simple annotation (``trainer.max_steps=abc``). Every error names
the full config key, the value and what is allowed.

Only annotations built from ``int``, ``float`` (an int is accepted), ``bool``, ``str``, ``None``,
``Literal``, unions, ``list``/``tuple``/``Sequence``/``dict``, enums and paths are checked; any
other class accepts any value, since the config cannot say what a nested ``_target_`` returns.
"""

from __future__ import annotations

import collections.abc
import enum
import inspect
import os
import types
import typing
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from genlab.utils.instantiate import locate

SEQUENCE_ORIGINS = (
    list,
    tuple,
    collections.abc.Sequence,
    collections.abc.MutableSequence,
    collections.abc.Iterable,
    collections.abc.Collection,
)
MAPPING_ORIGINS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)
UNION_TYPES = (typing.Union, types.UnionType)


class ConfigError(ValueError):
    """A user's config is wrong; the message names every offending key."""


def validate_config(cfg: DictConfig, top_level: Mapping[str, Any] | None = None) -> None:
    """Resolve ``cfg`` and check every ``_target_`` node and the typed top-level keys.

    Args:
        cfg: the composed task config (inside a Hydra app, so ``${hydra:...}`` resolves).
        top_level: expected type hint per top-level key, e.g. ``{"seed": int | None}``.

    Raises:
        ConfigError: listing every problem found, one per line.
    """
    container = resolved_container(cfg)
    errors = []
    for key, hint in (top_level or {}).items():
        if key in container:
            errors += check_value(key, container[key], hint)
    errors += check_targets(container, prefix="")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def resolved_container(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain Python values, with missing or broken values reported by key."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(
            f"{err.full_key} is mandatory and has no value (???): pass {err.full_key}=..."
        ) from None
    except InterpolationResolutionError as err:
        raise ConfigError(f"{err.full_key}: cannot resolve interpolation: {err.msg}") from None


def check_targets(node: Any, prefix: str) -> list[str]:
    """Check every ``_target_`` mapping inside ``node`` (a plain container); return the errors."""
    errors = []
    if isinstance(node, Mapping):
        if "_target_" in node:
            errors += check_target_node(node, prefix)
        for key, value in node.items():
            if not str(key).startswith("_"):
                errors += check_targets(value, join(prefix, key))
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            errors += check_targets(value, join(prefix, i))
    return errors


def check_target_node(node: Mapping[str, Any], path: str) -> list[str]:
    """Check one ``_target_`` node's keys, required arguments and value types."""
    target_name = node["_target_"]
    try:
        target = locate(target_name)
    except (ImportError, ValueError, AttributeError) as err:
        return [f"{join(path, '_target_')}={target_name!r} cannot be imported: {err}"]
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return []
    keys = {k: v for k, v in node.items() if not str(k).startswith("_")}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    errors = []
    if not takes_kwargs:
        allowed = ", ".join(named) or "none"
        errors += [
            f"{join(path, k)}: unknown key for {target_name}; allowed keys: {allowed}"
            for k in keys
            if k not in named
        ]
    if not node.get("_partial_", False) and "_args_" not in node:
        errors += [
            f"{join(path, n)}: missing required argument of {target_name}"
            for n, p in named.items()
            if p.default is p.empty and p.kind is not p.POSITIONAL_ONLY and n not in keys
        ]
    hints = annotations_of(target, named)
    for key, value in keys.items():
        if key in hints and not is_default(value, named[key]):
            errors += check_value(join(path, key), value, hints[key], owner=target_name)
    return errors


def is_default(value: Any, param: inspect.Parameter) -> bool:
    """Whether the config restates the parameter's own default (always acceptable)."""
    return param.default is not param.empty and (
        value is param.default or (type(value) is type(param.default) and value == param.default)
    )


def annotations_of(target: Any, params: Mapping[str, inspect.Parameter]) -> dict[str, Any]:
    """Evaluated annotations of ``params``; string annotations that do not evaluate are dropped."""
    func = target.__init__ if inspect.isclass(target) else target
    namespace = getattr(inspect.unwrap(func), "__globals__", {})
    hints = {}
    for name, param in params.items():
        hint = param.annotation
        if hint is param.empty:
            continue
        if isinstance(hint, str):
            try:
                hint = eval(hint, namespace)  # the target's own annotation text
            except Exception:
                continue
        hints[name] = hint
    return hints


def check_value(path: str, value: Any, hint: Any, owner: str | None = None) -> list[str]:
    """Return an error naming ``path`` if ``value`` contradicts the type ``hint``, else nothing."""
    if matches(value, hint):
        return []
    where = f" ({owner} parameter {path.rsplit('.', 1)[-1]})" if owner else ""
    return [f"{path}={value!r}: expected {describe(hint)}{where}"]


def matches(value: Any, hint: Any) -> bool:
    """Whether a plain config value can stand for an argument annotated ``hint``."""
    if hint is Any or isinstance(hint, typing.TypeVar | typing.ForwardRef | str):
        return True
    if isinstance(value, Mapping) and "_target_" in value:
        return True  # what a nested target returns is checked by nobody; its own keys are
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in UNION_TYPES:
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is typing.Annotated:
        return matches(value, args[0])
    if origin in SEQUENCE_ORIGINS:
        return matches_sequence(value, origin, args)
    if origin in MAPPING_ORIGINS:
        return isinstance(value, Mapping) and all(
            matches(v, args[1]) for v in value.values() if len(args) == 2
        )
    if origin is not None:  # Callable[...], type[...]: only a nested target or None can be one
        return value is None or isinstance(value, Mapping)
    return matches_class(value, hint)


def matches_sequence(value: Any, origin: Any, args: tuple) -> bool:
    """Check a list value against ``list[X]``, ``tuple[X, Y]``, ``tuple[X, ...]``, ``Sequence``."""
    if not isinstance(value, list | tuple):
        return False
    if origin is tuple and args and args[-1] is not Ellipsis:
        return len(value) == len(args) and all(map(matches, value, args))
    return not args or all(matches(v, args[0]) for v in value)


def matches_class(value: Any, hint: Any) -> bool:
    """Check a value against a plain class annotation (``int``, ``Path``, an enum, ...)."""
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if not inspect.isclass(hint):
        return True
    if issubclass(hint, enum.Enum):
        return value in {m.name for m in hint} or value in {m.value for m in hint}
    if issubclass(hint, PurePath | os.PathLike):
        return isinstance(value, str)
    if value is None or isinstance(value, str | int | float | bool):
        return isinstance(value, hint)
    return True


def describe(hint: Any) -> str:
    """A short readable name for a type hint: ``int | None``, ``one of ['ddim', 'ddpm']``."""
    members = typing.get_args(hint) if typing.get_origin(hint) in UNION_TYPES else (hint,)
    literals = [a for m in members if typing.get_origin(m) is typing.Literal for a in m.__args__]
    names = [name_of(m) for m in members if typing.get_origin(m) is not typing.Literal]
    return " or ".join(([f"one of {literals}"] if literals else []) + names)


def name_of(hint: Any) -> str:
    """The name of a non-union type hint: ``int``, ``None``, ``list[int]``."""
    if hint is type(None) or hint is None:
        return "None"
    if typing.get_origin(hint) is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def join(prefix: str, key: Any) -> str:
    """The dotted config path of ``key`` under ``prefix`` (list items as ``name[0]``)."""
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)
