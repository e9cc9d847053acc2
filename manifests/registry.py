"""The manifest sources of ``flame manifest``, each registered where it is defined (like timm's
``register_model``).

A source module registers its name, the description of its inputs and a builder taking the parsed command
line; its own flags, if any, are registered as an option group. :mod:`manifests.cli` imports the source
modules and builds the parser and the dispatch from this registry, so adding a source touches its module and
the import list there, nothing else::

    @register_source("mysource", inputs="MySource files", rank=60)
    def _build_from_args(args: argparse.Namespace) -> ManifestInfo:
        return build_my_manifest(args.inputs, args.out, flavour=args.flavour, **common_options(args))

    @register_options("mysource", rank=60)
    def _add_options(group: argparse._ArgumentGroup) -> None:
        group.add_argument("--flavour", default="plain", help="...")

``rank`` orders ``flame manifest --help``: the sources (the ``SOURCE`` choices and the inputs table) by the
rank of their :func:`register_source`, the option groups by the lowest rank registered under their title
(several modules may add flags to one group; each adds its flags in rank order).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from manifests.schema import ManifestError, ManifestInfo

Builder = Callable[[argparse.Namespace], ManifestInfo]
InputCheck = Callable[[str, list[str]], None]
OptionAdder = Callable[[Any], None]  # called with an argparse argument group


def some_inputs(name: str, inputs: list[str]) -> None:
    """The default input check: at least one input. Raises :class:`ManifestError` otherwise."""
    if not inputs:
        raise ManifestError(f"source {name!r} needs at least one input")


def no_inputs(name: str, inputs: list[str]) -> None:
    """Input check of a source that reads no inputs. Raises :class:`ManifestError` if there are some."""
    if inputs:
        raise ManifestError(f"source {name!r} takes no inputs, got {inputs}")


@dataclass(frozen=True)
class ManifestSource:
    """One registered source.

    Attributes:
        name: the ``SOURCE`` argument, e.g. ``"webdataset"``.
        inputs: what the ``INPUTS`` are, one line of the ``--help`` table.
        build: builds the manifest from the parsed ``flame manifest`` arguments; returns its info.
        check_inputs: ``(name, inputs) -> None``, raises :class:`ManifestError` for a wrong number of inputs.
        rank: position in ``--help`` (lower first).
    """

    name: str
    inputs: str
    build: Builder
    check_inputs: InputCheck
    rank: int


@dataclass(frozen=True)
class _Options:
    title: str
    add: OptionAdder
    rank: int


_SOURCES: dict[str, ManifestSource] = {}
_OPTIONS: list[_Options] = []


def register_source(name: str, *, inputs: str, rank: int, check_inputs: InputCheck = some_inputs
                    ) -> Callable[[Builder], Builder]:
    """Decorator: register the decorated ``(args) -> ManifestInfo`` as the builder of source ``name``.

    Args:
        name: the ``SOURCE`` argument.
        inputs: the description of its inputs in ``flame manifest --help``.
        rank: position among the sources in ``--help`` (lower first).
        check_inputs: the input count check (:func:`some_inputs`, :func:`no_inputs`, or the source's own).

    Returns:
        the decorator, which returns the function unchanged.

    Raises:
        ValueError: ``name`` is registered already by another function (a module imported again, e.g.
            reloaded, replaces its own registration).
    """

    def register(build: Builder) -> Builder:
        if name in _SOURCES and _origin(_SOURCES[name].build) != _origin(build):
            raise ValueError(f"manifest source {name!r} is registered twice")
        _SOURCES[name] = ManifestSource(name, inputs, build, check_inputs, rank)
        return build

    return register


def register_options(title: str, *, rank: int) -> Callable[[OptionAdder], OptionAdder]:
    """Decorator: the decorated ``(group) -> None`` adds flags to the ``flame manifest`` group ``title``.

    Returns the function unchanged. ``rank`` orders the groups and, within a group, the adders (module
    docstring).
    """

    def register(add: OptionAdder) -> OptionAdder:
        _OPTIONS[:] = [o for o in _OPTIONS if _origin(o.add) != _origin(add)]  # a module imported again
        _OPTIONS.append(_Options(title, add, rank))
        return add

    return register


def _origin(fn: Callable[..., Any]) -> tuple[str, str]:
    return fn.__module__, fn.__qualname__


def sources() -> list[ManifestSource]:
    """The registered sources, in ``--help`` order."""
    return sorted(_SOURCES.values(), key=lambda s: s.rank)


def source(name: str) -> ManifestSource:
    """The source registered as ``name``. Raises :class:`ManifestError` for an unknown name."""
    try:
        return _SOURCES[name]
    except KeyError:
        known = [s.name for s in sources()]
        raise ManifestError(f"unknown manifest source {name!r}; known: {known}") from None


def option_groups() -> list[tuple[str, list[OptionAdder]]]:
    """``(title, adders)`` of every option group, groups and adders in ``--help`` order."""
    ordered = sorted(_OPTIONS, key=lambda o: o.rank)
    groups: dict[str, list[OptionAdder]] = {}
    for option in ordered:
        groups.setdefault(option.title, []).append(option.add)
    return list(groups.items())


def common_options(args: argparse.Namespace) -> dict[str, Any]:
    """The builder arguments every reading source takes: ``split``, ``on_duplicate``, ``limit``."""
    return {"split": args.split, "on_duplicate": args.on_duplicate, "limit": args.limit}
