"""What a statement is (its operation label) and how to show it safely (a literal-free fingerprint)."""

from __future__ import annotations

import re

import sqlparse
from sqlparse import tokens as T

_TRANSACTION = frozenset({"BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "START", "END"})
_DDL = frozenset({"CREATE", "ALTER", "DROP", "TRUNCATE", "COMMENT", "GRANT", "REVOKE", "RENAME"})
_DIRECT = {"SELECT": "SELECT", "WITH": "SELECT", "VALUES": "SELECT", "TABLE": "SELECT",
           "INSERT": "INSERT", "UPDATE": "UPDATE", "DELETE": "DELETE"}  # fmt: skip

# Leading comments and parentheses never decide what a statement does.
_PREAMBLE = re.compile(r"^(?:\s+|--[^\n]*\n?|/\*.*?\*/|\()*", re.DOTALL)
_FIRST_WORD = re.compile(r"[A-Za-z]+")

_CACHE_LIMIT = 4096
operation_cache: dict[str, str] = {}


def operation_of(statement: str) -> str:
    """One of SELECT, INSERT, UPDATE, DELETE, TRANSACTION, DDL, OTHER; cached per statement text."""
    operation = operation_cache.get(statement)
    if operation is None:
        operation = _classify(statement)
        # Statements with inlined literals would grow the cache without bound; start over instead.
        if len(operation_cache) >= _CACHE_LIMIT:
            operation_cache.clear()
        operation_cache[statement] = operation
    return operation


def _classify(statement: str) -> str:
    head = statement[_PREAMBLE.match(statement).end() :]  # type: ignore[union-attr]
    match = _FIRST_WORD.match(head)
    if match is None:
        return "OTHER"
    word = match.group(0).upper()
    if word in _DIRECT:
        return _DIRECT[word]
    if word in _TRANSACTION:
        return "TRANSACTION"
    if word in _DDL:
        return "DDL"
    return "OTHER"


_MAX_FINGERPRINT = 2000
_WHITESPACE = re.compile(r"\s+")
_QUOTED_OR_NUMBER = re.compile(r"'(?:[^']|'')*'|\$\$.*?\$\$|\b\d+(?:\.\d+)?\b", re.DOTALL)


def fingerprint(statement: str) -> str:
    """The statement with every literal replaced by ``?``: safe to log, groups alike statements."""
    try:
        parts = []
        for token in sqlparse.parse(statement)[0].flatten():  # type: ignore[no-untyped-call]
            ttype = token.ttype
            if ttype in T.Comment:
                continue  # comments can carry anything, including the literals we hide
            # ``in`` on a token type means "is this type or a subtype of it".
            if ttype in T.Literal.String.Single or ttype in T.Literal.Number or ttype is T.Literal:
                parts.append("?")
            else:
                parts.append(token.value)
        text = "".join(parts)
    except Exception:
        # sqlparse gave up: a blunt regex still keeps literals out of the log.
        text = _QUOTED_OR_NUMBER.sub("?", statement)
    text = _WHITESPACE.sub(" ", text).strip()
    return text if len(text) <= _MAX_FINGERPRINT else text[:_MAX_FINGERPRINT] + "…"
