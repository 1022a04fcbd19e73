"""Token lists on the wire and in keys: packed little-endian u32 bytes."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable

from erllama.protocol.errors import ErrorCode, InvalidRequestError

_LITTLE = sys.byteorder == "little"


def pack_tokens(tokens: Iterable[int]) -> bytes:
    """Pack token ids as u32 little-endian.

    Raises:
        InvalidRequestError: (``invalid_token``) a token is negative or >= 2**32.
    """
    try:
        arr = array("I", tokens)
    except (OverflowError, TypeError) as exc:
        raise InvalidRequestError(
            f"token ids must be u32 integers: {exc}", code=ErrorCode.INVALID_TOKEN
        ) from None
    if arr.itemsize != 4:  # pragma: no cover - exotic platforms
        arr = array("L", arr)
    if not _LITTLE:  # pragma: no cover
        arr.byteswap()
    return arr.tobytes()


def unpack_tokens(data: bytes | memoryview) -> list[int]:
    """Unpack u32 little-endian token bytes.

    Raises:
        InvalidRequestError: (``bad_request``) the length is not a multiple of 4.
    """
    if len(data) % 4:
        raise InvalidRequestError(f"token bytes length {len(data)} is not a multiple of 4")
    arr = array("I")
    arr.frombytes(bytes(data))
    if not _LITTLE:  # pragma: no cover
        arr.byteswap()
    return arr.tolist()
