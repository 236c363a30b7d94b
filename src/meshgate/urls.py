"""Store URLs in messages: never with their password (a DSN or a Redis URL usually has one)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit


def redact_url(url: str) -> str:
    """The URL without its password, for errors and logs."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def without_password(text: str, url: str) -> str:
    """`text` (an error about `url`) with the URL redacted, and its password nowhere else
    either (a client library may quote it on its own)."""
    text = text.replace(url, redact_url(url))
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text
