"""A small HTTP client for the Lathe API: base URL, bearer key, and errors that end the
command with the API's message and a documented exit code."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx
import typer
from rich.console import Console
from rich.text import Text

from app.client.config import ConfigError, Target, resolve
from app.client.render import make_console

USER_AGENT = "lathe-cli/0.1.0"

# Exit codes scripts can rely on (docs/cli.md). 0-3 are a watched job's outcome.
EXIT_OK, EXIT_FAILED, EXIT_CANCELLED, EXIT_PAUSED = 0, 1, 2, 3
EXIT_API_ERROR = 4  # the API refused a request: its error envelope is printed
EXIT_UNREACHABLE = 5  # no server configured, or it could not be reached
EXIT_LOCAL = 6  # a problem on this side: no such local file, an output directory in the way
EXIT_INTERRUPTED = 130  # Ctrl-C

F = TypeVar("F", bound=Callable[..., Any])


class ClientError(Exception):
    """Ends the command: `message` on stderr, then exit `exit_code`."""

    exit_code = EXIT_LOCAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unreachable(ClientError):
    exit_code = EXIT_UNREACHABLE


class APIError(ClientError):
    """An error answer: OpenAI's envelope {"error": {"message", "type", "param", "code"}}."""

    exit_code = EXIT_API_ERROR

    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param

    @classmethod
    def from_response(cls, resp: httpx.Response) -> APIError:
        try:
            error = resp.json()["error"]
            return cls(
                resp.status_code, str(error["message"]), error.get("code"), error.get("param")
            )
        except (ValueError, KeyError, TypeError):
            text = resp.text.strip()[:500] or resp.reason_phrase
            return cls(resp.status_code, text)


def print_error(exc: ClientError, console: Console | None = None) -> None:
    console = console or make_console(stderr=True)
    line = Text("error", style="bold red")
    if isinstance(exc, APIError):
        line.append(f" {exc.status}" + (f" {exc.code}" if exc.code else ""), style="red")
    line.append(": ")
    line.append(exc.message)  # a Text: brackets in the message are not markup
    if isinstance(exc, APIError) and exc.param:
        line.append(f" (param: {exc.param})", style="dim")
    console.print(line, soft_wrap=True)


def handles_errors(func: F) -> F:
    """Decorate a command: a ClientError prints cleanly and exits with its code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            print_error(Unreachable(str(exc)))
            raise typer.Exit(EXIT_UNREACHABLE) from None
        except ClientError as exc:
            print_error(exc)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            make_console(stderr=True).print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


class LatheClient:
    """Requests to one Lathe server with one team key."""

    def __init__(
        self,
        target: Target,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = target.api_url
        self.http = httpx.Client(
            base_url=target.api_url,
            headers={"Authorization": f"Bearer {target.api_key}", "User-Agent": USER_AGENT},
            timeout=timeout,
            transport=transport,
        )

    @classmethod
    def from_options(cls, api_url: str | None, api_key: str | None) -> LatheClient:
        return cls(resolve(api_url, api_key))

    def __enter__(self) -> LatheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _unreachable(self, exc: httpx.TransportError) -> Unreachable:
        return Unreachable(f"cannot reach {self.base_url}: {exc or type(exc).__name__}")

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if resp.status_code >= 400:
            raise APIError.from_response(resp)
        return resp

    def get(self, path: str, **params: Any) -> Any:
        params = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=params).json()

    def post(self, path: str, json: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, json=json, **kwargs).json()

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed response; an error status raises APIError (transport errors while
        connecting raise httpx.TransportError, for the caller to retry or not)."""
        with self.http.stream(method, path, **kwargs) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise APIError.from_response(resp)
            yield resp
