"""What a statement is (its operation label) and how to show it safely (a literal-free fingerprint).

Both run on the application's threads (and event loop), for statements of any size, so both read a
bounded amount of text: the label only the statement's head, the fingerprint at most
``_SCAN_WINDOW`` characters with a hand-written scanner that is linear in what it reads.
"""

from __future__ import annotations

import re
import sys

from .._log import internal_errors

# --- Operation label ---------------------------------------------------------------------------

_TRANSACTION = frozenset({"BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "START", "END"})
_DDL = frozenset({"CREATE", "ALTER", "DROP", "TRUNCATE", "COMMENT", "GRANT", "REVOKE", "RENAME"})
_DIRECT = {"SELECT": "SELECT", "WITH": "SELECT", "VALUES": "SELECT", "TABLE": "SELECT",
           "INSERT": "INSERT", "UPDATE": "UPDATE", "DELETE": "DELETE"}  # fmt: skip

# Leading comments and parentheses never decide what a statement does. Possessive, and only ever
# run over the head, so a megabyte of leading comment costs the same as a short one.
_PREAMBLE = re.compile(r"(?:\s++|--[^\n]*+\n?|/\*.*?\*/|\()*+", re.DOTALL)
_FIRST_WORD = re.compile(r"[A-Za-z]+")
_HEAD = 4096  # characters of a statement the label may read
_LONGEST_KEYWORD = 16

# The hot path reads ``operation_cache.get(statement)`` (a plain dict get) before calling
# ``operation_of``. Keys are statement texts, and statements with inlined literals are all distinct,
# so the cache is bounded by entries and by bytes; statements too long to be worth keeping are
# classified each time instead (about a microsecond: only their head is read).
_CACHE_ENTRIES = 4096
_CACHE_BYTES = 8 * 1024 * 1024  # sys.getsizeof of the cached keys, summed
_CACHEABLE_CHARS = 16 * 1024
operation_cache: dict[str, str] = {}
_cached_bytes = 0


def operation_of(statement: str) -> str:
    """One of SELECT, INSERT, UPDATE, DELETE, TRANSACTION, DDL, OTHER; cached per statement text."""
    global _cached_bytes
    operation = operation_cache.get(statement)
    if operation is None:
        operation = _classify(statement)
        if len(statement) <= _CACHEABLE_CHARS:
            size = sys.getsizeof(statement)
            # Start over rather than evict one by one: a full cache means statements are not
            # repeating, and the ones that do come back at once. Threads may race on the byte
            # count; that only moves the next start-over a little.
            if len(operation_cache) >= _CACHE_ENTRIES or _cached_bytes + size > _CACHE_BYTES:
                operation_cache.clear()
                _cached_bytes = 0
            operation_cache[statement] = operation
            _cached_bytes += size
    return operation


def _classify(statement: str) -> str:
    head_end = min(len(statement), _HEAD)
    start = _PREAMBLE.match(statement, 0, head_end).end()  # type: ignore[union-attr]
    if start == head_end < len(statement):
        return "OTHER"  # the first word lies beyond the head: not worth a longer read
    match = _FIRST_WORD.match(statement, start, start + _LONGEST_KEYWORD + 1)
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


# --- Fingerprint -------------------------------------------------------------------------------

_MAX_FINGERPRINT = 2000  # characters of fingerprint kept
_SCAN_WINDOW = 256 * 1024  # characters of statement read, at most
_TOKEN_BUDGET = 4000  # tokens handled one by one, at most (enough to fill the output)
_LONGEST_NAME = 128  # a quoted name longer than this is shown as ``?``
TRUNCATED = "…"
_UNAVAILABLE = "<fingerprint unavailable>"

# Pieces of the token pattern. Everything is possessive (``*+``, ``++``): the scanner never
# backtracks, so each character is looked at a bounded number of times.
_NUMBER = r"""
    (?: 0[xX][0-9A-Fa-f_]++ | 0[bB][01_]++ | 0[oO][0-7_]++
      | (?: \d[\d_]*+ (?:\.[\d_]*+)?+ | \.\d[\d_]*+ ) (?:[eE][+-]?+\d++)?+ )"""
_PLACEHOLDER = r"""
    (?: \$\d++ | \?\d*+ | %[sbt](?!\w) | %\([^()'"`\[\]\s]{1,128}\)[sbt] | :[^\W\d]\w*+
      | \$[^\W\d]\w*+(?!\$) )"""
# A value inside a list: numbers, placeholders, NULL/TRUE/FALSE and quoted strings *without*
# backslashes (a backslash makes the string's end depend on the dialect: the one-token-at-a-time
# path decides those), each optionally cast (``$1::INTEGER``, ``?::timestamp with time zone``).
_VALUE = rf"""
    (?: {_PLACEHOLDER} | [+-]?+{_NUMBER}
      | (?:[EeNnBbXx]|[Uu]&)?+ '[^'\\]*+(?:''[^'\\]*+)*+'
      | (?i:NULL|TRUE|FALSE)(?!\w) )
    (?: \s*+::\s*+ (?:"[^"\\]*+"|[^\W\d][\w$]*+) (?:\s++(?i:WITH|WITHOUT|TIME|ZONE|VARYING|PRECISION)\b)*+
        (?:\s*+\(\s*+\d++(?:\s*+,\s*+\d++)?+\s*+\))?+ (?:\s*+\[\s*+\])*+ )*+"""
_GROUP = rf"\(\s*+{_VALUE}(?:\s*+,\s*+{_VALUE})*+\s*+\)"

# One alternative per kind of token, tried in this order at each token start. A list of values is
# one token (``values``: a parenthesised list, maybe unclosed, maybe followed by more rows), read
# at C speed however long it is; everything else is short or found with ``str.find``.
_TOKEN = re.compile(
    rf"""
      (?P<space>\s++)
    | (?P<squote>(?:[EeBbXxNn]|[Nn]?+[Qq]|[Uu]&)?+')
    | (?P<dquote>(?:[Uu]&)?+")
    | (?P<word>[^\W\d][\w$]*+)
    | (?P<values>\(\s*+{_VALUE}(?P<second>(?:\s*+,\s*+{_VALUE})++)?+\s*+
                 (?:(?P<close>\))(?P<more>(?:\s*+,\s*+{_GROUP})*+))?+)
    | (?P<brackets>\[\s*+{_VALUE}(?:\s*+,\s*+{_VALUE})++\s*+\])
    | (?P<line_comment>--)
    | (?P<block_comment>/\*)
    | (?P<hash_comment>\#(?!>>?+\s*+(?:[EeUu]&?+)?+['$%?:]))
    | (?P<backtick>`)
    | (?P<dollar>\$(?:[^\W\d]\w*+)?+\$)
    | (?P<operator>::|%%)
    | (?P<placeholder>{_PLACEHOLDER})
    | (?P<number>{_NUMBER})
    | (?P<char>.)
    """,
    re.VERBOSE | re.DOTALL,
)

# Bodies of quoted tokens, from just after the opening quote to just after the closing one, read
# two ways: the SQL standard (PostgreSQL, SQLite, SQL Server) doubles a quote to escape it, MySQL
# also escapes with a backslash.
_SQUOTE_DOUBLED = re.compile(r"[^']*+(?:''[^']*+)*+'")
_SQUOTE_BACKSLASHED = re.compile(r"(?:[^'\\]++|\\.|'')*+'", re.DOTALL)
_DQUOTE_DOUBLED = re.compile(r'[^"]*+(?:""[^"]*+)*+"')
_DQUOTE_BACKSLASHED = re.compile(r'(?:[^"\\]++|\\.|"")*+"', re.DOTALL)
_BACKTICK_BODY = re.compile(r"[^`]*+(?:``[^`]*+)*+`")
_ORACLE_CLOSERS = {"(": ")", "[": "]", "{": "}", "<": ">"}
# A SQL Server / SQLite bracketed name, ``[...]`` with ``]]`` for a ``]``.
_BRACKETED_NAME = re.compile(r"\[[^\]]*+(?:\]\][^\]]*+)*+\]")
# What, inside text one dialect reads as a comment, another dialect could read as the start of a
# token that runs past the comment's end.
_OPENS_IN_MYSQL = re.compile(r"['\"`]|/\*")
_OPENS_ELSEWHERE = re.compile(r"['\"`$\[]|/\*")
_DOT_AHEAD = re.compile(r"\s*+\.\s*+(?:[^\W\d]|[\"*])")  # a qualified name, not a number like .5
_WHITESPACE = re.compile(r"\s+")
# After these a double-quoted token is a name in every dialect where the statement is valid.
_NAME_KEYWORDS = frozenset({"FROM", "JOIN", "INTO", "UPDATE", "TABLE", "AS"})


class FingerprintFailed(Exception):
    """Recorded instead of the real error, whose traceback locals would hold the statement."""


def fingerprint(statement: str) -> str:
    """The statement with every literal and parameter replaced by ``?``: safe to log, alike
    statements share it.

    - Literals become ``?``: single-quoted strings (``''`` escapes), ``E'...'`` (backslash
      escapes), ``U&'...'``, ``N'...'``, ``B'0101'``, ``X'ff'``, Oracle's ``q'[...]'``, dollar
      quotes (``$$...$$``, ``$tag$...$tag$``) and numbers (``42``, ``1e5``, ``.5``, ``0x1F``).
      So do bound parameters in every paramstyle: ``%s``, ``%(name)s``, ``$1``, ``?``, ``:name``.
    - Comments are removed (``--``, ``/* */``, MySQL's ``#``); whitespace runs become one space.
    - Value lists collapse: a parenthesised list of two or more values (placeholders, literals,
      NULL/TRUE/FALSE, casts allowed) becomes ``(?, ...)``, any list after ``IN`` becomes
      ``IN (?, ...)``, and rows of values (``VALUES (?, ?), (?, ?)``) become the first row and
      ``...``: ``VALUES (?, ...), ...``. A list that starts with values and goes on with something
      else keeps the rest: ``(?, ..., now())``.
    - Names stay: backtick names, and double-quoted names where no dialect could read a string
      (after FROM, JOIN, INTO, UPDATE, TABLE, AS, or beside a ``.``). MySQL reads ``"..."`` as a
      string, so anywhere else a double-quoted token becomes ``?``: PostgreSQL's ``"userId"`` in a
      select list shows as ``?``, and no MySQL value ever shows.
    - The dialect is not known here, so wherever dialects disagree on where a token ends (a
      backslash before a quote, a nested ``/* /* */``, a ``#`` or ``--x`` line holding a quote, a
      ``[name]`` holding one) the fingerprint stops there and ends with ``…``; it never guesses.
      Whatever is unterminated swallows the rest of the statement as ``?``. ``#>`` and ``#>>``
      followed by a quote or a placeholder are PostgreSQL's JSON operators, not MySQL comments.
      Not guarded against: MySQL names spelled like dollar-quote tags (``$a$``, deprecated there).
    - Bounded cost: at most 256 KiB of the statement are read (long value lists at C speed, other
      text one token at a time, up to 4,000 tokens); the result is at most 2,000 characters. When
      the statement is not shown to its end, the fingerprint ends with ``…``.

    Never raises: a failure of its own is counted as an internal error and yields a placeholder.
    """
    try:
        return _scan(statement)
    except Exception as error:
        internal_errors.record("fingerprint", FingerprintFailed(type(error).__name__))
        return _UNAVAILABLE


def _scan(text: str) -> str:
    end = len(text)
    if end > _SCAN_WINDOW:
        # End the read at a separator, so that no word or placeholder shows cut in half.
        end = max(text.rfind(",", 0, _SCAN_WINDOW), text.rfind(" ", 0, _SCAN_WINDOW), 0)
    parts: list[str] = []
    emit = parts.append
    size = 0
    last_space = True  # no leading space
    stopped = False  # the fingerprint does not show the statement to its end
    after_in = False  # the last token was the keyword IN
    pos = 0
    budget = _TOKEN_BUDGET
    # Where the ``[name]`` that SQL Server and SQLite read at the last ``[`` ends: no token of ours
    # may run across it, or the two readings part ways.
    bracket_end = -1
    brackets_left = True  # a ``]`` may still come
    # Likewise the end of the line after PostgreSQL's ``#>``, which MySQL reads as a comment.
    line_end = -1
    match = _TOKEN.match

    while pos < end:
        budget -= 1
        if budget < 0 or size > _MAX_FINGERPRINT:
            break
        token = match(text, pos, end)
        assert token is not None  # ``char`` matches any character
        kind = token.lastgroup
        token_end = token.end()
        piece: str | None = "?"  # what stands for the token; None for a comment

        if kind == "space":
            if not last_space:
                emit(" ")
                size += 1
                last_space = True
            pos = token_end
            continue
        if kind == "word":
            piece = token.group()
            if len(piece) == 2 and piece.upper() == "IN":
                emit(piece)
                size += 2
                last_space = False
                after_in = True
                pos = token_end
                continue
        elif kind == "number" or kind == "placeholder":
            pass
        elif kind == "operator":
            piece = token.group()
        elif kind == "values":
            more = token.group("more")
            several = token.group("second") is not None
            if token.group("close") is None:
                # Values, then something else: ``(?, ..., now())``, or the end of what was read.
                if several and (token_end == end or text.startswith(",", token_end)):
                    piece = "(?, ..."
                else:
                    piece, token_end = "(", pos + 1
            elif more:
                piece = "(?, ...), ..." if several else "(?), ..."
            elif several or after_in:
                piece = "(?, ...)"
            else:
                piece, token_end = "(", pos + 1  # one value in parentheses is no list: pg_sleep(?)
        elif kind == "char" or kind == "brackets":
            piece = token.group()
            if piece == "#":  # ``#>``, ``#>>`` before an operand: PostgreSQL's JSON operators
                line_end = text.find("\n", pos, end)
            elif piece[0] == "[":
                if pos > bracket_end and brackets_left:
                    name = _BRACKETED_NAME.match(text, pos, end)
                    if name is None:
                        brackets_left = False
                    else:
                        bracket_end = name.end() - 1
                if kind == "brackets":
                    piece = "[?, ...]"
                    if bracket_end != token_end - 1:
                        piece, token_end = "[", pos + 1  # a ``]`` inside a string: one at a time
        elif kind == "squote":
            token_end = _single_quoted_end(text, pos, token_end, end)
        elif kind == "dquote":
            token_end = _quoted_end(text, token_end, end, _DQUOTE_DOUBLED, _DQUOTE_BACKSLASHED)
            if 0 < token_end - pos <= _LONGEST_NAME and _stands_for_a_name(parts, text, token_end, end):
                piece = text[pos:token_end]
        elif kind == "backtick":
            body = _BACKTICK_BODY.match(text, token_end, end)
            token_end = -1 if body is None else body.end()
            if 0 < token_end - pos <= _LONGEST_NAME:
                piece = text[pos:token_end]
        elif kind == "dollar":
            close = text.find(token.group(), token_end, end)
            token_end = -1 if close < 0 else close + (token_end - pos)
        else:
            piece = None
            if kind == "line_comment":
                # MySQL reads ``--x`` (no space) as code, which may open a string that ends later.
                risky = None if text[pos + 2 : pos + 3].isspace() else _OPENS_IN_MYSQL
                token_end = _line_comment_end(text, pos, end, risky)
            elif kind == "hash_comment":
                # PostgreSQL reads ``#`` as an operator and SQL Server as a name: code, either way.
                token_end = _line_comment_end(text, pos, end, _OPENS_ELSEWHERE)
            else:
                token_end = _block_comment_end(text, pos, end)

        if token_end <= 0:
            if token_end < 0 and piece is not None:
                emit("?")  # unterminated: it swallows the rest of what was read, shows none of it
            # ... and 0: dialects disagree on where this token ends, so nothing after it is shown.
            stopped = token_end == 0
            pos = end if token_end < 0 else pos
            break
        if pos <= bracket_end < token_end - 1 or pos <= line_end < token_end - 1:
            stopped = True  # runs across a point where another dialect's reading resumes
            break
        after_in = False
        pos = token_end
        if piece is None:  # a comment separates what surrounds it
            if not last_space:
                emit(" ")
                size += 1
                last_space = True
            continue
        emit(piece)
        size += len(piece)
        last_space = False

    if pos < len(text):
        stopped = True  # the window or the budget ended first
    shown = _WHITESPACE.sub(" ", "".join(parts)).strip()
    if len(shown) > _MAX_FINGERPRINT:
        shown = shown[:_MAX_FINGERPRINT]
        stopped = True
    return shown.rstrip(", ") + TRUNCATED if stopped else shown


def _single_quoted_end(text: str, start: int, body_start: int, end: int) -> int:
    """End of a ``'...'`` token (any prefix); -1 unterminated, 0 where readings disagree."""
    quoted_end = _quoted_end(text, body_start, end, _SQUOTE_DOUBLED, _SQUOTE_BACKSLASHED)
    prefix = text[start : body_start - 1]
    if quoted_end > 0 and prefix[-1:] in ("q", "Q") and body_start < end:
        # Oracle's q'<delimiter>...<delimiter>' reads to its own closing delimiter.
        opener = text[body_start]
        close = text.find(_ORACLE_CLOSERS.get(opener, opener) + "'", body_start + 1, end)
        if close + 2 != quoted_end:
            return 0
    return quoted_end


def _quoted_end(text: str, body_start: int, end: int, doubled: re.Pattern[str],
                backslashed: re.Pattern[str]) -> int:  # fmt: skip
    """End of a quoted token read both ways; -1 unterminated, 0 where the two readings disagree."""
    body = doubled.match(text, body_start, end)
    if body is None:
        return -1
    body_end = body.end()
    if text.find("\\", body_start, body_end) >= 0:
        other = backslashed.match(text, body_start, end)
        if other is None or other.end() != body_end:
            return 0
    return body_end


def _stands_for_a_name(parts: list[str], text: str, after: int, end: int) -> bool:
    """Whether a double-quoted token just read stands where only a name can."""
    previous = ""
    for part in reversed(parts[-2:]):
        if part != " ":
            previous = part
            break
    if previous == "." or previous.upper() in _NAME_KEYWORDS:
        return True
    return _DOT_AHEAD.match(text, after, end) is not None


def _line_comment_end(text: str, start: int, end: int, risky: re.Pattern[str] | None) -> int:
    """End of a line comment; -1 if it runs past what was read, 0 if another dialect's reading of
    the line as code could open a token that runs past its end."""
    newline = text.find("\n", start, end)
    if newline < 0:
        if end < len(text):
            return -1  # the line may go on past what was read
        newline = end
    if risky is not None and risky.search(text, start, newline):
        return 0
    return newline


def _block_comment_end(text: str, start: int, end: int) -> int:
    close = text.find("*/", start + 2, end)
    if close < 0:
        return -1
    if text.find("/*", start + 2, close + 1) >= 0:
        return 0  # PostgreSQL nests comments, MySQL ends at the first ``*/``
    if text.startswith(("!", "+", "M!"), start + 2) and _OPENS_IN_MYSQL.search(text, start + 2, close):
        return 0  # MySQL reads /*! and /*+ as code: a string inside may hold the ``*/``
    return close + 2
