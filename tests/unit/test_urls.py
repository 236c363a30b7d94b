"""Store URLs in messages never show their password, quoted whole or on its own."""

from __future__ import annotations

from meshgate.urls import redact_url, without_password

DSN = "postgresql://meshgate:s3cret@db.internal:5432/audit"


def test_the_url_and_its_password_are_redacted_wherever_they_appear() -> None:
    assert redact_url(DSN) == "postgresql://meshgate:***@db.internal:5432/audit"
    message = f"cannot connect to {DSN}: password s3cret rejected"
    assert without_password(message, DSN) == (
        "cannot connect to postgresql://meshgate:***@db.internal:5432/audit: password *** rejected"
    )
    assert without_password("no such host", "redis://h:6379/0") == "no such host"
