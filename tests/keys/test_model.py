"""API keys without a store: the format, hashing, the record, errors and configuration."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import os
import re
import subprocess
import sys
import threading
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterkit.connect import async_keystore_from_url, keystore_from_url
from meterkit.errors import (
    AuthenticationError,
    ConfigurationError,
    InvalidRequestError,
    MeterkitError,
)
from meterkit.keys import rules as rules_module
from meterkit.keys.memory import AsyncMemoryKeyStore, MemoryKeyStore
from meterkit.keys.model import (
    ALPHABET,
    CHECK_CHARS,
    ID_CHARS,
    SECRET_CHARS,
    ApiKey,
    KeyFormat,
    to_duration,
    to_timestamp,
)
from meterkit.keys.rules import _Hasher

REPO = Path(__file__).resolve().parents[2]
prefixes = st.from_regex(r"[a-z][a-z0-9]{0,15}", fullmatch=True)
modes = st.sampled_from(["live", "test"])
id_parts = st.text(ALPHABET, min_size=ID_CHARS, max_size=ID_CHARS)
secret_parts = st.text(ALPHABET, min_size=SECRET_CHARS, max_size=SECRET_CHARS)


def _record(**changes: Any) -> ApiKey:
    fields: dict[str, Any] = {
        "id": "key_AAAAAAAAAAAA",
        "org": "org_1",
        "mode": "live",
        "permissions": ("invoices:read",),
        "created_at": 1.0,
        "secret_hash": "ab" * 32,
        "last_four": "wxyz",
    }
    fields.update(changes)
    return ApiKey(**fields)


# --- format ------------------------------------------------------------------------------------


@given(prefix=prefixes, mode=modes, id_part=id_parts, secret=secret_parts)
def test_every_composed_key_is_well_formed(
    prefix: str, mode: Any, id_part: str, secret: str
) -> None:
    """Any prefix, mode, id and secret compose into a key its format accepts."""
    fmt = KeyFormat(prefix)
    token = fmt.compose(mode, id_part, secret)
    assert token.startswith(f"{prefix}_{mode}_")
    assert len(token) == fmt.length
    assert fmt.is_well_formed(token)
    assert fmt.key_id(token) == "key_" + id_part


def test_generated_keys_are_well_formed_distinct_and_carry_160_bits() -> None:
    """Generated keys validate, never repeat, and their secret holds at least 160 bits."""
    fmt = KeyFormat()
    tokens = {fmt.generate("live") for _ in range(500)} | {fmt.generate("test") for _ in range(500)}
    assert len(tokens) == 1000
    assert all(fmt.is_well_formed(token) for token in tokens)
    assert SECRET_CHARS * math.log2(62) >= 160
    assert len({token[8:20] for token in tokens}) == 1000  # ids do not collide either


@given(prefix=prefixes, mode=modes, id_part=id_parts, secret=secret_parts, data=st.data())
def test_one_changed_character_or_a_truncation_breaks_the_key(
    prefix: str, mode: Any, id_part: str, secret: str, data: st.DataObject
) -> None:
    """CRC32 catches every single-character change and every truncation of a key."""
    fmt = KeyFormat(prefix)
    token = fmt.compose(mode, id_part, secret)
    position = data.draw(st.integers(0, len(token) - 1))
    other = data.draw(st.characters(codec="utf-8").filter(lambda c: c != token[position]))
    assert not fmt.is_well_formed(token[:position] + other + token[position + 1 :])
    assert not fmt.is_well_formed(token[:position])
    assert not fmt.is_well_formed(token + other)


def test_the_checksum_is_the_crc32_of_the_rest_in_base62() -> None:
    """The last six characters are CRC32(everything before them) in base62."""
    token = KeyFormat().generate("live")
    value = 0
    for char in token[-CHECK_CHARS:]:
        value = value * 62 + ALPHABET.index(char)
    assert value == zlib.crc32(token[:-CHECK_CHARS].encode())


def test_the_scanner_pattern_finds_keys_and_the_checksum_confirms_them() -> None:
    """KeyFormat.pattern finds keys in text; is_well_formed tells real ones from lookalikes."""
    fmt = KeyFormat("cl")
    real = fmt.generate("test")
    fake = real[:-1] + ("0" if real[-1] != "0" else "1")
    text = f"export KEY={real}\nother={fake}, not_a_key=cl_live_short"
    found = re.findall(fmt.pattern, text)
    assert found == [real, fake]
    assert [token for token in found if fmt.is_well_formed(token)] == [real]


@pytest.mark.parametrize("prefix", ["", "CL", "c_l", "1cl", "x" * 17, "c l", 5, None])
def test_a_bad_token_prefix_is_a_configuration_error(prefix: Any) -> None:
    """The prefix must be 1-16 lowercase letters or digits starting with a letter."""
    with pytest.raises(ConfigurationError):
        KeyFormat(prefix)
    with pytest.raises(ConfigurationError):
        MemoryKeyStore(token_prefix=prefix)


def test_is_well_formed_refuses_non_strings() -> None:
    """Anything but a string is not a key."""
    fmt = KeyFormat()
    assert not any(fmt.is_well_formed(value) for value in (None, 5, b"cl_live_", ["x"]))


# --- hashing -----------------------------------------------------------------------------------


@given(pepper=st.binary(min_size=16, max_size=200), mode=modes)
def test_hashes_are_hmac_sha256_under_the_pepper(pepper: bytes, mode: Any) -> None:
    """With a pepper, the stored hash is exactly HMAC-SHA256(pepper, plaintext)."""
    token = KeyFormat().generate(mode)
    expected = hmac.new(pepper, token.encode(), hashlib.sha256).hexdigest()
    assert _Hasher(pepper)(token) == expected


def test_hashes_are_sha256_without_a_pepper_and_str_peppers_are_utf8() -> None:
    """Without a pepper the hash is SHA-256; a str pepper is its UTF-8 bytes."""
    token = KeyFormat().generate("live")
    assert _Hasher(None)(token) == hashlib.sha256(token.encode()).hexdigest()
    assert _Hasher("pépper-of-16-bytes")(token) == _Hasher("pépper-of-16-bytes".encode())(token)


@pytest.mark.parametrize("pepper", [b"short", "", 12345, b"x" * 15])
def test_a_short_or_odd_pepper_is_a_configuration_error(pepper: Any) -> None:
    """A pepper must be at least 16 bytes (or absent)."""
    with pytest.raises(ConfigurationError):
        MemoryKeyStore(pepper=pepper)


def test_a_memory_store_with_a_pepper_stores_the_hmac(clock: Any) -> None:
    """The record's secret_hash is the HMAC of the plaintext under the store's pepper."""
    pepper = b"0123456789abcdef-pepper"
    store = MemoryKeyStore(clock=clock, pepper=pepper)
    plaintext, key = store.create(org="org_1")
    assert key.secret_hash == hmac.new(pepper, plaintext.encode(), hashlib.sha256).hexdigest()
    assert store.authenticate(f"Bearer {plaintext}", org="org_1").id == key.id


@pytest.mark.parametrize(
    ("pepper", "previous"),
    [
        (b"0123456789abcdef", b"fedcba9876543210"),  # one pepper, not a list of them
        (b"0123456789abcdef", "fedcba9876543210"),
        (b"0123456789abcdef", [b"short"]),
        (b"0123456789abcdef", [b"0123456789abcdef"]),  # the current pepper
        (None, [None]),
        (b"0123456789abcdef", [b"fedcba9876543210", "fedcba9876543210"]),  # twice
        (b"0123456789abcdef", 5),
    ],
)
def test_odd_previous_peppers_are_configuration_errors(pepper: Any, previous: Any) -> None:
    """previous_peppers is a list of distinct valid peppers (or None), none the current one."""
    with pytest.raises(ConfigurationError) as caught:
        MemoryKeyStore(pepper=pepper, previous_peppers=previous)
    assert caught.value.location == "previous_peppers"
    assert "fedcba" not in str(caught.value)
    assert "0123456" not in str(caught.value)


@pytest.mark.parametrize("old", [b"the-pepper-being-retired", None], ids=["pepper", "none"])
def test_a_memory_store_moves_keys_of_a_previous_pepper_to_the_current_one(
    clock: Any, old: bytes | None
) -> None:
    """A key hashed under a previous pepper is admitted and rehashed under the current
    one; its revocation and other fields stay, and an unknown pepper's key is refused."""
    new = b"the-pepper-taking-over!!"
    before = MemoryKeyStore(clock=clock, pepper=old)
    plaintext, key = before.create(org="org_1", permissions=["invoices:read"])
    revoked_plain, revoked = before.create(org="org_1")
    before.revoke(revoked.id)
    rotating = MemoryKeyStore(clock=clock, pepper=new, previous_peppers=[old])
    rotating._records, rotating._by_org = before._records, before._by_org  # the same data
    clock.advance(5)
    admitted = rotating.authenticate(f"Bearer {plaintext}", org="org_1", permission="invoices:read")
    expected = hmac.new(new, plaintext.encode(), hashlib.sha256).hexdigest()
    assert admitted.secret_hash == expected == rotating.get(key.id).secret_hash  # type: ignore[union-attr]
    assert admitted.last_used_at == clock()
    assert msgspec.structs.replace(admitted, secret_hash=key.secret_hash, last_used_at=None) == key
    with pytest.raises(AuthenticationError):
        before.authenticate(f"Bearer {plaintext}", org="org_1")
    with pytest.raises(AuthenticationError):
        rotating.authenticate(f"Bearer {revoked_plain}", org="org_1")
    assert rotating.get(revoked.id).revoked_at is not None  # type: ignore[union-attr]
    stranger_plain, stranger = MemoryKeyStore(pepper=b"a-third-pepper-nobody-has").create(
        org="org_1"
    )
    rotating._records[stranger.id] = stranger
    with pytest.raises(AuthenticationError):
        rotating.authenticate(f"Bearer {stranger_plain}", org="org_1")
    assert rotating.get(stranger.id) == stranger


# --- the record --------------------------------------------------------------------------------


def test_repr_and_str_of_a_record_show_the_id_and_last_four_never_the_hash() -> None:
    """repr/str/rich repr of ApiKey show the id and last four characters, not the hash."""
    key = _record()
    for text in (repr(key), str(key), repr(list(key.__rich_repr__()))):
        assert "key_AAAAAAAAAAAA" in text
        assert "wxyz" in text
        assert "ab" * 32 not in text
        assert "secret_hash" not in text
    assert str(key) == "key_AAAAAAAAAAAA (…wxyz)"


def test_the_plaintext_repr_shows_only_prefix_and_last_four(clock: Any) -> None:
    """A PlaintextKey is the key as str, but repr (alone or in a tuple) hides the secret."""
    store = MemoryKeyStore(clock=clock)
    created = store.create(org="org_1")
    plaintext, _key = created
    assert isinstance(plaintext, str)
    assert str(plaintext) == plaintext
    assert len(plaintext) == 58
    for text in (repr(plaintext), repr(created), f"{created!r}", repr([plaintext])):
        assert plaintext not in text
        assert plaintext[8:-4] not in text
    assert repr(plaintext) == f"PlaintextKey('cl_live_…{plaintext[-4:]}')"
    assert type(str(plaintext)) is str


def test_records_are_immutable() -> None:
    """An ApiKey cannot be changed in place."""
    key = _record()
    with pytest.raises(AttributeError):
        key.org = "org_2"  # type: ignore[misc]


def test_the_meter_reads_id_org_and_mode() -> None:
    """Meter.check(key=api_key) relies on the attribute names id, org and mode."""
    key = _record(mode="test")
    assert (key.id, key.org, key.mode) == ("key_AAAAAAAAAAAA", "org_1", "test")


def test_records_round_trip_through_msgspec() -> None:
    """An ApiKey encodes and decodes losslessly with msgspec (mode is validated)."""
    key = _record(expires_at=2.5, name="ci")
    assert msgspec.json.decode(msgspec.json.encode(key), type=ApiKey) == key
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode(key).replace(b'"live"', b'"prod"'), type=ApiKey)


def test_grants_and_status_of_a_record() -> None:
    """ApiKey.grants follows the wildcard rules and status tells active/expired/revoked."""
    key = _record(permissions=("invoices:*", "reports:read"), expires_at=10.0)
    assert key.grants("invoices:void")
    assert key.grants("reports:read")
    assert not key.grants("reports:create")
    assert not key.grants("*")
    assert _record(permissions=("*",)).grants("anything:at_all")
    with pytest.raises(InvalidRequestError):
        key.grants("not a permission")
    assert (key.status(9.9), key.status(10.0)) == ("active", "expired")
    assert _record(revoked_at=1.0).status(0.0) == "revoked"


# --- times -------------------------------------------------------------------------------------


def test_times_and_durations_accept_datetimes_timedeltas_and_seconds() -> None:
    """Aware datetimes in any zone and numbers are UNIX seconds; timedeltas are seconds."""
    plus_two = timezone(timedelta(hours=2))
    assert to_timestamp(datetime(2026, 1, 1, 2, tzinfo=plus_two), "t") == 1_767_225_600.0
    assert to_timestamp(datetime(2026, 1, 1, tzinfo=timezone.utc), "t") == 1_767_225_600.0
    assert to_timestamp(1_767_225_600, "t") == 1_767_225_600.0
    assert to_duration(timedelta(minutes=2), "d") == to_duration(120, "d") == 120.0
    for bad in (datetime(2026, 1, 1), True, "1", float("nan"), None):
        with pytest.raises(InvalidRequestError):
            to_timestamp(bad, "t")
    for bad_duration in (-1, timedelta(seconds=-1), float("inf"), "60"):
        with pytest.raises(InvalidRequestError):
            to_duration(bad_duration, "d")


# --- errors and configuration ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("invalid_api_key", "The provided API key is invalid or expired"),
        ("expired_api_key", "The provided API key has expired"),
        ("insufficient_permissions", "The API key lacks permission for the requested operation"),
        ("organization_not_found", "The organization does not exist or is not accessible"),
    ],
)
def test_authentication_errors_have_the_seed_shape(code: str, message: str) -> None:
    """Each code's body is the seed's shape with type authentication_error and status 401."""
    error = AuthenticationError(code)
    assert isinstance(error, MeterkitError)
    assert error.body == {
        "error": {"type": "authentication_error", "code": code, "message": message, "status": 401}
    }


@pytest.mark.parametrize(
    "codes",
    [
        {"nope": 403},
        {"invalid_api_key": 200},
        {"invalid_api_key": True},
        {"invalid_api_key": "401"},
        {"expired_api_key": 600},
    ],
    ids=repr,
)
def test_bad_status_codes_are_configuration_errors(codes: Any) -> None:
    """status_codes accepts only the four codes, each mapped to a 4xx/5xx integer."""
    with pytest.raises(ConfigurationError):
        MemoryKeyStore(status_codes=codes)


def test_the_clock_must_be_callable() -> None:
    """A clock that is not callable is refused at construction."""
    with pytest.raises(ConfigurationError):
        MemoryKeyStore(clock=12.0)  # type: ignore[arg-type]


def test_keystore_from_url_makes_memory_stores(clock: Any) -> None:
    """memory:// gives a MemoryKeyStore (or its async shell) with the options given."""
    store = keystore_from_url("memory://", clock=clock, token_prefix="acme")
    assert isinstance(store, MemoryKeyStore)
    assert store.create(org="org_1")[0].startswith("acme_live_")
    assert isinstance(async_keystore_from_url("memory://"), AsyncMemoryKeyStore)


@pytest.mark.parametrize(
    "url",
    ["memory://somewhere", "postgres://db/keys", "", "nothing", 5],
)
def test_unsupported_urls_are_configuration_errors(url: Any) -> None:
    """Unknown schemes and memory URLs with a host are refused."""
    with pytest.raises(ConfigurationError):
        keystore_from_url(url)
    with pytest.raises(ConfigurationError):
        async_keystore_from_url(url)


def test_meterkit_keys_work_without_redis_installed() -> None:
    """With redis unimportable, the modules import, memory stores work, Redis URLs explain."""
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'redis' or name.startswith('redis.'):\n"
        "            raise ImportError('blocked for this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import meterkit.connect as keys, meterkit.keys.redis\n"
        "store = keys.keystore_from_url('memory://')\n"
        "plaintext, key = store.create(org='org_1')\n"
        "assert store.authenticate('Bearer ' + plaintext, org='org_1').id == key.id\n"
        "try:\n"
        "    keys.keystore_from_url('redis://127.0.0.1:1/0')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "assert 'redis' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ConfigurationError")
    assert "pip install" in done.stdout


# --- the memory store --------------------------------------------------------------------------


def test_a_key_is_unknown_to_another_memory_store(clock: Any) -> None:
    """Memory stores share nothing: a key of one is invalid in another."""
    plaintext, _ = MemoryKeyStore(clock=clock).create(org="org_1")
    with pytest.raises(AuthenticationError) as caught:
        MemoryKeyStore(clock=clock).authenticate(f"Bearer {plaintext}", org="org_1")
    assert caught.value.code == "invalid_api_key"


def test_concurrent_authentication_never_undoes_a_revocation() -> None:
    """Recording uses from many threads cannot bring back a key revoked meanwhile."""
    store = MemoryKeyStore()
    plaintext, key = store.create(org="org_1")
    header = f"Bearer {plaintext}"
    revoked = threading.Event()

    def use() -> None:
        while not revoked.is_set():
            with contextlib.suppress(AuthenticationError):
                store.authenticate(header, org="org_1")
        for _ in range(200):
            with pytest.raises(AuthenticationError):
                store.authenticate(header, org="org_1")

    threads = [threading.Thread(target=use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(2000):
        store.authenticate(header, org="org_1")
    store.revoke(key.id)
    revoked.set()
    for thread in threads:
        thread.join()
    record = store.get(key.id)
    assert record is not None
    assert record.revoked_at is not None
    assert repr(store) == "MemoryKeyStore(token_prefix='cl')"


def test_read_headers_are_remembered_by_hash_within_a_bound_and_never_in_plaintext(
    clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header is parsed and hashed once (its answer is a function of the header), kept
    under the SHA-256 of the header, at most HEADERS_REMEMBERED of them; a key revoked
    after its header was remembered is refused at once (the record is read every time)."""
    monkeypatch.setattr(rules_module, "HEADERS_REMEMBERED", 3)
    store = MemoryKeyStore(clock=clock)
    made = [store.create(org="org_1", permissions=["*"]) for _ in range(5)]
    rules = store.rules
    calls = []
    parse = rules_module.KeyRules._parse

    def counted(self: Any, header: object) -> Any:
        calls.append(header)
        return parse(self, header)

    monkeypatch.setattr(rules_module.KeyRules, "_parse", counted)
    first = f"Bearer {made[0][0]}"
    for header in (first, first.encode(), first):
        assert store.authenticate(header, org="org_1").id == made[0][1].id
    assert len(calls) == 1  # (str and bytes of the same ASCII header are one entry)
    assert list(rules._read) == [hashlib.blake2s(first.encode()).digest()]
    for plaintext, _ in made[1:]:
        store.authenticate(f"Bearer {plaintext}".encode(), org="org_1")
    assert len(rules._read) == 3  # the oldest went first
    assert hashlib.blake2s(first.encode()).digest() not in rules._read
    for plaintext, _ in made:
        assert not any(plaintext.encode() in seen for seen in rules._read)
    store.revoke(made[4][1].id)
    with pytest.raises(AuthenticationError) as refused:
        store.authenticate(f"Bearer {made[4][0]}", org="org_1")
    assert refused.value.code == "invalid_api_key"
    # A malformed header is refused every time, and never remembered; one longer than
    # a header can be is refused before anything hashes it.
    for _ in range(2):
        with pytest.raises(AuthenticationError):
            store.authenticate("Bearer cl_live_nope", org="org_1")
    hashed = []

    def counting(data: bytes) -> Any:
        hashed.append(len(data))
        return hashlib.blake2s(data)

    monkeypatch.setattr(rules_module, "blake2s", counting)
    with pytest.raises(AuthenticationError):
        store.authenticate("Bearer " + "x" * 5000, org="org_1")
    assert hashed == []
    assert len(rules._read) == 3
