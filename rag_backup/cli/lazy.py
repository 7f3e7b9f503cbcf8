"""A click group whose commands are built when used: ``list`` and ``show`` need only the
repository code and start at once; commands that need Dagster's config classes or an engine
import them when they run (or when help lists them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import click


class LazyGroup(click.Group):
    """A group of ``name -> factory`` (a callable returning the command)."""

    def __init__(self, *args, factories: Mapping[str, Callable[[], click.Command]],
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.factories = dict(factories)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *self.factories]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.factories:
            return self.factories[cmd_name]()
        return super().get_command(ctx, cmd_name)


def attribute(module: str, name: str) -> Callable[[], click.Command]:
    """A factory for ``module.name``, imported when called."""
    def load() -> click.Command:
        from importlib import import_module

        return getattr(import_module(module), name)
    return load


def built(module: str, name: str) -> Callable[[], click.Command]:
    """A factory calling ``module.name()`` (a command made from a config class), imported
    when called."""
    def build() -> click.Command:
        return attribute(module, name)()()  # type: ignore[operator]
    return build
