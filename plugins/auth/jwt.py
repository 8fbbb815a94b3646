"""The ``jwt`` auth provider: bearer tokens signed by an identity provider (OIDC) or by a
key the operator holds.

Only an ``Authorization: Bearer`` header whose value has the three dot-separated parts of
a signed JWT is this provider's; anything else (an ``inf_`` API key, a JWE, no header) is
left to the next provider. A token that is this provider's and fails any check is refused
with :class:`AuthError` saying which check, never echoing the token. docs/security/jwt.md
describes the configuration and what is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from dynaconf import Validator

from inferno.kernel import (
    AuthError,
    AuthProvider,
    ConfigError,
    ConfigProblem,
    ConfigSpec,
    Credentials,
    Principal,
    hookimpl,
)

from .jwks import (
    JwksFile,
    JwksUrl,
    KeySource,
    StaticKey,
    VerificationKey,
    check_url,
    key_kind,
    parse_jwks,
    read_pem,
    read_secret,
)

SECTION = "auth.jwt"
#: The provider's principals are ``jwt:<sub>``, so no subject can pass for an API key's.
PRINCIPAL_PREFIX = "jwt:"
#: The prefix of Inferno's API keys, which are never JWTs.
API_KEY_PREFIX = "inf_"
#: A signed JWT (JWS compact form): header, payload and signature, base64url each.
COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
#: Tokens longer than this are refused before any parsing.
MAX_TOKEN_CHARS = 16384
KEY_SOURCES = ("public_key_file", "secret_env", "jwks_file", "jwks_url")
ALGORITHMS = tuple(name for name in jwt.algorithms.get_default_algorithms() if name != "none")
DEFAULTS: dict[str, Any] = {
    # Signature algorithms accepted, e.g. ["RS256"]; required. Never "none", and never
    # HMAC (HS*) together with public-key algorithms.
    "algorithms": [],
    # The exact "iss" every token must carry; required.
    "issuer": "",
    # The "aud" a token must name: a string, or a list of which a token must name one.
    "audience": "",
    # Seconds of clock difference tolerated in exp, nbf and iat.
    "leeway": 30.0,
    # Exactly one key source: a PEM public key or certificate ...
    "public_key_file": "",
    # ... the name of an environment variable holding an HMAC secret (32 bytes or more) ...
    "secret_env": "",
    # ... a JWK Set file, read again when it changes ...
    "jwks_file": "",
    # ... or a JWK Set URL (an OIDC provider's jwks_uri).
    "jwks_url": "",
    # Seconds between two fetches of jwks_url.
    "jwks_refresh": 300.0,
    # Seconds at least between the last fetch and one caused by a token's unknown kid.
    "jwks_cooldown": 30.0,
    # The claim that holds the roles: a list, or a space-separated string ("scope");
    # a dotted path ("realm_access.roles") reaches into objects.
    "roles_claim": "roles",
    # Claim value = Inferno role (or list of roles), values matched ignoring case (the
    # configuration lower-cases keys). When not empty, values not listed give no role;
    # when empty, the claim's values are the roles.
    "role_map": {},
    # The claim that lists the models a principal may use; "" for every model.
    "models_claim": "",
    # Claims every token must carry ("sub" always is).
    "required_claims": ["exp", "sub"],
}


class JwtAuth(AuthProvider):
    """Bearer JWTs, checked against an allowlist of algorithms and one source of keys."""

    @staticmethod
    @hookimpl
    def inferno_config_spec() -> ConfigSpec:
        return ConfigSpec(defaults=DEFAULTS, validators=[
            Validator("algorithms", is_type_of=list),
            Validator("audience", is_type_of=(str, list)),
            Validator("leeway", is_type_of=(int, float), gte=0),
            Validator("jwks_refresh", is_type_of=(int, float), gt=0),
            Validator("jwks_cooldown", is_type_of=(int, float), gte=0),
            Validator("role_map", is_type_of=dict),
            Validator("required_claims", is_type_of=list),
        ])

    @staticmethod
    @hookimpl
    def inferno_configure(config: Mapping[str, Any]) -> None:
        problems = [ConfigProblem(f"{SECTION}.{key}" if key else SECTION, message)
                    for key, message in config_problems(config)]
        if problems:
            raise ConfigError(problems)

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.algorithms = tuple(self.config["algorithms"])
        self.issuer = str(self.config["issuer"])
        audience = self.config["audience"]
        self.audience: str | list[str] = audience if isinstance(audience, str) else list(audience)
        self.leeway = float(self.config["leeway"])
        self.required = sorted({*self.config["required_claims"], "sub"})
        self.roles_claim = str(self.config["roles_claim"])
        self.role_map = {str(k).lower(): _strings(v) for k, v in self.config["role_map"].items()}
        self.models_claim = str(self.config["models_claim"])
        self.keys: KeySource | None = None

    async def start(self) -> None:
        self.keys = key_source(self.config, self.log)
        await self.keys.start()
        self.log.info("accepting bearer tokens", issuer=self.issuer,
                      algorithms=list(self.algorithms), keys=type(self.keys).__name__)

    async def stop(self) -> None:
        if self.keys is not None:
            await self.keys.stop()
            self.keys = None

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        token = bearer_jwt(credentials.headers)
        if token is None:
            return None
        try:
            claims = await self.verify(token)
        except AuthError as exc:
            self.log.debug("token refused", reason=str(exc), peer=credentials.peer)
            raise
        return self.principal(claims)

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims once its algorithm, key, signature and claims passed."""
        if self.keys is None:
            raise AuthError("the jwt provider is not running")
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError(f"token longer than {MAX_TOKEN_CHARS} characters")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("malformed token: its header is not a JSON object") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
            shown = repr(algorithm)[:32]
            raise AuthError(f"algorithm {shown} is not allowed (allowed: "
                            f"{', '.join(self.algorithms)})")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed token: its key id (kid) is not a string")
        key = await self.keys.key_for(kid)
        key.check_fits(algorithm)
        return self._decode(token, key, algorithm)

    def _decode(self, token: str, key: VerificationKey, algorithm: str) -> dict[str, Any]:
        try:
            return jwt.decode(
                token, key.key, algorithms=[algorithm], audience=self.audience,
                issuer=self.issuer, leeway=self.leeway,
                options={"require": self.required, "verify_signature": True})
        except jwt.ExpiredSignatureError:
            raise AuthError(f"token expired at {_when(_unverified(token, 'exp'))}") from None
        except jwt.ImmatureSignatureError:
            nbf = _unverified(token, "nbf")
            if nbf is None:
                raise AuthError("token issued in the future (iat)") from None
            raise AuthError(f"token not valid before {_when(nbf)}") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"missing claim {exc.claim!r}") from None
        except jwt.InvalidSignatureError:
            raise AuthError("signature invalid") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(f"algorithm {algorithm} is not allowed") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {_reason(exc, token)}") from None

    def principal(self, claims: Mapping[str, Any]) -> Principal:
        """``jwt:<sub>`` with the roles of ``roles_claim`` through ``role_map``."""
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthError("claim 'sub' must be a non-empty string")
        attributes: dict[str, Any] = {"provider": "jwt", "issuer": claims.get("iss"),
                                      "subject": subject}
        if self.models_claim:
            models = _strings(claim_at(claims, self.models_claim))
            if not models:
                raise AuthError(f"claim {self.models_claim!r} names no model")
            attributes["models"] = models
        return Principal(PRINCIPAL_PREFIX + subject, self.roles(claims), attributes)

    def roles(self, claims: Mapping[str, Any]) -> frozenset[str]:
        """The claim's values through the role map; case is ignored because the profile's
        keys reach the provider lower-cased."""
        values = _strings(claim_at(claims, self.roles_claim))
        if not self.role_map:
            return frozenset(values)
        return frozenset(role for value in values
                         for role in self.role_map.get(value.lower(), ()))


def bearer_jwt(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer`` header when it has a signed JWT's shape."""
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or token.startswith(API_KEY_PREFIX):
        return None
    return token if COMPACT_JWS.fullmatch(token) else None


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The claim named ``path``, or else the one a dotted path leads to (so both
    ``https://example.com/roles`` and ``realm_access.roles`` work)."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def key_source(config: Mapping[str, Any], log: Any) -> KeySource:
    """The one key source the configuration names (``inferno_configure`` checked it)."""
    if config["public_key_file"]:
        return StaticKey(read_pem(Path(config["public_key_file"]).expanduser()))
    if config["secret_env"]:
        return StaticKey(read_secret(config["secret_env"]))
    if config["jwks_file"]:
        return JwksFile(Path(config["jwks_file"]).expanduser(), log)
    return JwksUrl(config["jwks_url"], refresh=float(config["jwks_refresh"]),
                   cooldown=float(config["jwks_cooldown"]), log=log)


def config_problems(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every problem of a ``[auth.jwt]`` section, as (key, message); key "" is the section."""
    problems = _algorithm_problems(config["algorithms"])
    if not config["issuer"]:
        problems.append(("issuer", "is required: the exact iss of the tokens to accept"))
    audience = config["audience"]
    if not audience or not all(isinstance(a, str) and a for a in _listed(audience)):
        problems.append(("audience", "is required: a string, or a list of strings, that "
                                     "tokens must name in aud"))
    if not config["roles_claim"]:
        problems.append(("roles_claim", "must name a claim, for example 'roles'"))
    for value, roles in config["role_map"].items():
        if not isinstance(roles, str) and not (isinstance(roles, Sequence) and all(
                isinstance(role, str) for role in roles)):
            problems.append((f"role_map.{value}", "must be a role or a list of roles"))
    if not all(isinstance(claim, str) and claim for claim in config["required_claims"]):
        problems.append(("required_claims", "must be a list of claim names"))
    chosen = [key for key in KEY_SOURCES if config[key]]
    if len(chosen) != 1:
        found = f"{len(chosen)} are set ({', '.join(chosen)})" if chosen else "none is set"
        return [*problems, (chosen[1] if chosen else "",
                            f"exactly one of {', '.join(KEY_SOURCES)} must be set; {found}")]
    kinds = {key_kind(a) for a in config["algorithms"] if a in ALGORITHMS}
    return problems + [(chosen[0], m) for m in _key_problems(chosen[0], config, kinds)]


def _algorithm_problems(algorithms: Sequence[Any]) -> list[tuple[str, str]]:
    if not algorithms:
        return [("algorithms", "is required: the algorithms your issuer signs with, for "
                               "example ['RS256']")]
    problems = []
    for name in algorithms:
        if isinstance(name, str) and name.lower() == "none":
            problems.append(("algorithms", "'none' accepts unsigned tokens and is refused"))
        elif name not in ALGORITHMS:
            problems.append(("algorithms", f"unknown algorithm {name!r}; known: "
                                           f"{', '.join(ALGORITHMS)}"))
    kinds = {key_kind(name) for name in algorithms if name in ALGORITHMS}
    if "oct" in kinds and len(kinds) > 1:
        problems.append(("algorithms", "HMAC (HS*) and public-key algorithms must not be "
                                       "mixed: a public key could then serve as a secret"))
    return problems


def _key_problems(source: str, config: Mapping[str, Any], kinds: set[str]) -> list[str]:
    value = config[source]
    try:
        if source == "public_key_file":
            key = read_pem(Path(value).expanduser())
            if kinds and key.kind not in kinds:
                return [f"{value} holds an {key.kind} key, which none of the algorithms "
                        f"{list(config['algorithms'])} verify"]
        elif source == "secret_env":
            if value.upper().startswith("INFERNO_"):
                return [f"{value} is in Inferno's configuration namespace; name the secret's "
                        f"variable outside INFERNO_, for example JWT_SECRET"]
            read_secret(value)
            if kinds - {"oct"}:
                return ["a secret verifies only HMAC algorithms (HS256, HS384, HS512)"]
        else:
            if "oct" in kinds:
                return ["a JWK Set publishes public keys: HS* algorithms need secret_env"]
            if source == "jwks_file":
                if not parse_jwks(Path(value).expanduser().read_bytes()):
                    return [f"{value} holds no signing key"]
            else:
                check_url(value)
    except OSError as exc:
        return [f"cannot read {value}: {exc.strerror or exc}"]
    except ValueError as exc:
        return [f"{value}: {exc}" if source.endswith("_file") else str(exc)]
    return []


def _listed(value: Any) -> list[Any]:
    return [value] if isinstance(value, str) else list(value)


def _strings(value: Any) -> list[str]:
    """A claim's values: a list's strings, or a string's space-separated words."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list | tuple):
        return [item for item in value if isinstance(item, str)]
    return []


def _unverified(token: str, claim: str) -> Any:
    """A claim of a token whose signature already verified (PyJWT checks it first)."""
    try:
        return jwt.decode(token, options={"verify_signature": False}).get(claim)
    except jwt.InvalidTokenError:
        return None


def _when(timestamp: Any) -> str:
    try:
        moment = datetime.fromtimestamp(float(timestamp), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return "an unreadable time"
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _reason(exc: Exception, token: str) -> str:
    """PyJWT's reason, unless it quotes any part of the token."""
    message = str(exc)
    if not message or any(part and part in message for part in token.split(".")):
        return type(exc).__name__
    return message[:160]
