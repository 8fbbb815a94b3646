"""The jwt auth provider, built by the kernel from a profile: which tokens it accepts, which it
refuses and why, where its keys come from, and what it refuses to be configured as."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from structlog.testing import capture_logs

from inferno.kernel import AuthError, ConfigError, Credentials

ISSUER = "https://idp.example.com/realms/inferno"
AUDIENCE = "inferno"
SECRET_VARIABLE = "JWT_TEST_SECRET"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(private: rsa.RSAPrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


def jwk(private: rsa.RSAPrivateKey, kid: str, **extra: str) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(private.public_key(), as_dict=True), "kid": kid, "use": "sig",
            **extra}


def write_jwks(path: Path, *keys: dict[str, Any]) -> Path:
    """Replace ``path`` as an operator rotating keys should: write aside, then rename."""
    aside = path.with_suffix(".new")
    aside.write_text(json.dumps({"keys": list(keys)}))
    os.replace(aside, path)
    return path


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 600}
    return {name: value for name, value in {**base, **changes}.items() if value is not None}


def sign(private: Any, kid: str | None = "k1", alg: str = "RS256", **changes: Any) -> str:
    return jwt.encode(claims(**changes), private, algorithm=alg,
                      headers={"kid": kid} if kid else None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A token made by hand: PyJWT refuses to make the forgeries an attacker would."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    mac = b"" if secret is None else hmac.new(secret, signing_input.encode(),
                                              hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def tampered(token: str) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{b64(json.dumps(claims(sub='admin')).encode())}.{signature}"


def bearer(token: str) -> Credentials:
    return Credentials({"authorization": f"Bearer {token}"}, peer="127.0.0.1")


@pytest.fixture
def provider(make_kernel: Callable[..., Any]) -> Callable[..., Any]:
    """``async with provider(**settings) as jwt_auth``: the kernel's running jwt driver."""

    @asynccontextmanager
    async def start(**settings: Any) -> AsyncIterator[Any]:
        section = {"algorithms": ["RS256"], "issuer": ISSUER, "audience": AUDIENCE, **settings}
        kernel = make_kernel({"auth": {"jwt": section}})
        async with kernel.running(protocols=False):
            yield kernel.drivers("auth")["jwt"]

    return start


class JwksServer:
    """An identity provider's JWKS endpoint on loopback that counts its fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.status = 200
        self.fetches = 0
        self.changed = asyncio.Condition()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        async with self.changed:
            self.fetches += 1
            self.changed.notify_all()
        if self.status != 200:
            return web.Response(status=self.status)
        return web.json_response({"keys": self.keys})

    async def fetched(self, count: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.fetches >= count)


@pytest.fixture
async def jwks_server(key: rsa.RSAPrivateKey) -> AsyncIterator[JwksServer]:
    server = JwksServer()
    server.keys = [jwk(key, "k1")]
    app = web.Application()
    app.router.add_get("/certs", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/certs"
    yield server
    await runner.cleanup()


# --------------------------------------------------------------------------- accepted


async def test_a_token_verifies_against_the_jwks_an_identity_provider_serves(
        provider, jwks_server, key):
    async with provider(jwks_url=jwks_server.url) as jwt_auth:
        principal = await jwt_auth.authenticate(bearer(sign(key, roles=["user"])))
    assert principal.id == "jwt:alice"
    assert principal.roles == {"user"}
    assert principal.attributes == {"provider": "jwt", "issuer": ISSUER, "subject": "alice"}


async def test_a_token_verifies_against_a_jwks_file(provider, key, tmp_path):
    path = write_jwks(tmp_path / "jwks.json", jwk(key, "k1"))
    async with provider(jwks_file=str(path)) as jwt_auth:
        principal = await jwt_auth.authenticate(bearer(sign(key)))
    assert principal.id == "jwt:alice"


async def test_a_token_verifies_against_a_pem_public_key(provider, key, tmp_path):
    (tmp_path / "idp.pem").write_bytes(pem(key))
    async with provider(public_key_file=str(tmp_path / "idp.pem")) as jwt_auth:
        principal = await jwt_auth.authenticate(bearer(sign(key, kid=None)))
    assert principal.id == "jwt:alice"


async def test_an_hs256_token_verifies_with_the_secret_in_the_environment(provider,
                                                                           monkeypatch):
    secret = "kq3Zt7pX2mV9wR4yB8nC1dF6gH0jL5sA"
    monkeypatch.setenv(SECRET_VARIABLE, secret)
    async with provider(algorithms=["HS256"], secret_env=SECRET_VARIABLE) as jwt_auth:
        principal = await jwt_auth.authenticate(bearer(sign(secret.encode(), alg="HS256")))
        with pytest.raises(AuthError, match="signature invalid"):
            await jwt_auth.authenticate(bearer(sign(b"x" * 32, alg="HS256")))
    assert principal.id == "jwt:alice"


@pytest.mark.parametrize("headers", [
    {}, {"authorization": "Basic dXNlcjpwYXNz"}, {"authorization": "Bearer inf_abc.def.ghi"},
    {"authorization": "Bearer an-opaque-token"}, {"authorization": "Bearer a.b.c.d.e"}],
    ids=["none", "basic", "api-key", "opaque", "jwe"])
async def test_credentials_that_are_no_signed_jwt_are_left_to_other_providers(
        provider, key, tmp_path, headers):
    (tmp_path / "idp.pem").write_bytes(pem(key))
    async with provider(public_key_file=str(tmp_path / "idp.pem")) as jwt_auth:
        assert await jwt_auth.authenticate(Credentials(headers)) is None


# --------------------------------------------------------------------------- refused


def none_algorithm(key: Any, other: Any) -> str:
    return forge({"alg": "none", "typ": "JWT"}, claims(), None)


def hs256_signed_with_the_public_key(key: Any, other: Any) -> str:
    return forge({"alg": "HS256", "typ": "JWT", "kid": "k1"}, claims(), pem(key))


NOW = int(time.time())
REFUSALS: dict[str, tuple[Callable[[Any, Any], str], str]] = {
    "alg-none": (none_algorithm, "algorithm 'none' is not allowed"),
    "hs256-with-rsa-public-key": (hs256_signed_with_the_public_key,
                                  "algorithm 'HS256' is not allowed"),
    "expired": (lambda k, o: sign(k, exp=NOW - 3600, iat=NOW - 7200), "token expired at 20"),
    "not-yet-valid": (lambda k, o: sign(k, nbf=NOW + 3600), "token not valid before 20"),
    "issued-in-the-future": (lambda k, o: sign(k, iat=NOW + 3600), r"issued in the future"),
    "wrong-audience": (lambda k, o: sign(k, aud="another-service"), "wrong audience"),
    "wrong-issuer": (lambda k, o: sign(k, iss="https://evil.example.com"), "wrong issuer"),
    "tampered-payload": (lambda k, o: tampered(sign(k)), "signature invalid"),
    "signed-by-another-key": (lambda k, o: sign(o), "signature invalid"),
    "unknown-kid": (lambda k, o: sign(o, kid="k9"), "unknown key id 'k9'"),
    "algorithm-not-allowed": (lambda k, o: sign(k, alg="RS512"),
                              "algorithm 'RS512' is not allowed"),
    "missing-sub": (lambda k, o: sign(k, sub=None), "missing claim 'sub'"),
    "missing-exp": (lambda k, o: sign(k, exp=None), "missing claim 'exp'"),
    "missing-audience": (lambda k, o: sign(k, aud=None), "missing claim 'aud'"),
}


@pytest.mark.parametrize("case", REFUSALS)
async def test_invalid_tokens_are_refused_with_the_reason_and_never_the_token(
        provider, key, other_key, tmp_path, case):
    make, reason = REFUSALS[case]
    token = make(key, other_key)
    path = write_jwks(tmp_path / "jwks.json", jwk(key, "k1"))
    async with provider(jwks_file=str(path)) as jwt_auth:
        with pytest.raises(AuthError, match=reason) as refused:
            await jwt_auth.authenticate(bearer(token))
    assert token not in str(refused.value)
    assert token.split(".")[1] not in str(refused.value)


async def test_a_jwk_that_names_another_algorithm_is_not_used(provider, key, tmp_path):
    path = write_jwks(tmp_path / "jwks.json", jwk(key, "k1", alg="RS512"))
    async with provider(algorithms=["RS256", "RS512"], jwks_file=str(path)) as jwt_auth:
        with pytest.raises(AuthError, match="key 'k1' is for RS512"):
            await jwt_auth.authenticate(bearer(sign(key, alg="RS256")))
        assert await jwt_auth.authenticate(bearer(sign(key, alg="RS512")))


async def test_the_token_appears_in_no_log_line(provider, key, other_key, tmp_path):
    path = write_jwks(tmp_path / "jwks.json", jwk(key, "k1"))
    tokens = [make(key, other_key) for make, _ in REFUSALS.values()] + [sign(key)]
    with capture_logs() as logs:
        async with provider(jwks_file=str(path)) as jwt_auth:
            for token in tokens:
                with suppress(AuthError):
                    await jwt_auth.authenticate(bearer(token))
    logged = repr(logs)
    assert "token refused" in logged
    signatures = [t.rsplit(".", 1)[1] for t in tokens]
    assert [t for t in tokens if t in logged] == []
    assert [s for s in signatures if s and s in logged] == []


# --------------------------------------------------------------------------- roles, models


async def test_roles_come_from_a_space_separated_scope(provider, key, tmp_path):
    path = write_jwks(tmp_path / "jwks.json", jwk(key, "k1"))
    async with provider(jwks_file=str(path), roles_claim="scope") as jwt_auth:
        principal = await jwt_auth.authenticate(bearer(sign(key, scope="user viewer")))
    assert principal.roles == {"user", "viewer"}


async def test_groups_are_mapped_to_roles_and_unmapped_groups_dropped(provider, key, tmp_path):
    path = write_jwks(tmp_path / "jwks.json", jwk(key, "k1"))
    role_map = {"Inferno-Admins": "admin", "/staff": ["user", "viewer"]}
    async with provider(jwks_file=str(path), roles_claim="groups",
                        role_map=role_map) as jwt_auth:
        token = sign(key, groups=["Inferno-Admins", "/staff", "/contractors", "admin"])
        principal = await jwt_auth.authenticate(bearer(token))
    assert principal.roles == {"admin", "user", "viewer"}


async def test_roles_are_read_at_a_dotted_path(provider, key, tmp_path):
    path = write_jwks(tmp_path / "jwks.json", jwk(key, "k1"))
    async with provider(jwks_file=str(path), roles_claim="realm_access.roles") as jwt_auth:
        principal = await jwt_auth.authenticate(
            bearer(sign(key, realm_access={"roles": ["operator"]})))
    assert principal.roles == {"operator"}


async def test_the_models_claim_limits_the_principal_and_must_be_present(provider, key,
                                                                          tmp_path):
    path = write_jwks(tmp_path / "jwks.json", jwk(key, "k1"))
    async with provider(jwks_file=str(path), models_claim="inferno_models") as jwt_auth:
        principal = await jwt_auth.authenticate(bearer(sign(key, inferno_models=["tiny"])))
        with pytest.raises(AuthError, match="'inferno_models' names no model"):
            await jwt_auth.authenticate(bearer(sign(key)))
    assert principal.attributes["models"] == ["tiny"]


# --------------------------------------------------------------------------- key rotation


async def test_a_replaced_jwks_file_is_read_again(provider, key, other_key, tmp_path):
    path = write_jwks(tmp_path / "jwks.json", jwk(key, "k1"))
    async with provider(jwks_file=str(path)) as jwt_auth:
        with pytest.raises(AuthError, match="unknown key id 'k2'"):
            await jwt_auth.authenticate(bearer(sign(other_key, kid="k2")))
        write_jwks(path, jwk(key, "k1"), jwk(other_key, "k2"))
        assert await jwt_auth.authenticate(bearer(sign(other_key, kid="k2")))


async def test_an_unknown_kid_fetches_the_rotated_keys(provider, jwks_server, other_key):
    async with provider(jwks_url=jwks_server.url, jwks_cooldown=0) as jwt_auth:
        jwks_server.keys = [jwk(other_key, "k2")]
        principal = await jwt_auth.authenticate(bearer(sign(other_key, kid="k2")))
    assert principal.id == "jwt:alice"
    assert jwks_server.fetches == 2


async def test_a_flood_of_unknown_kids_fetches_nothing_within_the_cooldown(
        provider, jwks_server, other_key):
    async with provider(jwks_url=jwks_server.url, jwks_cooldown=3600) as jwt_auth:
        results = await asyncio.gather(
            *(jwt_auth.authenticate(bearer(sign(other_key, kid=f"made-up-{n}")))
              for n in range(20)), return_exceptions=True)
    assert all(isinstance(r, AuthError) and "unknown key id" in str(r) for r in results)
    assert jwks_server.fetches == 1


async def test_the_jwks_is_refreshed_on_schedule(provider, jwks_server, key, other_key):
    async with provider(jwks_url=jwks_server.url, jwks_refresh=0.05,
                        jwks_cooldown=3600) as jwt_auth:
        jwks_server.keys = [jwk(other_key, "k2")]
        await asyncio.wait_for(jwks_server.fetched(3), 30)  # the 2nd refresh began: 1st done
        assert await jwt_auth.authenticate(bearer(sign(other_key, kid="k2")))
        with pytest.raises(AuthError, match="unknown key id 'k1'"):
            await jwt_auth.authenticate(bearer(sign(key, kid="k1")))


async def test_a_failed_refresh_keeps_the_last_good_keys_and_is_logged(provider, jwks_server,
                                                                       key, other_key):
    async with provider(jwks_url=jwks_server.url, jwks_cooldown=0) as jwt_auth:
        jwks_server.status = 500
        with capture_logs() as logs, pytest.raises(AuthError, match="unknown key id 'k2'"):
            await jwt_auth.authenticate(bearer(sign(other_key, kid="k2")))
        assert await jwt_auth.authenticate(bearer(sign(key)))
    failure = next(log for log in logs if log["log_level"] == "error")
    assert failure["reason"] == "answered HTTP 500"
    assert failure["keys"] == 1


# --------------------------------------------------------------------------- configuration


CONFIG_ERRORS: dict[str, tuple[dict[str, Any], str]] = {
    "alg-none": ({"algorithms": ["none"]}, "auth.jwt.algorithms: 'none' accepts unsigned"),
    "no-algorithms": ({"algorithms": []}, "auth.jwt.algorithms: is required"),
    "hs-and-rs": ({"algorithms": ["RS256", "HS256"]}, "must not be mixed"),
    "no-key-source": ({"public_key_file": ""}, "auth.jwt: exactly one of .* none is set"),
    "two-key-sources": ({"jwks_url": "https://idp.example.com/certs"},
                        "auth.jwt.jwks_url: exactly one of .* 2 are set"),
    "missing-pem": ({"public_key_file": "{tmp}/absent.pem"},
                    "auth.jwt.public_key_file: cannot read .*absent.pem"),
    "private-key-pem": ({"public_key_file": "{tmp}/private.pem"}, "a private key is refused"),
    "short-secret": ({"public_key_file": "", "algorithms": ["HS256"],
                      "secret_env": SECRET_VARIABLE}, "JWT_TEST_SECRET holds 10 bytes"),
    "unset-secret": ({"public_key_file": "", "algorithms": ["HS256"], "secret_env": "JWT_UNSET"},
                     "auth.jwt.secret_env: environment variable JWT_UNSET is not set"),
    "secret-in-inferno-namespace": ({"public_key_file": "", "algorithms": ["HS256"],
                                     "secret_env": "INFERNO_JWT_SECRET"}, "outside INFERNO_"),
    "plain-http-jwks": ({"public_key_file": "", "jwks_url": "http://idp.example.com/certs"},
                        "auth.jwt.jwks_url: must be an https:// URL"),
    "no-issuer": ({"issuer": ""}, "auth.jwt.issuer: is required"),
    "no-audience": ({"audience": []}, "auth.jwt.audience: is required"),
}


@pytest.mark.parametrize("case", CONFIG_ERRORS)
def test_unsafe_or_incomplete_configuration_is_refused(make_kernel, key, tmp_path,
                                                       monkeypatch, case):
    changes, message = CONFIG_ERRORS[case]
    (tmp_path / "idp.pem").write_bytes(pem(key))
    (tmp_path / "private.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    monkeypatch.setenv(SECRET_VARIABLE, "0123456789")
    section = {"algorithms": ["RS256"], "issuer": ISSUER, "audience": AUDIENCE,
               "public_key_file": str(tmp_path / "idp.pem"), **changes}
    section = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v
               for k, v in section.items()}
    with pytest.raises(ConfigError, match=message) as refused:
        make_kernel({"auth": {"jwt": section}})
    assert "0123456789" not in str(refused.value)
