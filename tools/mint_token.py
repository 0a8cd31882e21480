"""`make token SUB=alice ROLE=user [TTL=seconds]`: a signed token for any user and role.

Signed with AUTH_JWT_SECRET (the development secret `make up` uses when it is
unset), so it works against `make up` and against any deployment whose secret
you hold. Prints only the token:

    TOKEN=$(make -s token SUB=alice ROLE=user)
    curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/api/...
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.servicekit.auth import issue_token  # noqa: E402

DEV_JWT_SECRET = "cosnap-development-secret-change-me!"
ROLES = ("user", "admin", "service")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="make token", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--sub", required=True, help="the user id (the token's `sub`)")
    parser.add_argument("--role", default="user", choices=ROLES)
    parser.add_argument("--ttl", type=int, default=24 * 3600, help="lifetime in seconds (default one day)")
    args = parser.parse_args(argv)
    if not args.sub.strip():
        parser.error("SUB must not be empty")
    if args.ttl <= 0:
        parser.error("TTL must be a positive number of seconds")
    secret = os.environ.get("AUTH_JWT_SECRET") or DEV_JWT_SECRET
    if len(secret) < 32:
        parser.error("AUTH_JWT_SECRET must be at least 32 characters (as the services require)")
    print(issue_token(secret, args.sub, args.role, args.ttl))


if __name__ == "__main__":
    main()
