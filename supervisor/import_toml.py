"""Writing fleet.toml for ``neuron-fleet import``: tomli-w writes every key and value (quoting,
escapes, arrays), this adds what tomli-w has no notion of: the comments that say where each
value came from."""

from __future__ import annotations

import tomllib
from typing import Any

import tomli_w

COMMENT_COLUMN = 32
MAX_LINE = 100


def toml_value(value: Any) -> str:
    """``value`` as TOML writes it on the right of ``=``, on one line. tomli-w writes a
    top-level array one item a line (tomli-w 1.2, _writer.py ``format_literal``); an array
    is joined here from its items as tomli-w writes them."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return tomli_w.dumps({"k": value}).rstrip("\n")[len("k = ") :]


def toml_string(value: str) -> str:
    """A TOML basic string."""
    return toml_value(str(value))


class TomlWriter:
    """A TOML document written top to bottom: header comments, tables, keys with comments."""

    def __init__(self, header: list[str]) -> None:
        self._lines = [f"# {line}" if line else "#" for line in header]

    def table(self, name: str) -> None:
        self._lines += ["", f"[{name}]"]

    def key(self, key: str, value: Any, comment: str = "") -> None:
        name = tomli_w.dumps({key: 0}).rstrip("\n")[: -len(" = 0")]
        text = f"{name} = {toml_value(value)}"
        if len(text) > MAX_LINE:
            text = tomli_w.dumps({key: value}).rstrip("\n")  # one item a line
        if comment and "\n" in text:  # a multi-line array: the comment goes above it
            self._lines += [f"# {comment}", text]
        elif comment:
            self._lines.append(f"{text:<{COMMENT_COLUMN}} # {comment}")
        else:
            self._lines.append(text)

    def commented_key(self, key: str, value: Any, comment: str) -> None:
        """A key left to the reader: shown, commented out."""
        text = f"# {key} = {toml_value(value)}"
        self._lines.append(f"{text:<{COMMENT_COLUMN}} # {comment}")

    def comment(self, text: str) -> None:
        self._lines.append(f"# {text}")

    def text(self) -> str:
        document = "\n".join(self._lines) + "\n"
        tomllib.loads(document)  # what we write, we can read: a bug here fails loudly
        return document
