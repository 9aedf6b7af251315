"""The dashboard's signed cookies: sessions, CSRF tokens and the one-time reveal."""

from __future__ import annotations

import base64

import pytest

from meterkit.admin._session import Signer
from meterkit.errors import ConfigurationError

SECRET = b"0123456789abcdef0123456789abcdef"
PLAINTEXT = "cl_live_4v9FB9iLnJGYZVRS5zmlwIXqbZ8OOe3Dacns4PrI7uRg3DvLB0"


def test_a_session_holds_the_key_id_and_ages_out() -> None:
    """The cookie names the key by id (never a plaintext), and is good until max_age."""
    signer = Signer(SECRET, 60)
    cookie, session = signer.session_cookie("key_4v9FB9iLnJGY", "org_1", 1000.0)
    payload = base64.urlsafe_b64decode(cookie.split(".")[0] + "==")
    assert b"key_4v9FB9iLnJGY" in payload
    assert signer.session(cookie, 1000.0) == session
    assert signer.session(cookie, 1059.9) == session
    assert signer.session(cookie, 1060.0) is None
    assert signer.session(cookie, 999.0) is None


@pytest.mark.parametrize("damage", ["flip", "other-secret", "swap", "garbage", "long"])
def test_a_tampered_or_foreign_cookie_is_no_session(damage: str) -> None:
    """A changed byte, another app's secret, a payload with another's tag, junk or a
    huge cookie give no session."""
    signer = Signer(SECRET, 60)
    cookie, _ = signer.session_cookie("key_4v9FB9iLnJGY", "org_1", 1000.0)
    other, _ = signer.session_cookie("key_000000000000", "org_2", 1000.0)
    body, tag = cookie.split(".")
    forged = {
        "flip": body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + tag,
        "other-secret": Signer(SECRET[::-1], 60).session_cookie(
            "key_4v9FB9iLnJGY", "org_1", 1000.0
        )[0],
        "swap": other.split(".")[0] + "." + tag,
        "garbage": "not.a-cookie!",
        "long": "A" * 5000 + "." + tag,
    }[damage]
    assert signer.session(forged, 1000.0) is None


def test_secrets_and_ages_are_checked() -> None:
    """A secret under 32 bytes, or a non-positive age, is a configuration error."""
    with pytest.raises(ConfigurationError, match="32"):
        Signer(b"short", 60)
    with pytest.raises(ConfigurationError, match="session_max_age"):
        Signer(SECRET, 0)
    assert Signer(None, 60) is not None  # a random secret of its own


def test_csrf_tokens_belong_to_their_session() -> None:
    """A session's token passes for it and not for another; sign-in tokens likewise
    for their nonce."""
    signer = Signer(SECRET, 60)
    _, one = signer.session_cookie("key_4v9FB9iLnJGY", "org_1", 1000.0)
    _, two = signer.session_cookie("key_4v9FB9iLnJGY", "org_1", 1000.0)
    assert signer.csrf_ok(one, signer.csrf_token(one))
    assert not signer.csrf_ok(two, signer.csrf_token(one))
    assert not signer.csrf_ok(one, None)
    assert signer.sign_in_ok("nonce", signer.sign_in_token("nonce"))
    assert not signer.sign_in_ok("other", signer.sign_in_token("nonce"))
    assert not signer.sign_in_ok(None, signer.sign_in_token("nonce"))


def test_a_revealed_key_needs_both_shares_of_its_session() -> None:
    """Neither share holds the plaintext; together, for the session that made them,
    they give it back; with another session, a share of another reveal, or one
    missing, nothing."""
    signer = Signer(SECRET, 60)
    _, session = signer.session_cookie("key_4v9FB9iLnJGY", "org_1", 1000.0)
    _, other = signer.session_cookie("key_4v9FB9iLnJGY", "org_1", 1000.0)
    cookie, share = signer.reveal_shares(PLAINTEXT, session)
    cookie2, share2 = signer.reveal_shares(PLAINTEXT, session)
    for part in (cookie, share):
        decoded = base64.urlsafe_b64decode(part.split(".")[0] + "==")
        assert PLAINTEXT.encode() not in decoded
        assert PLAINTEXT not in part
    assert share != share2  # a fresh pad each time
    assert signer.revealed(cookie, share, session) == PLAINTEXT
    assert signer.revealed(cookie, share, other) is None
    assert signer.revealed(cookie, share2, session) is None
    assert signer.revealed(cookie2, share, session) is None
    assert signer.revealed(None, share, session) is None
    assert signer.revealed(cookie, None, session) is None
