"""SQL text as pg_dump writes it: a small tokenizer (``tokenize``, ``statements``) and a
``Cursor`` over one statement's tokens. Only known statement shapes are accepted: every mismatch
raises ``Unparsed``, and nothing parsed here is ever replayed as text. The archive's
database-level statements (``archive``) and the globals' role statements (``roles``) are read
with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>--[^\n]*)
  | (?P<qident>"(?:[^"]|"")*")
  | (?P<estring>[Ee]'(?:[^'\\]|\\.|'')*')
  | (?P<string>'(?:[^']|'')*')
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
  | (?P<op>.)
""", re.X | re.S)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "\\": "\\", "'": "'"}


class Unparsed(ValueError):
    """A statement of a shape this parser does not accept."""


@dataclass(frozen=True)
class Token:
    kind: str  # word | ident (double-quoted) | string | num | op
    text: str  # identifier or string value (unquoted), or the raw text

    def kw(self, *words: str) -> bool:
        return self.kind == "word" and self.text.upper() in words

    def op(self, char: str) -> bool:
        return self.kind == "op" and self.text == char


def tokenize(text: str) -> list[Token]:
    """SQL tokens; whitespace and ``--`` comments dropped; psql meta-command lines skipped."""
    text = "\n".join(line for line in text.splitlines() if not line.startswith("\\"))
    out: list[Token] = []
    for m in _TOKEN.finditer(text):
        kind, raw = m.lastgroup, m.group()
        if kind in ("ws", "comment"):
            continue
        if kind == "qident":
            out.append(Token("ident", raw[1:-1].replace('""', '"')))
        elif kind == "string":
            out.append(Token("string", raw[1:-1].replace("''", "'")))
        elif kind == "estring":
            body = re.sub(r"\\(.)", lambda e: _ESCAPES.get(e.group(1), e.group(1)), raw[2:-1])
            out.append(Token("string", body.replace("''", "'")))
        else:
            out.append(Token(kind or "op", raw))
    return out


def statements(text: str) -> Iterator[list[Token]]:
    """Statements of ``text``, split at top-level semicolons."""
    current: list[Token] = []
    for tok in tokenize(text):
        if tok.op(";"):
            if current:
                yield current
            current = []
        else:
            current.append(tok)
    if current:
        yield current


class Cursor:
    """Walks one statement's tokens; every mismatch raises :class:`Unparsed`."""

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens, self.i = tokens, 0

    def peek(self, ahead: int = 0) -> Token | None:
        j = self.i + ahead
        return self.tokens[j] if j < len(self.tokens) else None

    def at_end(self) -> bool:
        return self.i >= len(self.tokens)

    def accept(self, *words: str) -> bool:
        """Consume the keyword sequence ``words`` if it comes next."""
        for k, word in enumerate(words):
            tok = self.peek(k)
            if tok is None or not tok.kw(word):
                return False
        self.i += len(words)
        return True

    def expect(self, *words: str) -> None:
        if not self.accept(*words):
            raise Unparsed(f"expected {' '.join(words)}")

    def accept_op(self, char: str) -> bool:
        tok = self.peek()
        if tok is not None and tok.op(char):
            self.i += 1
            return True
        return False

    def take(self) -> Token:
        tok = self.peek()
        if tok is None:
            raise Unparsed("unexpected end")
        self.i += 1
        return tok

    def name(self) -> str:
        """An identifier: quoted as written, unquoted folded to lower case."""
        tok = self.take()
        if tok.kind == "ident":
            return tok.text
        if tok.kind == "word":
            return tok.text.lower()
        raise Unparsed(f"expected a name, got {tok.text!r}")

    def string(self) -> str:
        tok = self.take()
        if tok.kind != "string":
            raise Unparsed(f"expected a string, got {tok.text!r}")
        return tok.text

    def values(self) -> list[str]:
        """``TO`` / ``=`` values of a ``SET``: literals (or bare words and numbers) by commas."""
        if not (self.accept("TO") or self.accept_op("=")):
            raise Unparsed("expected TO")
        out = []
        while True:
            tok = self.take()
            if tok.kind not in ("string", "num", "word", "ident"):
                raise Unparsed(f"unexpected value {tok.text!r}")
            out.append(tok.text)
            if not self.accept_op(","):
                break
        self.end()
        return out

    def end(self) -> None:
        if not self.at_end():
            raise Unparsed(f"unexpected {self.peek().text!r}")  # type: ignore[union-attr]


def statement_text(tokens: list[Token], limit: int = 120) -> str:
    """A statement's tokens for a message, strings elided (they may hold password hashes)."""
    text = " ".join("'...'" if t.kind == "string" else
                    f'"{t.text}"' if t.kind == "ident" else t.text for t in tokens)
    return text if len(text) <= limit else text[:limit] + "..."
