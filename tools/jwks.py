"""Print the JWKS that Envoy's jwt_authn reads for the suite's HS256 secret.

    AUTH_JWT_SECRET=... python -m tools.jwks          # or the secret on standard input

The services verify tokens with AUTH_JWT_SECRET; the edge verifies the same tokens with
this JWKS (a symmetric `oct` key, base64url without padding). Both live in the Secret
cosnap-secrets and are rotated together (deploy/README.md).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from typing import Any


def jwks(secret: str, kid: str | None = None) -> dict[str, Any]:
    key: dict[str, Any] = {
        "kty": "oct",
        "alg": "HS256",
        "use": "sig",
        "k": base64.urlsafe_b64encode(secret.encode("utf-8")).rstrip(b"=").decode("ascii"),
    }
    if kid:
        key["kid"] = kid
    return {"keys": [key]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kid", help="key id (optional; tokens without a kid try every key)")
    args = parser.parse_args()
    secret = os.environ.get("AUTH_JWT_SECRET") or sys.stdin.read().strip()
    if len(secret) < 32:
        raise SystemExit("AUTH_JWT_SECRET must have at least 32 characters")
    print(json.dumps(jwks(secret, args.kid), separators=(",", ":")))


if __name__ == "__main__":
    main()
