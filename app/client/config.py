"""Where the client finds its server and key: options, then LATHE_API_URL / LATHE_API_KEY,
then the config file `lathe login` writes ($XDG_CONFIG_HOME/lathe/config.toml, by default
~/.config/lathe/config.toml, mode 0600)."""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "lathe" / "config.toml"


def load_config(path: Path | None = None) -> dict[str, str]:
    path = path or config_path()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return {k: v for k, v in data.items() if isinstance(v, str)}


def save_config(values: dict[str, str], path: Path | None = None) -> Path:
    """Write the config readable by its owner only (0600, in a 0700 directory)."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # JSON strings are valid TOML basic strings (same escapes for what a URL or key holds).
    text = "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return path


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Target:
    api_url: str
    api_key: str


def resolve(api_url: str | None, api_key: str | None) -> Target:
    """The server and key to use. `api_url`/`api_key` come from the options or the
    environment (Typer folds LATHE_API_URL / LATHE_API_KEY into them); the file fills in
    what they leave out."""
    stored = load_config() if not (api_url and api_key) else {}
    url = api_url or stored.get("api_url")
    key = api_key or stored.get("api_key")
    if not url or not key:
        missing = " and ".join(
            name for name, value in (("server URL", url), ("API key", key)) if not value
        )
        raise ConfigError(
            f"no {missing}: run `lathe login`, or set LATHE_API_URL and LATHE_API_KEY"
        )
    return Target(url.rstrip("/"), key)
