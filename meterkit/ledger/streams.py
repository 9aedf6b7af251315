"""Which Redis Stream an organization's events go to, and how a drain finds them.

A check's script may only touch keys of one Cluster hash slot: the organization's
(every key of it carries the organization as hash tag, ``mk:{org}:…``). So its
event must go to a stream in that slot. Two choices were open:

- a stream per organization (``mk:{org}:ledger``): a drain must then learn of every
  organization (millions, perhaps) and read each stream on its own;
- a stream per hash slot, which is what meterkit does on **Cluster**: the stream of
  slot *s* is ``mk:{ledger.<n>}:ledger``, *n* being the smallest number whose tag
  ``ledger.<n>`` hashes to *s*. Every organization of a slot shares it, so there are
  at most 16,384 streams whatever the number of organizations, a drain knows all
  their names in advance, and one read brings the events of many organizations.
  A slot's stream moves with its slot when the cluster is resharded.

On a **standalone** server every key is in reach, and there is one stream,
``mk:ledger``: one read brings everyone's events.

Organizations of one slot share a stream's order, which is the order the server
ran their scripts in; a drain keeps it within each stream.
"""

from __future__ import annotations

import binascii
from functools import cache

__all__ = ["SLOTS", "STANDALONE", "cluster_streams", "slot_of", "slot_stream", "stream_for"]

SLOTS = 16_384
#: The stream of a standalone server, after the prefix.
STANDALONE = "ledger"


def slot_of(key: str) -> int:
    """The Cluster hash slot of ``key`` (its hash tag's, when it has one)."""
    data = key.encode("utf-8")
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS


@cache
def _slot_tags() -> tuple[str, ...]:
    """For each slot, the first tag ``ledger.<n>`` that hashes to it (made once,
    about 170,000 CRCs: a tenth of a second)."""
    tags: list[str | None] = [None] * SLOTS
    missing = SLOTS
    n = 0
    crc = binascii.crc_hqx
    while missing:
        tag = f"ledger.{n}"
        slot = crc(tag.encode(), 0) % SLOTS
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
        n += 1
    return tuple(t for t in tags if t is not None)


def slot_stream(prefix: str, slot: int) -> str:
    """The name of the stream of hash slot ``slot`` on Cluster."""
    return f"{prefix}:{{{_slot_tags()[slot]}}}:ledger"


def stream_for(prefix: str, base: str, cluster: bool) -> str:
    """The stream the events of the organization whose keys start with ``base``
    (``mk:{org}:``) go to."""
    if not cluster:
        return f"{prefix}:{STANDALONE}"
    return slot_stream(prefix, slot_of(base))


def cluster_streams(prefix: str) -> list[str]:
    """Every stream a Cluster may hold, one per slot, in slot order."""
    return [slot_stream(prefix, slot) for slot in range(SLOTS)]
