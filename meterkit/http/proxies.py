"""Whose ``X-Forwarded-Proto`` (and ``-For``) is believed, and the paths that are not
metered at all."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

from meterkit.errors import (
    ConfigurationError,
)

if TYPE_CHECKING:
    pass

# -- proxies and exclusions ------------------------------------------------------------


class Proxies:
    """Addresses whose ``X-Forwarded-*`` headers are believed: IPs, networks, or ``*``."""

    __slots__ = ("addresses", "anyone", "networks")

    def __init__(self, trusted: Iterable[str]) -> None:
        if isinstance(trusted, str):
            trusted = [trusted]
        if not isinstance(trusted, Iterable):
            raise ConfigurationError(
                "trusted_proxies is a list of IP addresses or networks", "trusted_proxies"
            )
        self.anyone = False
        self.addresses: set[str] = set()
        networks = []
        for i, entry in enumerate(trusted):
            if not isinstance(entry, str):
                raise ConfigurationError(
                    f"a trusted proxy is an IP address or network, not {entry!r}",
                    f"trusted_proxies[{i}]",
                )
            entry = entry.strip()
            if entry == "*":
                self.anyone = True
                continue
            try:
                if "/" in entry:
                    networks.append(ipaddress.ip_network(entry, strict=False))
                else:
                    # Both the given spelling and the canonical one, for a set lookup.
                    self.addresses.add(entry)
                    self.addresses.add(str(ipaddress.ip_address(entry)))
            except ValueError:
                raise ConfigurationError(
                    f"{entry!r} is not an IP address or network", f"trusted_proxies[{i}]"
                ) from None
        self.networks = tuple(networks)

    def __contains__(self, peer: str | None) -> bool:
        if peer is None:
            return False
        if self.anyone or peer in self.addresses:
            return True
        if not self.networks:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self.networks)


def forwarded_https(value: str) -> bool:
    """Whether every proxy hop listed in ``X-Forwarded-Proto`` says ``https``.

    A chain such as ``https, http`` is refused: some hop spoke plain HTTP, or a client
    made up the first value, and either way the request cannot be called secure.
    """
    return all(part.strip().lower() == "https" for part in value.split(","))


def exclusions(exclude: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    if isinstance(exclude, str):
        exclude = [exclude]
    if not isinstance(exclude, Iterable):
        raise ConfigurationError("exclude is a list of paths", "exclude")
    exact: set[str] = set()
    prefixes: list[str] = []
    for i, path in enumerate(exclude):
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigurationError(
                f"an excluded path starts with '/' (add '*' for a prefix), not {path!r}",
                f"exclude[{i}]",
            )
        if path.endswith("*"):
            prefixes.append(path[:-1])
        else:
            exact.add(path)
    return frozenset(exact), tuple(prefixes)
