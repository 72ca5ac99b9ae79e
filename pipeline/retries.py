"""How object-store requests are retried, and the count of retries each process keeps for the report.

The policy, in this one place (``pipeline.objectstore`` applies it):

- a request is tried at most ``ATTEMPTS`` times in all;
- before try ``i + 1`` (``i`` ≥ 1) it waits ``rand(0, 1) · min(BASE_S · 2^(i−1), CAP_S)`` seconds: exponential
  backoff with full jitter, so many workers throttled at once do not come back in step;
- only faults a retry can get past are retried: 503 SlowDown and other throttling, 500/502/504, a connection
  reset or timed out, a response body cut short. 403, 404, NoSuchBucket and every other answer fail at once.

botocore's ``standard`` retry mode implements exactly this for every request it sends (its backoff is the formula
above with ``BASE_S`` 1 s and ``CAP_S`` 20 s; the attempts are ``total_max_attempts``). What botocore cannot see is
a GET whose body is cut after the headers arrived (it hands the body over unread), so gigaseg retries those reads
itself with the same formula and the same count. s3fs's own retry loop is switched off: it would retry again what
botocore gave up on (SlowDown), a second layer of attempts with a backoff without jitter.

Every retry is counted against the URL it was for (``RETRY_LOG``, one per process). A worker returns what it
counted with each block's result; the driver sums the counts of an image's URLs into its report entry.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterable

ATTEMPTS = 5
BASE_S = 1.0
CAP_S = 20.0


def backoff_s(retry: int, rand: float | None = None) -> float:
    """Seconds to wait before retry ``retry`` (1 for the first): ``rand · min(BASE_S · 2^(retry−1), CAP_S)``."""
    if retry < 1:
        raise ValueError(f"retry counts from 1, got {retry}")
    r = random.random() if rand is None else rand
    return r * min(BASE_S * 2 ** (retry - 1), CAP_S)


def botocore_retries() -> dict:
    """The ``retries`` setting of botocore's ``Config`` (``config_kwargs`` of s3fs) that applies the policy."""
    return {"mode": "standard", "total_max_attempts": ATTEMPTS}


class RetryLog:
    """Retries counted per URL in this process, thread-safe. ``take`` hands them over (and forgets them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, url: str, n: int = 1) -> None:
        with self._lock:
            self._counts[url] += n

    def take(self, prefixes: Iterable[str] | None = None) -> dict[str, int]:
        """The counts of URLs under ``prefixes`` (every URL when None), removed from the log."""
        with self._lock:
            if prefixes is None:
                out = dict(self._counts)
                self._counts.clear()
                return out
            roots = [p.rstrip("/") for p in prefixes]
            out = {u: n for u, n in self._counts.items() if any(under(u, r) for r in roots)}
            for u in out:
                del self._counts[u]
            return out


def under(url: str, root: str) -> bool:
    """Whether ``url`` is ``root`` or below it (``s3://b/a.zarr/c/0`` is under ``s3://b/a.zarr``, not ``s3://b/a``)."""
    root = root.rstrip("/")
    return url == root or url.startswith(root + "/")


#: This process's retries (the driver's, or a worker's).
RETRY_LOG = RetryLog()

__all__ = ["ATTEMPTS", "BASE_S", "CAP_S", "RETRY_LOG", "RetryLog", "backoff_s", "botocore_retries", "under"]
