"""Options every client command takes."""

from __future__ import annotations

from typing import Annotated

import typer

ApiUrl = Annotated[
    str | None,
    typer.Option(
        "--api-url",
        envvar="LATHE_API_URL",
        help="Server URL (default: LATHE_API_URL, then the `lathe login` config).",
        show_default=False,
        show_envvar=False,
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="LATHE_API_KEY",
        help="Team API key (default: LATHE_API_KEY, then the `lathe login` config).",
        show_default=False,
        show_envvar=False,  # never echo a key in --help
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print the raw JSON, for scripts.")]
