"""The rule that decides which predictions' events serving sends: one function for serving,
which applies it, and the sidecar, which evaluates it again for feedback it holds no event for.

A row's score is a number in [0, 1) drawn from its request id ``<base>-<row>``: the base id's
hash (BLAKE2b, 64 bits, personalised so it is independent of the canary's split) plus ``row`` times the golden ratio, modulo 1. The rows of one request
are thus spread evenly over [0, 1) (a low-discrepancy sequence, so any share of a large request
keeps that share of its rows, evenly spread), and requests are independent of each other. A
row's event is sent when its score is below the share of its model at that time. Shares are
powers of two (:func:`quantize`), so a smaller share keeps a subset of what a larger one keeps:
a row whose score is at least every share in effect while it could have been sent was not
sampled, whatever the share was at that moment.

Example::

    >>> row_scores("ab12", 0, 3).round(3).tolist()
    [0.877, 0.495, 0.113]
    >>> kept_by("ab12-2", 0.125), kept_by("ab12-1", 0.25)
    (True, False)
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

GOLDEN = 0.6180339887498949  # (sqrt(5) - 1) / 2: consecutive rows land far apart in [0, 1)
PERSON = b"modelloop-events"  # BLAKE2b's personalisation: this rule's own hash of an id
MIN_SHARE = 2.0**-20
"""The smallest share a rows-per-second budget goes down to (about one row in a million)."""


def base_score(base_id: str) -> float:
    """The score of row 0 of request ``base_id``: its 64-bit BLAKE2b hash over 2**64,
    personalised, so it is independent of the canary's split (serving/canary.py hashes the same
    id plainly: without it, a sample of 1-row requests would take the canary's first)."""
    digest = hashlib.blake2b(base_id.encode(), digest_size=8, person=PERSON).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def row_scores(base_id: str, first_row: int, rows: int) -> np.ndarray:
    """The scores of rows ``first_row`` .. ``first_row + rows - 1`` of request ``base_id``."""
    return (base_score(base_id) + np.arange(first_row, first_row + rows, dtype=np.float64) * GOLDEN) % 1.0


def quantize(share: float) -> float:
    """The largest power of two at most ``share`` (1 for a share of 1 or more, at least
    :data:`MIN_SHARE`)."""
    if share >= 1.0:
        return 1.0
    return max(MIN_SHARE, 2.0 ** math.floor(math.log2(max(share, MIN_SHARE))))


def kept_by(request_id: str, share: float) -> bool | None:
    """Whether the event of the row named ``request_id`` (``<base>-<row>``) is sent under
    ``share``; None for an id not of that form (not a row of serving's requests)."""
    base, sep, row = request_id.rpartition("-")
    if not sep or not base or not (row.isascii() and row.isdigit()):
        return None
    return bool(row_scores(base, int(row), 1)[0] < share)
