"""What both ends of the wire read the same way: key, certificate and token files, and whether a host is loopback
(a plaintext port without a token is only quiet there). Standard library only."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """`host` (a name, an IPv4/IPv6 address, bracketed or not) is this machine's loopback."""
    host = host.strip("[]")
    if host in ("localhost", "localhost6"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path}: {e.strerror}") from None


def read_token(token: str | None, token_file: str | None) -> str | None:
    """The bearer token given inline or in a file (stripped); None for neither."""
    if token and token_file:
        raise ValueError("give the token or the token file, not both")
    if token_file:
        token = read_file(token_file, "token file").decode().strip()
        if not token:
            raise ValueError(f"the token file {token_file} is empty")
    return token or None
