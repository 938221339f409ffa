"""The machinery behind exporter/config.py's flag table: parsers, a flag's declaration, argv and env.

`flag(...)` declares one `Config` field: names, help, section, default (as a user would type it),
choices and the parser that turns text into the field's typed value. A parser raises ConfigError
naming the flag. `add_flags` puts the table into argparse; `given_values` reads what the command
line and the environment set, flags winning over the environment.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from exporter.devices import DeviceSelector, DeviceSelectorError, parse_device_selector

ENV_PREFIX = "GPU_HEALTH_EXPORTER_"


class ConfigError(Exception):
    """A bad flag or environment value; the message names which one."""


class ListenAddress(NamedTuple):
    """`-a/--address`: host ('' for every interface) and port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class Where(NamedTuple):
    """Where a value came from, for error messages."""

    flag: str  # the long flag name: messages about what the value means name it
    origin: str  # the flag, or "environment variable X": messages about how the text reads name it


# A parser turns a flag's text into its typed value or raises ConfigError naming the flag.
Parser = Callable[[str, Where], Any]


# --- parsers ---------------------------------------------------------------------------------


def text(raw: str, at: Where) -> str:
    return raw


def filesystem_path(raw: str, at: Where) -> Path:
    if not raw.strip():  # Path("") is ".": an empty --state-dir would put the state in the working dir
        raise ConfigError(f"{at.origin}: must not be empty")
    return Path(raw)


def _whole_number(raw: str, at: Where) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{at.origin}: {raw!r} is not a whole number") from None


def _within(value: int, minimum: int, maximum: int | None, at: Where) -> int:
    if value < minimum:
        raise ConfigError(f"{at.flag}: must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{at.flag}: must be at most {maximum}, got {value}")
    return value


def integer(minimum: int, maximum: int | None = None) -> Parser:
    """A whole number >= minimum (and <= maximum)."""

    def parse(raw: str, at: Where) -> int:
        return _within(_whole_number(raw, at), minimum, maximum, at)

    return parse


def millis_as_seconds(minimum_ms: int, maximum_ms: int) -> Parser:
    """Whole milliseconds on the command line (like dcgm-exporter), float seconds in Config.

    Bounded above as well: a value no timer can hold (-c 10000000000000) must be refused at start-up,
    not kill the thread that sleeps on it while /health stays green."""

    def parse(raw: str, at: Where) -> float:
        return _within(_whole_number(raw, at), minimum_ms, maximum_ms, at) / 1000

    return parse


def seconds(minimum: int, maximum: int) -> Parser:
    """Whole seconds on the command line, float seconds in Config."""

    def parse(raw: str, at: Where) -> float:
        return float(_within(_whole_number(raw, at), minimum, maximum, at))

    return parse


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def boolean(raw: str, at: Where) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"{at.origin}: {raw!r} is not a boolean (true/false)")


def one_of(choices: tuple[str, ...]) -> Parser:
    def parse(raw: str, at: Where) -> str:
        if raw not in choices:
            raise ConfigError(f"{at.origin}: {raw!r} is not one of {', '.join(choices)}")
        return raw

    return parse


def parse_address(address: str) -> ListenAddress:
    """':9400' -> ('', 9400); '127.0.0.1:9400'; '[::1]:9400'."""
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]*):(\d{1,5})", address)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ConfigError(f"--address {address!r}: expected [host]:port, e.g. :9400 or 127.0.0.1:9400")
    return ListenAddress(m.group(1).strip("[]"), int(m.group(2)))


def listen_address(raw: str, at: Where) -> ListenAddress:
    return parse_address(raw)


def device_selector(raw: str, at: Where) -> DeviceSelector:
    try:
        return parse_device_selector(raw)
    except DeviceSelectorError as exc:
        raise ConfigError(f"{at.flag} {raw!r}: {exc}") from None


def xid_list(raw: str, at: Where) -> tuple[int, ...]:
    """Comma list of XID numbers; the range is checked by the health policy."""
    out: list[int] = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ConfigError(f"{at.flag}: {part!r} is not an XID number") from None
    return tuple(out)


def name_list(raw: str, at: Where) -> tuple[str, ...]:
    """Comma list of names, blanks dropped."""
    return tuple(n.strip() for n in raw.split(",") if n.strip())


def regex(raw: str, at: Where) -> str:
    try:
        re.compile(raw)
    except re.error as exc:
        raise ConfigError(f"{at.flag}: invalid regex: {exc}") from None
    return raw


# --- a flag's declaration ------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """One flag's metadata; `Config`'s fields carry one each (see `flag`)."""

    dest: str  # the Config field
    names: tuple[str, ...]
    default: str | None  # as typed on the command line; None: unset
    parse: Parser
    help: str
    section: str
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    switch: bool = False  # a boolean: `--flag` on the command line, true/false in the environment
    const: str | None = None  # the value of the bare flag when its value is optional (`--simulate`)

    @property
    def long_name(self) -> str:
        return next(n for n in self.names if n.startswith("--"))

    @property
    def short_name(self) -> str | None:
        return next((n for n in self.names if not n.startswith("--")), None)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.long_name[2:].upper().replace("-", "_")

    def value(self, raw: str | None, origin: str | None = None) -> Any:
        """The typed value of `raw` (None stays None); ConfigError names the flag."""
        if raw is None:
            return None
        return self.parse(raw, Where(self.long_name, origin or self.long_name))


def flag(
    *names: str,
    default: str | None,
    help: str,
    section: str,
    parse: Parser = text,
    choices: tuple[str, ...] = (),
    metavar: str | None = None,
    switch: bool = False,
    const: str | None = None,
) -> Any:
    """A Config field whose default is `default` parsed like a user's value."""
    if choices:
        parse = one_of(choices)
    if switch:
        parse = boolean
    spec = Flag("", names, default, parse, help, section, choices, metavar, switch, const)
    return field(default=spec.value(default), metadata={"flag": spec})


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 itself; we want one error path
        raise ConfigError(message)


def add_flags(parser: argparse.ArgumentParser, table: Sequence[Flag]) -> None:
    """One argument per flag, in an argument group per section; None where it was not given."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in table:
        group = groups.setdefault(spec.section, parser.add_argument_group(spec.section))
        help_text = f"{spec.help} [env {spec.env}]"
        if spec.switch:
            group.add_argument(*spec.names, dest=spec.dest, action="store_true", default=None, help=help_text)
        elif spec.const is not None:
            group.add_argument(
                *spec.names,
                dest=spec.dest,
                nargs="?",
                const=spec.const,
                default=None,
                metavar=spec.metavar,
                help=help_text,
            )
        else:
            group.add_argument(
                *spec.names,
                dest=spec.dest,
                default=None,
                metavar=spec.metavar or spec.dest.upper(),
                help=help_text,
                choices=spec.choices or None,
            )


def given_values(table: Sequence[Flag], ns: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    """The typed value of every flag set on the command line or, failing that, in the environment."""
    values: dict[str, Any] = {}
    for spec in table:
        given = getattr(ns, spec.dest)
        if given is not None:
            values[spec.dest] = True if spec.switch else spec.value(given)
        elif spec.env in env:
            values[spec.dest] = spec.value(env[spec.env], f"environment variable {spec.env}")
    return values
