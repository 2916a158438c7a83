"""The slow-query fingerprint and the operation label, without a database (issues 11.3, 11.5, 12.7).

Literals carry canaries: an upper-case word that appears nowhere else, so finding it in a
fingerprint means a literal (or a comment, which can hold anything) got out.
"""

from __future__ import annotations

import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator

import pytest

from poolwatch._capture import sql as _sql
from poolwatch._capture.sql import fingerprint, operation_cache, operation_of

CANARY = "KQXJCANARY"


def assert_hidden(statement: str, *secrets: str) -> str:
    shown = fingerprint(statement)
    for secret in (CANARY, *secrets):
        assert secret not in shown, (statement, shown)
    return shown


# --- Literals, in every quoting form ------------------------------------------------------------

QUOTING_FORMS = {
    "single, doubled quote": f"'it''s {CANARY}'",
    "E string, backslash escapes": f"E'{CANARY}\\n\\\\ \\t'",
    "e string, lower case": f"e'{CANARY}'",
    "U& string": f"U&'d\\0061t{CANARY}'",
    "N string": f"N'{CANARY}'",
    "bit string": "B'0101101'",
    "hex string": "X'C0FFEE'",
    "hex number": "0xC0FFEE",
    "dollar quote": f"$$ {CANARY} ' \" $$",
    "tagged dollar quote": f"$body$ {CANARY} $$ 'x' $body$",
    "integer": "31415926",
    "exponent": "271e5",
    "leading dot": ".577215",
    "decimal": "1.41421",
    "underscored": "1_618_033",
    "Oracle q quote": f"q'[{CANARY}]'",
    "MySQL double-quoted string": f'"{CANARY}"',
    "MySQL binary": "0b1011011",
}


@pytest.mark.parametrize("literal", QUOTING_FORMS.values(), ids=QUOTING_FORMS.keys())
def test_each_quoting_form_is_replaced_and_the_rest_still_shows(literal: str) -> None:
    digits = [part for part in ("C0FFEE", "0101101", "1011011", "31415926", "271e5", "577215", "41421", "618")
              if part in literal]  # fmt: skip
    shown = assert_hidden(f"SELECT a FROM t WHERE b = {literal} AND c = d", *digits)
    assert shown == "SELECT a FROM t WHERE b = ? AND c = d"


def test_placeholders_of_every_paramstyle_become_question_marks() -> None:
    statement = (
        "SELECT a FROM t WHERE b = %s AND c = %(user_email)s AND d = $1 AND e = ? AND f = :name "
        "AND g = ?7 AND h = $name AND i = %(id_1_1)s::INTEGER AND j = %b"
    )
    assert fingerprint(statement) == (
        "SELECT a FROM t WHERE b = ? AND c = ? AND d = ? AND e = ? AND f = ? "
        "AND g = ? AND h = ? AND i = ?::INTEGER AND j = ?"
    )


def test_casts_operators_and_names_are_left_alone() -> None:
    assert fingerprint("SELECT x::text, a[1:2], data #>> '{a,b}', data->>'k' FROM t") == (
        "SELECT x::text, a[?:?], data #>> ?, data->>? FROM t"
    )
    assert fingerprint('SELECT "Post"."authorId", `order`.`id` FROM "Post" AS "p" JOIN `order`') == (
        'SELECT "Post"."authorId", `order`.`id` FROM "Post" AS "p" JOIN `order`'
    )


def test_double_quotes_where_mysql_reads_a_string_are_hidden() -> None:
    # MySQL's default mode reads "..." as a string: shown only where no dialect reads a value.
    shown = assert_hidden(f'SELECT "{CANARY}" FROM t WHERE a = "{CANARY}" OR b IN ("{CANARY}")')
    assert shown == "SELECT ? FROM t WHERE a = ? OR b IN (?)"
    assert_hidden(f'SELECT a FROM t WHERE b = "{CANARY}" .5')  # a number is no qualified name


# --- Comments ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        f"SELECT a -- {CANARY}\nFROM t",
        f"SELECT a /* {CANARY} */ FROM t",
        f"SELECT a /*+ {CANARY} */ FROM t",
        f"SELECT a # {CANARY}\nFROM t",
        f"/* {CANARY} */ SELECT a FROM t",
    ],
)
def test_comments_are_removed(statement: str) -> None:
    assert assert_hidden(statement) == "SELECT a FROM t"


def test_nested_comment_stops_the_fingerprint_rather_than_guess() -> None:
    # PostgreSQL nests /* */, MySQL ends at the first */: the two readings disagree on what follows.
    assert assert_hidden(f"SELECT a /* x /* y */ {CANARY} */ FROM t") == "SELECT a…"


# --- Where dialects disagree, and what is unterminated -------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        f"SELECT 'C:\\', '{CANARY}'",  # PostgreSQL: a backslash is a character
        f"SELECT 'it\\'s {CANARY}', 1",  # MySQL: a backslash escapes the quote
        f"SELECT E'it\\'s', '{CANARY}'",
        f'SELECT "a\\", "{CANARY}"',
        f"SELECT 1 # it's a\n {CANARY}' FROM t",  # PostgreSQL reads # as an operator
        f"SELECT 1 --it's a\n {CANARY}' FROM t",  # MySQL reads --x as minus minus x
        f"SELECT [it's] FROM t WHERE x = '{CANARY}'",  # SQL Server's bracketed name
        f"SELECT /*! 'a */ {CANARY}' */ 1",  # MySQL runs /*! */ as code
        f"SELECT q'[it's {CANARY}]' FROM dual",
        f"SELECT 1 #> it's\n '{CANARY} x' FROM t",
    ],
)
def test_where_dialects_disagree_the_fingerprint_stops(statement: str) -> None:
    shown = assert_hidden(statement)
    assert shown.endswith("…")


@pytest.mark.parametrize(
    "opening",
    ["'", "E'", "U&'", "N'", "$$", "$tag$", '"', "`", "/*", "q'[", "X'"],
)
def test_an_unterminated_token_swallows_the_rest(opening: str) -> None:
    shown = assert_hidden(f"SELECT a FROM t WHERE b = {opening}{CANARY} AND c = {CANARY}x")
    # A comment shows nothing, a quote shows as the one value it began.
    assert shown == ("SELECT a FROM t WHERE b =" if opening == "/*" else "SELECT a FROM t WHERE b = ?")


# --- Value lists -----------------------------------------------------------------------------------


def test_in_lists_of_any_length_share_one_fingerprint() -> None:
    shapes = [
        "SELECT a FROM t WHERE id IN (7)",
        "SELECT a FROM t WHERE id IN (7, 8, 9)",
        "SELECT a FROM t WHERE id IN ($1::INTEGER, $2::INTEGER)",
        "SELECT a FROM t WHERE id IN (%(id_1_1)s, %(id_1_2)s, %(id_1_3)s)",
        "SELECT a FROM t WHERE id IN (?)",
        "SELECT a FROM t WHERE id IN ('a', 'b''c', E'd', NULL, -1.5e3)",
        "SELECT a FROM t WHERE id IN (" + ", ".join(f"${n}::INTEGER" for n in range(1, 15001)) + ")",
    ]
    assert {fingerprint(shape) for shape in shapes} == {"SELECT a FROM t WHERE id IN (?, ...)"}
    assert fingerprint("SELECT a FROM t WHERE id NOT IN (SELECT b FROM u)") == (
        "SELECT a FROM t WHERE id NOT IN (SELECT b FROM u)"
    )


def test_multi_row_values_collapse_to_the_first_row() -> None:
    def insert(rows: int) -> str:
        values = ", ".join(f"(%(a__{n})s, %(b__{n})s::VARCHAR, {n})" for n in range(rows))
        return f"INSERT INTO t (a, b, c) VALUES {values} RETURNING t.id"

    assert {fingerprint(insert(rows)) for rows in (2, 10, 1000)} == {
        "INSERT INTO t (a, b, c) VALUES (?, ...), ... RETURNING t.id"
    }
    assert fingerprint(insert(1)) == "INSERT INTO t (a, b, c) VALUES (?, ...) RETURNING t.id"
    assert fingerprint("INSERT INTO t VALUES (1), (2), (3)") == "INSERT INTO t VALUES (?), ..."


def test_lists_that_go_on_with_something_else_keep_it() -> None:
    assert fingerprint("INSERT INTO t VALUES (1, 'x', now()), (2, 'y', now())") == (
        "INSERT INTO t VALUES (?, ..., now()), (?, ..., now())"
    )
    assert fingerprint("SELECT pg_sleep(0.5), coalesce(a, 1), f(1, 2), ARRAY[1, 2, 3], (1, 2 + 3)") == (
        "SELECT pg_sleep(?), coalesce(a, ?), f(?, ...), ARRAY[?, ...], (?, ? + ?)"
    )


def test_whitespace_collapses_and_the_output_is_capped() -> None:
    assert fingerprint("  SELECT\n\ta ,\r\n  b\n\nFROM   t  ") == "SELECT a , b FROM t"
    columns = ", ".join(f"column_{n}" for n in range(2000))
    shown = fingerprint(f"SELECT {columns} FROM t WHERE a = '{CANARY}'")
    assert len(shown) == 2001 and shown.endswith("…") and shown.startswith("SELECT column_0, column_1")


def test_what_lies_beyond_the_read_window_is_marked_not_shown() -> None:
    head = "SELECT a FROM t WHERE b IN (" + ", ".join(str(n) for n in range(200_000)) + ")"
    shown = assert_hidden(head + f" AND c = '{CANARY}'")
    assert shown == "SELECT a FROM t WHERE b IN (?, ...…"
    assert fingerprint(f"SELECT '{'x' * 1_000_000}' AND '{CANARY}'") == "SELECT…"


# --- Bounded cost ----------------------------------------------------------------------------------

TEN_MB = 10 * 1024 * 1024


TEN_MB_STATEMENTS: dict[str, Callable[[], str]] = {
    "literal IN list": lambda: "SELECT a FROM t WHERE id IN (" + "1234567, " * (TEN_MB // 9) + "1)",
    "placeholder IN list": lambda: (
        "SELECT a FROM t WHERE id IN (" + ", ".join(f"${n}::INTEGER" for n in range(1, TEN_MB // 14)) + ")"
    ),
    "one long string": lambda: "SELECT '" + "x" * TEN_MB + "'",
    "many comments": lambda: "SELECT " + "/* c */ " * (TEN_MB // 8),
    "many columns": lambda: "SELECT " + "a, " * (TEN_MB // 3) + "b FROM t",
    "many rows": lambda: "INSERT INTO t VALUES " + "(1, 'a', now()), " * (TEN_MB // 18) + "(1, 'a', now())",
    "unterminated comment": lambda: "SELECT /*" + "*" * TEN_MB,
}


def fastest_of(runs: int, call: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize("shape", TEN_MB_STATEMENTS)
def test_a_ten_megabyte_statement_costs_milliseconds(shape: str) -> None:
    statement = TEN_MB_STATEMENTS[shape]()
    assert len(statement) >= TEN_MB * 0.9
    # Measured: under 6 ms each here; sqlparse took 0.34 s per 100 KB and ~27 s for 10 MB.
    seconds = fastest_of(3, lambda: fingerprint(statement))
    assert seconds < 0.5, f"{shape}: {seconds:.3f} s"
    assert len(fingerprint(statement)) <= 2001


# --- Whatever the statement, no literal gets out ---------------------------------------------------

NOISE = ["'", "''", '"', "\\", "\\\\", "\\'", "*/", "/*", "--", "#", "\n", "$", "$$", "$t$", "]", "[",
         "`", ")", "(", ",", " ", "é", "?", "%s", ":n", "::", "E'", ";", "x"]  # fmt: skip


def noise(r: random.Random) -> str:
    parts = [CANARY] + [r.choice(NOISE) for _ in range(r.randint(0, 6))]
    r.shuffle(parts)
    return "".join(parts)


def without(text: str, *closers: str) -> str:
    """``text`` with no way to end the token it sits in early."""
    while any(closer in text for closer in closers):
        for closer in closers:
            text = text.replace(closer, "")
    return text


def doubled_quote_string(r: random.Random) -> str:  # PostgreSQL, SQLite, SQL Server
    return r.choice(["", "N", "U&", "B", "X"]) + "'" + noise(r).replace("'", "''") + "'"


def backslash_string(r: random.Random) -> str:  # MySQL, and PostgreSQL's E''
    body = noise(r).replace("\\", "\\\\").replace("'", r.choice(["''", "\\'"]))
    return r.choice(["", "E", "e"]) + "'" + body + "'"


def mysql_double_quoted(r: random.Random) -> str:
    return '"' + noise(r).replace("\\", "\\\\").replace('"', r.choice(['""', '\\"'])) + '"'


def dollar_quoted(r: random.Random) -> str:
    tag = r.choice(["", "t", "body_1"])
    return f"${tag}$" + without(noise(r), f"${tag}$").rstrip("$") + f"${tag}$"


def nested_comment(r: random.Random) -> str:
    inner = without(noise(r), "/*", "*/").strip("/*") or CANARY
    return f"/* {inner} /* {CANARY} */ {inner} */"


def block_comment(r: random.Random) -> str:
    return "/*" + (without(noise(r), "/*", "*/").strip("/*") or CANARY) + "*/"


def mysql_block_comment(r: random.Random) -> str:
    return "/*" + (without(noise(r), "*/").rstrip("*") or CANARY) + "*/"


def mysql_executable_comment(r: random.Random) -> str:
    return "/*!50000 " + backslash_string(r) + " */"


def line_comment(r: random.Random) -> str:
    return "-- " + noise(r).replace("\n", " ") + "\n"


def mysql_hash_comment(r: random.Random) -> str:
    return r.choice(["# ", "#", "#>x"]) + noise(r).replace("\n", " ") + "\n"


def mysql_minus_minus(r: random.Random) -> str:
    return "--" + backslash_string(r)  # minus, minus, a string


def bracketed_name(r: random.Random) -> str:
    return "[" + r.choice(["it's", "a]]b'", "o'k", "a--b", "c/*d", "x"]) + "]"


def oracle_quote(r: random.Random) -> str:
    opener, closer = r.choice([("[", "]"), ("{", "}"), ("(", ")"), ("<", ">"), ("!", "!")])
    return "q'" + opener + without(noise(r), closer + "'") + closer + "'"


def number(r: random.Random) -> str:
    return r.choice(["1", "1e5", ".5", "0x1F", "3.14", "1_000", "0b101"])


DIALECTS: dict[str, list[Callable[[random.Random], str]]] = {
    "postgresql": [doubled_quote_string, backslash_string, dollar_quoted, nested_comment, block_comment,
                   line_comment, number],
    "mysql": [backslash_string, mysql_double_quoted, mysql_hash_comment, mysql_block_comment,
              mysql_executable_comment, mysql_minus_minus, line_comment, number],
    "sql server / sqlite": [doubled_quote_string, bracketed_name, line_comment, block_comment, number],
    "oracle": [doubled_quote_string, oracle_quote, line_comment, block_comment, number],
}  # fmt: skip
CODE = ["SELECT", "a", ",", "WHERE", "t", "=", "(", ")", "IN", "AND", "x.y", "VALUES", "::text", "%s", "$1",
        "?", ":name", "\n"]  # fmt: skip


def random_statement(r: random.Random, literals: list[Callable[[random.Random], str]]) -> str:
    pieces = []
    for _ in range(r.randint(1, 12)):
        pieces.append(r.choice(CODE) if r.random() < 0.5 else r.choice(literals)(r))
        pieces.append(r.choice([" ", "\n", ", ", " (", "=", "\t"]))
    return "".join(pieces)


def test_no_literal_or_comment_gets_out_of_random_statements_or_their_cut_ends() -> None:
    # Statements valid in one dialect's reading, with canaries only inside literals and comments,
    # cut anywhere (every unterminated form). "FROM" is left out of the code words: MySQL's "..."
    # strings never follow it in a valid statement, and the fingerprint shows names there.
    r = random.Random(20240611)
    checked = 0
    for dialect, literals in DIALECTS.items():
        for _ in range(1500):
            statement = random_statement(r, literals)
            for cut in (len(statement), r.randint(0, len(statement))):
                shown = fingerprint(statement[:cut])
                assert CANARY not in shown, (dialect, statement[:cut], shown)
                checked += 1
    assert checked == 2 * 1500 * len(DIALECTS)


def test_a_failure_inside_is_counted_and_yields_a_placeholder(monkeypatch: pytest.MonkeyPatch) -> None:
    from poolwatch._log import internal_errors

    def broken(text: str) -> str:
        raise IndexError(text)

    monkeypatch.setattr(_sql, "_scan", broken)
    before = internal_errors.count
    assert fingerprint(f"SELECT '{CANARY}'") == "<fingerprint unavailable>"
    assert internal_errors.count == before + 1


# --- The operation label and its cache ---------------------------------------------------------------


@pytest.fixture
def empty_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    operation_cache.clear()
    monkeypatch.setattr(_sql, "_cached_bytes", 0, raising=False)
    yield
    operation_cache.clear()


def test_labels_are_cached_for_the_hot_path(empty_cache: None) -> None:
    statement = "/* app */ (SELECT 1)"
    assert operation_cache.get(statement) is None
    assert operation_of(statement) == "SELECT"
    assert operation_cache.get(statement) == "SELECT"
    for text, label in [("insert into t values (1)", "INSERT"), ("-- x\nUPDATE t SET a = 1", "UPDATE"),
                        ("COMMIT", "TRANSACTION"), ("CREATE TABLE t (a int)", "DDL"), ("", "OTHER"),
                        ("EXPLAIN SELECT 1", "OTHER")]:  # fmt: skip
        assert operation_of(text) == label


def test_the_operation_cache_stays_within_its_memory_budget(empty_cache: None) -> None:
    budget = 8 * 1024 * 1024

    def cached_bytes() -> int:
        return sum(sys.getsizeof(statement) for statement in operation_cache)

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        # The 1,500 distinct 57 KB statements: 86 MB kept before.
        for n in range(1500):
            assert operation_of(f"SELECT {n} FROM t WHERE a IN ({'1, ' * 19_000}1)") == "SELECT"
        assert cached_bytes() <= budget
        # Many distinct statements just short enough to be cached.
        for n in range(4000):
            assert operation_of(f"DELETE FROM t WHERE id = {n} -- {'x' * 8_000}") == "DELETE"
            if n % 500 == 0:
                assert cached_bytes() <= budget
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cached_bytes() <= budget
    assert kept < budget + 2 * 1024 * 1024, kept
    assert len(operation_cache) > 100  # still a cache


def test_a_long_statement_is_labelled_from_its_head(empty_cache: None) -> None:
    long_select = "SELECT " + "a, " * 100_000 + "b FROM t"
    assert operation_of(long_select) == "SELECT"
    assert long_select not in operation_cache
    # A huge leading comment is not read to its end: the label only ever looks at the head.
    assert operation_of("/*" + "x" * TEN_MB + "*/ DELETE FROM t") == "OTHER"
    assert operation_of("/*" + "x" * TEN_MB) == "OTHER"
