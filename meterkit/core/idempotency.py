"""What the retries of an ``Idempotency-Key`` find: the rule of the response records.

The meter already keeps, per organization and idempotency key, the first decision of
a request for 24 hours (its charge is replayed, never charged again). The HTTP gate
keeps the first *response* next to it, per organization, mode, caller and idempotency
key, in one record that a backend stores and this module decides about:

- ``D`` (done): the first response, stored once the app answered, and the request's
  fingerprint (method, path, operation, body digest). A retry with the same
  fingerprint gets the response again; another fingerprint is refused (422). An empty
  payload says the response ran but was too large to keep.
- ``F`` (free): the request ended without a response to keep (a 5xx, a status that is
  not kept, a failure while streaming): the next retry runs the app again.
- ``L`` (locked): a retry is running the app, since ``F``, or since the first attempt's
  own mark expired; other retries wait until ``until`` (a bounded lock time).

No record at all, while the charge's decision is younger than the lock time, means the
first attempt is still running: its mark is the charge's own idempotency record, written
by the meter's check, so that a first request costs the backend nothing more before the
app runs (one ``EVALSHA`` on Redis). Every record belongs to one charge (its id): a
record of another charge of the same key (an earlier one, refunded or expired) is as
good as none. A record lives as long as the charge's own record, 24 hours from the
first attempt.

This is the reference of the rule; ``lua/response.lua`` is its one other
implementation, and ``tests/backends/test_conformance.py`` holds the two together.
"""

from __future__ import annotations

from typing import Final, NamedTuple

__all__ = [
    "BUSY",
    "DONE",
    "IDEMPOTENCY_US",
    "REUSED",
    "RUN",
    "Claim",
    "Held",
    "claim",
    "keep",
]

#: How long the meter keeps an idempotency key's first decision, and the response
#: records of its charge: 24 hours, in µs.
IDEMPOTENCY_US: Final = 24 * 3600 * 1_000_000

#: A claim's verdicts: run the app (the caller holds the mark now), wait (``detail``:
#: µs until the mark expires), refuse a different request under a used key, or answer
#: with the stored response (``detail``: its payload; empty when it was too large).
RUN: Final = 0
BUSY: Final = 1
REUSED: Final = 2
DONE: Final = 3

#: ``(verdict, detail)``: see :data:`RUN`.
Claim = tuple[int, "int | bytes | None"]


class Held(NamedTuple):
    """One response record (see the module's docstring)."""

    kind: str  # "D", "F" or "L"
    charge: str
    fingerprint: str
    #: who holds an ``L`` ("" for others)
    token: str
    #: when an ``L`` expires (µs; 0 for others)
    until: int
    #: a ``D``'s stored response (b"" for others, and for one too large to keep)
    payload: bytes
    #: when the record goes (µs): with the charge's own record
    expires: int


def claim(
    held: Held | None,
    charge: str,
    first_us: int,
    fingerprint: str,
    token: str,
    lock_us: int,
    now: int,
) -> tuple[Claim, Held | None]:
    """A retry of the charge ``charge`` (first decided at ``first_us``) asks to run: the
    verdict, and the record to write (None: leave it as it is)."""
    if held is not None and (held.charge != charge or held.expires <= now):
        held = None  # another charge's, or gone: as good as none
    if held is not None:
        if held.fingerprint != fingerprint:
            return (REUSED, None), None
        if held.kind == "D":
            return (DONE, held.payload), None
        if held.kind == "L" and held.until > now:
            return (BUSY, held.until - now), None
    elif first_us + lock_us > now:
        # The first attempt's own mark: its charge's record, younger than the lock time.
        return (BUSY, first_us + lock_us - now), None
    expires = first_us + IDEMPOTENCY_US
    if expires <= now:  # (the charge's own record is gone: nothing to hold)
        return (RUN, None), None
    return (RUN, None), Held("L", charge, fingerprint, token, now + lock_us, b"", expires)


def keep(
    held: Held | None,
    charge: str,
    first_us: int,
    fingerprint: str,
    token: str,
    payload: bytes | None,
    now: int,
) -> Held | None:
    """A run of the charge ``charge`` (``token``: "" for the first attempt) ended with
    ``payload`` to keep (None: nothing, the next retry may run): the record to write, or
    None to leave the record as it is (a response is kept already, or another retry took
    the mark over and still holds it, or the charge's record is gone)."""
    expires = first_us + IDEMPOTENCY_US
    if expires <= now:
        return None
    if held is not None and held.charge == charge and held.expires > now:
        if held.kind == "D":
            return None
        if held.kind == "L" and held.token != token and held.until > now:
            return None
    if payload is None:
        return Held("F", charge, fingerprint, "", 0, b"", expires)
    return Held("D", charge, fingerprint, "", 0, payload, expires)
