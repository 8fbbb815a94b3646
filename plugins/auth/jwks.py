"""Where the ``jwt`` provider's verification keys come from, and which key may check a token.

Four sources, exactly one per provider: a PEM public key or certificate, an HMAC secret
in an environment variable, or a JWK Set in a file or at a URL (what an OIDC provider
publishes at its ``jwks_uri``). A key is chosen by the token's ``kid``, and it must be of
the kind the token's algorithm needs: an algorithm never decides which kind of key checks
it, so an RSA public key can never become an HMAC secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from inferno.kernel import AuthError

#: The shortest HMAC secret accepted: RFC 7518 asks for a key as long as the hash (HS256).
MIN_SECRET_BYTES = 32
#: The smallest RSA modulus accepted, in bits.
MIN_RSA_BITS = 2048
#: The largest JWK Set read from a file or a URL.
MAX_JWKS_BYTES = 1 << 20
#: Seconds one fetch of a JWKS URL may take.
FETCH_TIMEOUT = 10.0
#: The kinds of JWK (``kty``) a key set may hold; shared secrets are never published.
PUBLISHED_KINDS = frozenset({"RSA", "EC", "OKP"})
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def key_kind(algorithm: str) -> str:
    """The JWK ``kty`` an algorithm needs: ``oct`` (HMAC), ``RSA``, ``EC`` or ``OKP``."""
    if algorithm.startswith("HS"):
        return "oct"
    if algorithm.startswith(("RS", "PS")):
        return "RSA"
    if algorithm.startswith("ES"):
        return "EC"
    if algorithm == "EdDSA":
        return "OKP"
    raise ValueError(f"unknown algorithm {algorithm!r}")


def kind_of(key: Any) -> str:
    """The JWK ``kty`` of a loaded key."""
    if isinstance(key, bytes):
        return "oct"
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "OKP"
    raise ValueError(f"{type(key).__name__} is not a public key jwt can verify with")


@dataclass(frozen=True)
class VerificationKey:
    """A key that may check signatures: its material, kind, id and (from a JWK) algorithm."""

    key: Any
    kind: str
    kid: str | None = None
    alg: str | None = None

    def __repr__(self) -> str:
        return f"VerificationKey(kind={self.kind!r}, kid={self.kid!r}, alg={self.alg!r})"

    def check_fits(self, algorithm: str) -> None:
        """Refuse a token whose algorithm this key is not meant for."""
        named = f"key {self.kid!r}" if self.kid else "the configured key"
        if self.alg is not None and self.alg != algorithm:
            raise AuthError(f"{named} is for {self.alg}, the token is signed with {algorithm}")
        if key_kind(algorithm) != self.kind:
            raise AuthError(f"{named} is an {self.kind} key and cannot verify {algorithm}")


def read_pem(path: Path) -> VerificationKey:
    """A public key, or a certificate's, from a PEM file; ``ValueError`` saying why not."""
    data = path.read_bytes()
    try:
        key: Any = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = x509.load_pem_x509_certificate(data).public_key()
        except ValueError:
            raise ValueError("holds no PEM public key or certificate (a private key is "
                             "refused: the server only verifies)") from None
    _check_strength(key)
    return VerificationKey(key, kind_of(key))


def read_secret(variable: str) -> VerificationKey:
    """The HMAC secret in environment variable ``variable``; ``ValueError`` saying why not."""
    value = os.environ.get(variable)
    if value is None:
        raise ValueError(f"environment variable {variable} is not set")
    secret = value.encode()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"environment variable {variable} holds {len(secret)} bytes; an HMAC "
                         f"secret needs at least {MIN_SECRET_BYTES}")
    return VerificationKey(secret, "oct")


def parse_jwks(data: bytes, log: Any = None) -> list[VerificationKey]:
    """The signing keys of a JWK Set; keys that are not for signatures, are shared secrets or
    are malformed are skipped (and logged). ``ValueError`` when the document is no key set."""
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError(f"is larger than {MAX_JWKS_BYTES} bytes")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"is not JSON ({exc})") from None
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError('is not a JWK Set (a JSON object with a "keys" list)')
    keys = []
    for index, entry in enumerate(document["keys"]):
        try:
            keys.append(_parse_jwk(entry))
        except ValueError as exc:
            if log is not None:
                log.warning("skipping a key of the JWK Set", index=index, reason=str(exc))
    return keys


def _parse_jwk(entry: Any) -> VerificationKey:
    if not isinstance(entry, Mapping):
        raise ValueError("is not a JSON object")
    kty, kid, alg = entry.get("kty"), entry.get("kid"), entry.get("alg")
    if kty not in PUBLISHED_KINDS:
        raise ValueError(f"kty {kty!r} is not one of {sorted(PUBLISHED_KINDS)}")
    if entry.get("use", "sig") != "sig":
        raise ValueError(f"use {entry.get('use')!r} is not 'sig'")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    if alg is not None and (not isinstance(alg, str) or alg == "none"):
        raise ValueError(f"alg {alg!r} is not a signature algorithm")
    try:
        key = jwt.PyJWK(dict(entry)).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"is not a valid {kty} key: {exc}") from None
    _check_strength(key)
    return VerificationKey(key, kind_of(key), kid, alg)


def _check_strength(key: Any) -> None:
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"is a {key.key_size}-bit RSA key; at least {MIN_RSA_BITS} are needed")
    kind_of(key)


def select(keys: Sequence[VerificationKey], kid: str | None) -> VerificationKey | None:
    """The key ``kid`` names; without a ``kid``, the only key there is."""
    if kid is None:
        return keys[0] if len(keys) == 1 else None
    return next((key for key in keys if key.kid == kid), None)


def unknown(kid: str | None, keys: Sequence[VerificationKey]) -> AuthError:
    if kid is None:
        return AuthError(f"the token names no key id (kid) and there are {len(keys)} keys")
    return AuthError(f"unknown key id {kid[:64]!r}")


def check_url(url: str) -> None:
    """Refuse a JWKS URL that a network attacker could answer in the provider's name."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname in LOOPBACK:
        return
    raise ValueError("must be an https:// URL (http:// only on the loopback interface)")


def shown_url(url: str) -> str:
    """The URL without credentials or query, for logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"


class StaticKey:
    """One key from the configuration (a PEM file or a secret), whatever the ``kid``."""

    def __init__(self, key: VerificationKey) -> None:
        self.key = key

    async def start(self) -> None:
        """Nothing to fetch: the key was read when the source was built."""

    async def stop(self) -> None:
        """Nothing to release."""

    async def key_for(self, kid: str | None) -> VerificationKey:
        return self.key


class JwksFile:
    """A JWK Set in a file, read again whenever the file changes (key rotation by
    replacing the file). A change that does not parse keeps the keys read before."""

    def __init__(self, path: Path, log: structlog.typing.FilteringBoundLogger) -> None:
        self.path, self.log = path, log
        self.keys: list[VerificationKey] = []
        self.stamp: tuple[int, int, int] | None = None

    async def start(self) -> None:
        self.stamp = self._stamp()
        self.keys = parse_jwks(await asyncio.to_thread(self.path.read_bytes), self.log)

    async def stop(self) -> None:
        """Nothing to release."""

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            status = self.path.stat()
        except OSError:
            return None
        return status.st_mtime_ns, status.st_size, status.st_ino

    async def key_for(self, kid: str | None) -> VerificationKey:
        stamp = self._stamp()
        if stamp is not None and stamp != self.stamp:
            self.stamp = stamp
            try:
                self.keys = parse_jwks(await asyncio.to_thread(self.path.read_bytes), self.log)
                self.log.info("read the JWK Set again", path=str(self.path),
                              kids=[key.kid for key in self.keys])
            except (OSError, ValueError) as exc:
                self.log.error("keeping the previous keys: the JWK Set file changed and "
                               "cannot be read", path=str(self.path), reason=str(exc))
        key = select(self.keys, kid)
        if key is None:
            raise unknown(kid, self.keys)
        return key


class JwksUrl:
    """A JWK Set fetched from a URL: at start, every ``refresh`` seconds, and when a token
    names an unknown ``kid`` (a key rotation), but never sooner than ``cooldown`` seconds
    after the last fetch, so a flood of made-up key ids cannot flood the identity
    provider. A failed fetch keeps the last good keys."""

    def __init__(self, url: str, *, refresh: float, cooldown: float,
                 log: structlog.typing.FilteringBoundLogger) -> None:
        self.url, self.refresh, self.cooldown, self.log = url, refresh, cooldown, log
        self.keys: list[VerificationKey] = []
        self.fetched_at = float("-inf")
        self.fetches = 0
        self.lock = asyncio.Lock()
        self.client: aiohttp.ClientSession | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Fetch the keys once; an identity provider that is down at start does not stop
        Inferno: tokens are refused until a fetch succeeds."""
        self.client = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT),
            headers={"Accept": "application/json"})
        await self.fetch("start")
        self.task = asyncio.create_task(self._refresh_forever(), name="jwks-refresh")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh)
            try:
                async with self.lock:
                    await self.fetch("scheduled")
            except Exception:  # a bug here must not end the refreshes for good
                self.log.exception("the scheduled JWK Set refresh failed")

    async def fetch(self, reason: str) -> bool:
        """Replace the keys with the URL's; on failure keep them and log why."""
        assert self.client is not None, "fetch before start"
        self.fetched_at = time.monotonic()
        self.fetches += 1
        try:
            async with self.client.get(self.url, allow_redirects=False) as response:
                if response.status != 200:
                    raise ValueError(f"answered HTTP {response.status}")
                data = bytearray()
                async for chunk in response.content.iter_chunked(1 << 16):
                    data += chunk
                    if len(data) > MAX_JWKS_BYTES:
                        raise ValueError(f"sent more than {MAX_JWKS_BYTES} bytes")
            keys = parse_jwks(bytes(data), self.log)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.log.error("cannot fetch the JWK Set; keeping the previous keys",
                           url=shown_url(self.url), reason=str(exc) or type(exc).__name__,
                           because=reason, keys=len(self.keys))
            return False
        self.keys = keys
        self.log.info("fetched the JWK Set", url=shown_url(self.url), because=reason,
                      kids=[key.kid for key in keys])
        return True

    async def key_for(self, kid: str | None) -> VerificationKey:
        key = select(self.keys, kid)
        if key is not None:
            return key
        seen = self.fetched_at
        if time.monotonic() - seen >= self.cooldown:
            async with self.lock:
                if self.fetched_at == seen:  # no one else fetched while this one waited
                    await self.fetch("unknown key id")
            key = select(self.keys, kid)
        if key is not None:
            return key
        if not self.keys:
            raise AuthError("the identity provider's signing keys are not available")
        raise unknown(kid, self.keys)


KeySource = StaticKey | JwksFile | JwksUrl
