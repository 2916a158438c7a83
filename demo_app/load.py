"""A load generator for the demo: a realistic mix of traffic for a bounded time, with progress.

    python -m demo_app.load --url http://127.0.0.1:8000 --duration 20 --concurrency 8

It creates users and posts, reads them, pages through lists, updates and deletes some, asks
``/health/db`` now and then as a readiness probe would, asks for a few paths that do not exist, now
and then registers an e-mail twice (409), and, unless told not to, calls the misbehaving endpoints
(`/misbehave/...`) so the dashboards and alerts have something to show. It stops at `--duration`
seconds or `--max-requests` requests, whichever comes first, and only talks to the URL it is given:
hosts other than loopback are refused unless `--allow-remote`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

MAX_DURATION_SECONDS = 3600.0
MAX_CONCURRENCY = 64
REQUEST_TIMEOUT_SECONDS = 35.0  # longer than the slowest misbehaving endpoint (30 s hold)


def is_loopback_url(url: str) -> bool:
    """True when the URL's host is this machine: localhost, 127.0.0.0/8 or ::1."""
    host = urlsplit(url).hostname
    if host is None:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class State:
    """What the generator knows exists on the server, so reads and updates mostly hit."""

    rng: random.Random
    users: list[int] = field(default_factory=list)
    posts: list[tuple[int, int]] = field(default_factory=list)
    emails: list[str] = field(default_factory=list)
    misbehave_available: bool = True

    def user(self) -> int | None:
        return self.rng.choice(self.users) if self.users else None

    def post(self) -> tuple[int, int] | None:
        return self.rng.choice(self.posts) if self.posts else None


@dataclass
class Stats:
    statuses: Counter[str] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    # 5xx answers by action, the readiness probe's 503 (a verdict, not an error) left out.
    server_errors: Counter[str] = field(default_factory=Counter)
    requests: int = 0

    def record(self, action: str, status: int | None, error: str | None = None) -> None:
        self.requests += 1
        self.actions[action] += 1
        if status is None:
            self.errors[error or "error"] += 1
            self.statuses["failed"] += 1
        else:
            self.statuses[f"{status // 100}xx"] += 1
            if status >= 500 and action != "readiness probe":
                self.server_errors[action] += 1


Action = Callable[[httpx.AsyncClient, State], Awaitable[int | None]]


def _email(state: State) -> str:
    # A few percent of sign-ups reuse an address, as real users do: a 409, and a query error.
    if state.emails and state.rng.random() < 0.05:
        return state.rng.choice(state.emails)
    email = f"load-{uuid.uuid4().hex[:12]}@example.com"
    state.emails.append(email)
    return email


async def create_user(client: httpx.AsyncClient, state: State) -> int:
    body = {"email": _email(state), "name": f"user {state.rng.randint(1, 10_000)}"}
    response = await client.post("/users", json=body)
    if response.status_code == 201:
        state.users.append(response.json()["id"])
    return response.status_code


async def read_user(client: httpx.AsyncClient, state: State) -> int:
    user = state.user()
    # Now and then an id that does not exist: a 404 through the same route.
    user_id = user if user is not None and state.rng.random() > 0.1 else 10_000_000
    return (await client.get(f"/users/{user_id}")).status_code


async def list_users(client: httpx.AsyncClient, state: State) -> int:
    params = {"limit": state.rng.choice([5, 10, 20, 50]), "offset": state.rng.randint(0, 40)}
    return (await client.get("/users", params=params)).status_code


async def update_user(client: httpx.AsyncClient, state: State) -> int | None:
    user = state.user()
    if user is None:
        return await create_user(client, state)
    body = {"name": f"renamed {state.rng.randint(1, 10_000)}"}
    return (await client.patch(f"/users/{user}", json=body)).status_code


async def delete_user(client: httpx.AsyncClient, state: State) -> int | None:
    # Keep a population to read from: only delete when there are plenty.
    if len(state.users) < 20:
        return await create_user(client, state)
    user = state.users.pop(state.rng.randrange(len(state.users)))
    state.posts = [p for p in state.posts if p[0] != user]
    return (await client.delete(f"/users/{user}")).status_code


async def create_post(client: httpx.AsyncClient, state: State) -> int | None:
    user = state.user()
    if user is None:
        return await create_user(client, state)
    body = {"title": f"post {state.rng.randint(1, 10_000)}", "body": "lorem ipsum " * 5}
    response = await client.post(f"/users/{user}/posts", json=body)
    if response.status_code == 201:
        state.posts.append((user, response.json()["id"]))
    return response.status_code


async def read_post(client: httpx.AsyncClient, state: State) -> int | None:
    post = state.post()
    if post is None:
        return await create_post(client, state)
    return (await client.get(f"/users/{post[0]}/posts/{post[1]}")).status_code


async def list_posts(client: httpx.AsyncClient, state: State) -> int | None:
    user = state.user()
    if user is None:
        return await create_user(client, state)
    params = {"limit": state.rng.choice([5, 20]), "offset": state.rng.choice([0, 0, 5])}
    return (await client.get(f"/users/{user}/posts", params=params)).status_code


async def update_post(client: httpx.AsyncClient, state: State) -> int | None:
    post = state.post()
    if post is None:
        return await create_post(client, state)
    body = {"title": f"edited {state.rng.randint(1, 10_000)}"}
    return (await client.patch(f"/users/{post[0]}/posts/{post[1]}", json=body)).status_code


async def delete_post(client: httpx.AsyncClient, state: State) -> int | None:
    if len(state.posts) < 20:
        return await create_post(client, state)
    post = state.posts.pop(state.rng.randrange(len(state.posts)))
    return (await client.delete(f"/users/{post[0]}/posts/{post[1]}")).status_code


async def readiness_probe(client: httpx.AsyncClient, state: State) -> int:
    """What Kubernetes' readiness probe asks every few seconds (it also has poolwatch read the
    database server's connection limit, on the probe's own connection)."""
    return (await client.get("/health/db")).status_code


async def unknown_path(client: httpx.AsyncClient, state: State) -> int:
    path = state.rng.choice(["/wp-login.php", "/favicon.ico", "/api/v2/users", "/.env"])
    return (await client.get(path)).status_code


def _misbehaving(method: str, path: str, params: dict[str, float] | None = None) -> Action:
    async def call(client: httpx.AsyncClient, state: State) -> int | None:
        if not state.misbehave_available:
            return await read_user(client, state)
        response = await client.request(method, f"/misbehave{path}", params=params)
        if response.status_code == 404:
            state.misbehave_available = False  # the server runs without DEMO_MISBEHAVE
        return response.status_code

    return call


MISBEHAVING: dict[str, Action] = {
    "misbehave slow query": _misbehaving("GET", "/slow-query", {"seconds": 1.5}),
    "misbehave n+1": _misbehaving("GET", "/n-plus-one", {"users": 20}),
    "misbehave hold": _misbehaving("GET", "/hold", {"seconds": 2.0}),
    "misbehave leak": _misbehaving("POST", "/leak"),
    "misbehave query error": _misbehaving("GET", "/query-error"),
    "misbehave dead connection": _misbehaving("GET", "/dead-connection"),
    "misbehave sync work": _misbehaving("GET", "/sync-work", {"seconds": 0.5}),
}

# Weights of a read-mostly API: reads and lists dominate, writes are a minority.
NORMAL: dict[str, tuple[Action, float]] = {
    "create user": (create_user, 8),
    "read user": (read_user, 25),
    "list users": (list_users, 15),
    "update user": (update_user, 5),
    "delete user": (delete_user, 2),
    "create post": (create_post, 10),
    "read post": (read_post, 15),
    "list posts": (list_posts, 12),
    "update post": (update_post, 4),
    "delete post": (delete_post, 2),
    "unknown path": (unknown_path, 2),
    "readiness probe": (readiness_probe, 1),
}


async def race_update_user(client: httpx.AsyncClient, state: State) -> int | None:
    """Rename a user, or give them another user's address (409): while others may delete them."""
    user = state.user()
    if user is None:
        return await create_user(client, state)
    body: dict[str, str] = {"name": f"renamed {state.rng.randint(1, 10_000)}"}
    if state.emails and state.rng.random() < 0.3:
        body["email"] = state.rng.choice(state.emails)
    return (await client.patch(f"/users/{user}", json=body)).status_code


async def race_delete_user(client: httpx.AsyncClient, state: State) -> int | None:
    """Delete a user that stays known until the answer: other workers keep writing to it meanwhile."""
    user = state.user()
    if user is None or len(state.users) < 5:
        return await create_user(client, state)
    status = (await client.delete(f"/users/{user}")).status_code
    if user in state.users:
        state.users.remove(user)
    state.posts = [p for p in state.posts if p[0] != user]
    return status


async def race_delete_post(client: httpx.AsyncClient, state: State) -> int | None:
    post = state.post()
    if post is None or len(state.posts) < 5:
        return await create_post(client, state)
    status = (await client.delete(f"/users/{post[0]}/posts/{post[1]}")).status_code
    if post in state.posts:
        state.posts.remove(post)
    return status


# Few rows, written and deleted by every worker at once: PATCH racing DELETE, DELETE racing DELETE,
# a post created for a user being deleted, two users given one address. Each must end in 404 or 409.
RACES: dict[str, tuple[Action, float]] = {
    "create user": (create_user, 6),
    "update user": (race_update_user, 10),
    "delete user": (race_delete_user, 6),
    "create post": (create_post, 10),
    "update post": (update_post, 10),
    "delete post": (race_delete_post, 6),
    "read post": (read_post, 4),
}

MIXES: dict[str, dict[str, tuple[Action, float]]] = {"default": NORMAL, "races": RACES}


@dataclass
class Plan:
    duration: float
    concurrency: int
    max_requests: int
    misbehave_ratio: float
    seed: int | None
    mix: str = "default"


def _pick(state: State, misbehave_ratio: float, mix: str = "default") -> tuple[str, Action]:
    if state.misbehave_available and state.rng.random() < misbehave_ratio:
        name = state.rng.choice(list(MISBEHAVING))
        return name, MISBEHAVING[name]
    actions = MIXES[mix]
    names = list(actions)
    weights = [actions[n][1] for n in names]
    name = state.rng.choices(names, weights)[0]
    return name, actions[name][0]


async def run(url: str, plan: Plan, console: Console, show_progress: bool = True) -> Stats:
    state = State(rng=random.Random(plan.seed))
    stats = Stats()
    deadline = time.monotonic() + plan.duration
    # Seed some users, then one call to every misbehaving endpoint, so even a short run shows
    # every kind of trouble at least once; after that, the weighted mix.
    opening: list[tuple[str, Action]] = [("readiness probe", readiness_probe)]
    opening += [("create user", create_user)] * 10
    opening += [("create post", create_post)] * 10
    if plan.misbehave_ratio > 0:
        opening += list(MISBEHAVING.items())
    opening.reverse()

    async def one(client: httpx.AsyncClient, name: str, action: Action) -> None:
        try:
            status = await action(client, state)
            stats.record(name, status)
        except httpx.HTTPError as error:
            stats.record(name, None, type(error).__name__)

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline and stats.requests < plan.max_requests:
            name, action = opening.pop() if opening else _pick(state, plan.misbehave_ratio, plan.mix)
            remaining = deadline - time.monotonic()
            try:
                await asyncio.wait_for(one(client, name, action), timeout=max(remaining, 0.1))
            except TimeoutError:
                stats.record(name, None, "stopped at deadline")

    limits = httpx.Limits(max_connections=plan.concurrency)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_SECONDS)
    columns = (
        TextColumn("[bold]load[/]"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[summary]}"),
    )
    with Progress(*columns, console=console, disable=not show_progress) as progress:
        task = progress.add_task("load", total=plan.duration, summary="")

        async def refresh() -> None:
            started = time.monotonic()
            while True:
                elapsed = max(time.monotonic() - started, 1e-6)
                summary = f"{stats.requests} requests  {stats.requests / elapsed:.0f}/s  " + "  ".join(
                    f"{k}:{v}" for k, v in sorted(stats.statuses.items())
                )
                progress.update(task, completed=min(elapsed, plan.duration), summary=summary)
                await asyncio.sleep(0.25)

        async with httpx.AsyncClient(
            base_url=url, timeout=timeout, limits=limits, follow_redirects=False
        ) as client:
            ticker = asyncio.create_task(refresh())
            try:
                await asyncio.gather(*(worker(client) for _ in range(plan.concurrency)))
            finally:
                ticker.cancel()
        progress.update(task, completed=plan.duration)
    return stats


def summary_table(stats: Stats, elapsed: float) -> Table:
    table = Table(title=f"{stats.requests} requests in {elapsed:.1f} s")
    table.add_column("action")
    table.add_column("requests", justify="right")
    for name, count in sorted(stats.actions.items()):
        table.add_row(name, str(count))
    for status, count in sorted(stats.statuses.items()):
        table.add_row(f"[bold]{status}[/]", str(count))
    for error, count in sorted(stats.errors.items()):
        table.add_row(f"[red]{error}[/]", str(count))
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo_app.load", description="Drive a realistic mix against the demo."
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the demo's base URL")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds to run (max 3600)")
    parser.add_argument("--concurrency", type=int, default=8, help="parallel clients (max 64)")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    parser.add_argument(
        "--misbehave-ratio",
        type=float,
        default=0.03,
        help="share of requests sent to /misbehave/* (0 turns them off, opening tour included)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed, for repeatable runs")
    parser.add_argument(
        "--mix",
        choices=sorted(MIXES),
        default="default",
        help="default: a read-mostly API; races: every worker writes and deletes the same few rows",
    )
    parser.add_argument(
        "--fail-on-server-error",
        action="store_true",
        help="exit 1 if any answer but the readiness probe's was a 5xx",
    )
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback host")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, summary only")
    args = parser.parse_args(argv)
    if urlsplit(args.url).scheme not in ("http", "https"):
        parser.error(f"--url must be an http(s) URL, got {args.url!r}")
    if not args.allow_remote and not is_loopback_url(args.url):
        parser.error(f"refusing to load {args.url}: not a loopback host (pass --allow-remote if you own it)")
    if not 0 < args.duration <= MAX_DURATION_SECONDS:
        parser.error(f"--duration must be in (0, {MAX_DURATION_SECONDS:.0f}]")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        parser.error(f"--concurrency must be in [1, {MAX_CONCURRENCY}]")
    if args.max_requests < 1:
        parser.error("--max-requests must be at least 1")
    if not 0 <= args.misbehave_ratio <= 1:
        parser.error("--misbehave-ratio must be in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    plan = Plan(
        duration=args.duration,
        concurrency=args.concurrency,
        max_requests=args.max_requests,
        misbehave_ratio=args.misbehave_ratio,
        seed=args.seed,
        mix=args.mix,
    )
    started = time.monotonic()
    stats = asyncio.run(run(args.url.rstrip("/"), plan, console, show_progress=not args.quiet))
    console.print(summary_table(stats, time.monotonic() - started))
    answered = stats.requests - stats.statuses["failed"]
    if answered == 0:
        console.print(f"[red]no request to {args.url} got an answer[/]")
        return 1
    if stats.server_errors:
        console.print(f"[red]server errors by action: {dict(stats.server_errors)}[/]")
        if args.fail_on_server_error:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
