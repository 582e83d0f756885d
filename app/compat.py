"""Standard-library features newer than the oldest Python Lathe runs on (3.11.2, Debian 12's
python3).

`tarfile`: extraction filters (PEP 706, `extractall(..., filter="data")`: no absolute paths,
no links out of the target, no devices) came in 3.11.4. Before, the same module from the
backports.tarfile package (CPython's own tarfile, pinned in pyproject.toml for those
Pythons). Feature-tested, so a distribution Python that backported the filters uses its own.
"""

from __future__ import annotations

import tarfile

if not hasattr(tarfile, "data_filter"):  # pragma: no cover - Python < 3.11.4
    from backports import tarfile  # type: ignore[no-redef]

__all__ = ["tarfile"]
