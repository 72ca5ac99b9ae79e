"""Secrets masked in any text gigaseg prints, logs or writes: credentials from the environment and the
signatures of presigned URLs.

Specs never hold credentials (``jobs.spec`` refuses them), but an error can still carry one: a presigned URL given as
an input (its query holds ``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``), a library message
that quotes a request, a traceback. ``redact`` is applied where text leaves the program: the per-image errors
(``pipeline.engine``), report.json (``jobs.report``), the console and the log (``jobs.console``, ``jobs.cli``).
"""

from __future__ import annotations

import logging
import os
import re

#: Query parameters (and header fields) whose values are secrets: AWS SigV4 and SigV2, GCS, Azure SAS.
_SECRET_PARAMS = re.compile(
    r"(?i)(?<![A-Za-z0-9_-])((?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|Credential|"
    r"AWSAccessKeyId|X-Goog-Signature|X-Goog-Credential|sig|access_token|token)=)[^&\s'\"<>,]+")
#: Environment variables holding credentials; their values are masked wherever they appear.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
              "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN",
              "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_SECRET", "GOOGLE_OAUTH_ACCESS_TOKEN")
#: Shorter values are not masked: real keys are 20 (AWS key id) to hundreds of characters, and masking a short
#: word everywhere ("testing") would garble paths and messages without protecting anything.
MIN_SECRET_LEN = 12
MASK = "***"


def redact(text: str) -> str:
    """``text`` with presigned-URL signatures, credential query parameters and the environment's credential
    values replaced by ``***``."""
    if not text:
        return text
    out = _SECRET_PARAMS.sub(lambda m: m.group(1) + MASK, text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= MIN_SECRET_LEN and value in out:
            out = out.replace(value, MASK)
    return out


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message and traceback before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


__all__ = ["MASK", "MIN_SECRET_LEN", "SECRET_ENV", "RedactingFilter", "redact"]
