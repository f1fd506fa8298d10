"""What ``mtl-lightning`` prints when a user's command fails: one message, in the syntax the user wrote.

The command (:func:`mtl_lightning.cli.main`) catches the errors a user can fix -- the library's
``ValueError`` / ``TypeError`` (a missing column, a null value, an unknown name, a bad value) and
jsonargparse's argument errors (an unknown flag, a value of the wrong type, a missing ``--config``
file) -- and prints :func:`user_message` of it instead of a traceback:

* :func:`unwrap` finds the error that says what is wrong under jsonargparse's wrappers
  (``Call to compute_fn of link '_features_of(data) --> ...' failed: ...``, ``Does not validate against
  any of the Union subtypes ...``);
* :func:`argument_message` turns a jsonargparse message (``Parser key "data.batch_size": Expected a
  <class 'int'>. Got value: abc``) into ``data.batch_size: expected an integer, got 'abc'``;
* :func:`yaml_hints` rewrites a hint written for Python (``ParquetDataModule(fill_missing={'price': 0.0})``)
  as the YAML key and the flag that do the same (``data.fill_missing: {price: 0.0}`` /
  ``--data.fill_missing='{price: 0.0}'``);
* :class:`ConfigSources` knows which ``--config`` file or flag set each key, so that an error about a
  value a config gave (a label column ``'purchase'`` no file has, a path that does not exist) names the
  key and the file it came from.
"""

from __future__ import annotations

import ast
import re
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_WRAPPERS = ("Call to compute_fn of link", "Does not validate against any of the", "Problem with given class_path",
             "Parser key ")
_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "NoneType": "null", "dict": "a mapping", "list": "a list"}


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what caused it (``raise ... from``), then what caused that, ..."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def unwrap(error: BaseException) -> BaseException:
    """The error that says what is wrong: the first in the chain that is not one of jsonargparse's wrappers.

    jsonargparse wraps the error of a link's function (``_features_of(data)``: every data error) and of a
    class's constructor (an architecture refusing ``num_experts=-1``) in messages of its own, and an
    argument error in several ``ArgumentError`` / ``TypeError`` layers; the cause is the error to show.
    """
    chain = list(error_chain(error))
    for candidate in chain:
        if not str(candidate).startswith(_WRAPPERS) and not isinstance(candidate, ArgumentError):
            return candidate
    return chain[-1]


def _type_name(text: str) -> str:
    match = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>", text.strip())
    return _TYPE_NAMES.get(match.group(1), match.group(1)) if match else text.strip()


def argument_message(text: str) -> str:
    """A jsonargparse argument error in a line: ``key: expected an integer, got 'abc'``.

    A message jsonargparse did not write (or one this does not recognise) comes back unchanged but for
    its lines joined into one.
    """
    key_match = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.S)
    key, body = (key_match.group(1), key_match.group(2)) if key_match else (None, text)
    given = re.search(r"Given value: (.*)", body)
    expected = re.findall(r"Expected an? (<class '[\w.]+'>|[^.\n]+)", body)
    reason = None
    if re.search(r"File does not exist: (.*)", body):
        reason = "no such file: " + re.search(r"File does not exist: (.*)", body).group(1).strip()
    elif expected:
        value = given.group(1).strip() if given else (re.search(r"Got value: (.*)", body) or [None, None])[1]
        wanted = " or ".join(dict.fromkeys(_type_name(e) for e in expected))
        reason = f"expected {wanted}" + (f", got {value.strip()!r}" if value else "")
    elif re.match(r"unrecognized arguments: ", body, re.I):
        names = body.split(":", 1)[1].strip()
        reason = f"unknown option(s) {names}"
    if reason is None:
        reason = " ".join(line.strip() for line in body.splitlines() if line.strip())
    return f"{key}: {reason}" if key else reason


def _yaml_flow(value: Any) -> str:
    """``value`` as one line of YAML (``{price: 0.0}``, ``[user_id]``, ``true``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _call_end(text: str, start: int) -> int | None:
    """The index just past the parenthesis closing the one at ``start`` (brackets and quotes respected)."""
    depth, quote = 0, None
    for i in range(start, len(text)):
        char = text[i]
        if quote:
            if char == quote and text[i - 1] != "\\":
                quote = None
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def yaml_hints(message: str, section: str = "data") -> str:
    """Rewrites ``SomeDataModule(key=<python value>, ...)`` in ``message`` as YAML keys and flags.

    ``ParquetDataModule(categorical={'user_id': {}})`` becomes ``data.categorical: {user_id: {}}`` in a
    config file (``--data.categorical='{user_id: {}}'``). A call whose arguments are not plain values is
    left as it is.
    """
    out, position = [], 0
    for match in re.finditer(r"\b[A-Z]\w*DataModule\(", message):
        if match.start() < position:
            continue
        end = _call_end(message, match.end() - 1)
        if end is None:
            continue
        try:
            call = ast.parse(message[match.start():end], mode="eval").body
            assert isinstance(call, ast.Call) and not call.args and call.keywords
            options = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        except (SyntaxError, ValueError, AssertionError, TypeError):
            continue
        keys = ", ".join(f"{section}.{name}: {_yaml_flow(value)}" for name, value in options.items())
        flags = " ".join(f"--{section}.{name}={_shell_value(_yaml_flow(value))}" for name, value in options.items())
        out += [message[position:match.start()], f"{keys} (in YAML; {flags} on the command line)"]
        position = end
    return "".join(out) + message[position:]


def _shell_value(text: str) -> str:
    return text if re.fullmatch(r"[\w.,:/@+-]+", text) else f"'{text}'"


class ConfigSources:
    """Which ``--config`` file or command-line flag gave each key, read from the command's arguments.

    ``ConfigSources(["fit", "--config", "a.yaml", "--data.train=x"]).source("data.train")`` is
    ``"--data.train=x on the command line"``; a key a later file sets again is the later file's. Keys
    are dotted (``data.tasks``, ``model.model.init_args.domain_feature``), under the subcommand's
    section if a file has one (``fit: {data: ...}``).
    """

    def __init__(self, args: Sequence[str]) -> None:
        self.values: dict[str, tuple[Any, str]] = {}
        args = list(args)
        i = 0
        while i < len(args):
            arg = args[i]
            key, sep, value = arg.partition("=")
            if not sep and i + 1 < len(args) and key.startswith("--") and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            if key in ("--config", "-c"):
                self._read_file(value)
            elif key.startswith("--") and len(key) > 2:
                try:
                    parsed = yaml.safe_load(value) if value else value
                except yaml.YAMLError:
                    parsed = value
                self._add(key[2:], parsed, f"{key}={value} on the command line")
            i += 1

    def _read_file(self, path: str) -> None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            return  # the parser reports it
        if not isinstance(loaded, dict):
            return
        for subcommand in _SUBCOMMANDS:  # a saved config.yaml of a run has its keys under the subcommand or not
            if isinstance(loaded.get(subcommand), dict):
                inner = loaded.pop(subcommand)
                loaded = {**loaded, **inner}
        self._add("", loaded, path)

    def _add(self, key: str, value: Any, source: str) -> None:
        if isinstance(value, dict) and value:
            for name, inner in value.items():
                self._add(f"{key}.{name}" if key else str(name), inner, source)
            return
        # a key set again replaces what an earlier source gave under it (a later file's whole data.tasks)
        for known in [k for k in self.values if k == key or k.startswith(key + ".")]:
            del self.values[known]
        self.values[key] = (value, source)

    def source(self, key: str) -> str | None:
        """Where ``key`` (or the closest key above it) was set, or ``None`` if no file or flag set it."""
        while key:
            if key in self.values:
                return self.values[key][1]
            key = key.rpartition(".")[0]
        return None

    def keys_mentioned(self, message: str) -> list[tuple[str, str]]:
        """``(key, source)`` of every value a config gave that ``message`` names.

        A name counts when the message quotes it (``'purchase'``: a task's label column, an excluded
        column, a domain feature); a path or URI when it appears anywhere in the message.
        """
        message = re.sub(r"\(columns: \[[^\]]*\]\)", "", message)  # a file's columns are not what it is about
        found = []
        for key, (value, source) in self.values.items():
            if key.startswith(("trainer.", "seed_everything")):
                continue
            last = key.rpartition(".")[2]
            said = re.search(rf"(^|[\s(]){re.escape(last)}(=|:| must | should )", message) is not None
            named_key = key.startswith("data.") and key.count(".") > 1 and _named(message, last)  # a mapping's key
            if said or named_key or any(_named(message, leaf) for leaf in _leaves(value)):
                found.append((key, source))
        return found


def _leaves(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, str) and value:
        yield value


def _named(message: str, value: str) -> bool:
    if f"'{value}'" in message or f'"{value}"' in message:
        return True
    value = value.rstrip("/")  # a folder: the message may name a file in it
    return ("/" in value or "." in value) and len(value) > 3 and re.search(
        rf"(^|[\s'\"(]){re.escape(value)}($|[\s'\":,)/])", message) is not None


def user_message(error: BaseException, sources: ConfigSources | None = None) -> str:
    """The text ``mtl-lightning: error: ...`` shows for ``error`` (see the module docstring)."""
    cause = unwrap(error)
    text = str(cause).strip() or type(cause).__name__
    if isinstance(cause, ArgumentError) or text.startswith("Parser key ") or any(
            isinstance(e, ArgumentError) for e in error_chain(error)):
        outer = next((str(e) for e in error_chain(error) if str(e).startswith("Parser key ")), None)
        text = argument_message(outer if outer is not None else text)
    text = yaml_hints(text)
    if sources is not None:
        named = sources.keys_mentioned(text)
        key_match = re.match(r"([\w.]+): ", text)
        if key_match and sources.source(key_match.group(1)) and not named:
            named = [(key_match.group(1), sources.source(key_match.group(1)))]
        by_file: dict[str, list[str]] = {}
        lines = []
        for key, source in named:
            if key.startswith("data.") and key.count(".") > 1:
                key = ".".join(key.split(".")[:2])  # data.implied_labels.purchase -> data.implied_labels
            if "command line" in source:
                if not text.startswith(f"{key}: "):
                    lines.append(f"  ({key}: set by {source})")
            elif key not in by_file.setdefault(source, []):
                by_file[source].append(key)
        lines = [f"  ({', '.join(keys)}: set in {source})" for source, keys in by_file.items()] + lines
        if lines:
            text += "\n" + "\n".join(lines)
    return text
