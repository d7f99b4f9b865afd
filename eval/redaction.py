"""Keep API keys out of everything the evaluation logs or stores (``eval.log``, wandb's ``output.log`` and
``.wandb`` file, predictions, caches).

A judge server that rejects a request may echo the key it was sent in its error body; that body is useful in the
error message, the key is not. Two layers:

- :func:`redact` at the source: the judge client (:mod:`eval.benchmarks.judge`) passes every server text it puts
  into an error, a log line or its cache through it.
- :class:`RedactSecrets`, a logging filter that :func:`install_log_redaction` puts on the root logger's handlers
  (Hydra's console and ``eval.log`` handlers), so a key that reaches a log line from anywhere is replaced before
  the line is written to the file or to the console (which wandb records as ``output.log``).

Secrets are the values of environment variables whose names end in ``API_KEY``, ``_TOKEN`` or ``_SECRET`` (e.g.
``OPENAI_API_KEY``, ``HF_TOKEN``), plus any registered with :func:`add_secret`; values shorter than
:data:`MIN_SECRET_LENGTH` characters are ignored (they would redact ordinary words).
"""

from __future__ import annotations

import logging
import os
import re

__all__ = ["MIN_SECRET_LENGTH", "add_secret", "secrets", "redact", "RedactSecrets", "install_log_redaction"]

MIN_SECRET_LENGTH = 8
_SECRET_NAME = re.compile(r"(API_KEY|_TOKEN|_SECRET)$")
_registered: set[str] = set()


def add_secret(value: str | None) -> None:
    """Treat ``value`` as a secret from now on (ignored when None or shorter than :data:`MIN_SECRET_LENGTH`)."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        _registered.add(value)


def secrets() -> list[str]:
    """The current secrets, longest first (so a key containing another is replaced whole)."""
    found = {v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(found | _registered, key=len, reverse=True)


def redact(text: str, extra: str | None = None) -> str:
    """``text`` with every secret (and ``extra``, e.g. the key a request used) replaced by ``<redacted>``."""
    values = secrets()
    if extra and len(extra) >= MIN_SECRET_LENGTH and extra not in values:
        values = sorted([*values, extra], key=len, reverse=True)
    for value in values:
        if value in text:
            text = text.replace(value, "<redacted>")
    return text


class RedactSecrets(logging.Filter):
    """Replace secrets in a log record's message and traceback before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Put one :class:`RedactSecrets` on each handler of ``logger`` (default: the root logger); idempotent.

    Handler filters apply to records propagated from every child logger, which logger filters do not."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
