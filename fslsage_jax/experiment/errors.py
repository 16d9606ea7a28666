"""The one error of the experiment: a setting or input that cannot be used.

Its message names settings by their :class:`~fslsage_jax.experiment.ExperimentConfig` field
names; a front end renders them its own way (the CLI: as flags, ``batch_size`` -> ``--batch-size``)::

    e = ConfigError("{batch_size} {}: must be a positive integer", 0)
    str(e)                                    # 'batch_size 0: must be a positive integer'
    e.field                                   # 'batch_size'
    e.render(lambda f: "--" + f.replace("_", "-"))   # '--batch-size 0: must be a positive integer'
"""
from __future__ import annotations

import string
from collections.abc import Callable

_FORMAT = string.Formatter()


class _Names(dict):
    """``{field}`` in a template -> ``name(field)``."""

    def __init__(self, name: Callable[[str], str]):
        super().__init__()
        self.name = name

    def __missing__(self, key: str) -> str:
        return self.name(key)


class ConfigError(ValueError):
    """A setting or input that cannot be used; one line naming the setting at fault.

    Args:
      template: the message; ``{name}`` stands for the setting ``name`` (a field of
        ``ExperimentConfig``), ``{}`` for the next of ``values`` (inserted as they are).
      values: the values the template shows.
      field: the setting at fault (default: the first one the template names).
    """

    def __init__(self, template: str, *values, field: str | None = None):
        self.template, self.values = template, values
        if field is None:
            field = next((f for _, f, _, _ in _FORMAT.parse(template) if f), None)
        self.field = field
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] = str) -> str:
        """The message with every setting named ``name(field)`` (default: the field name)."""
        return _FORMAT.vformat(self.template, self.values, _Names(name))

    def __reduce__(self):
        return _rebuild, (self.template, self.values, self.field)


def _rebuild(template, values, field):
    return ConfigError(template, *values, field=field)


def refusal(field: str, value, why: str, *values) -> ConfigError:
    """``ConfigError`` "<field> <value>: <why>"; ``why`` is a template (see :class:`ConfigError`)."""
    return ConfigError("{" + field + "} {}: " + why, value, *values, field=field)
