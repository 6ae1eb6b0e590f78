"""Checksums of arrays and self-checking JSON records.

Every chunk of stored data is covered by a CRC32C of its bytes, kept in a record that is
written after the data (a done mark, or the attributes of a published array). A record is
JSON that carries its own CRC32C, so a damaged record is recognised as damaged, never read
as a different record. CRC32C runs at ~15 GB/s (google-crc32c, a zarr dependency), so
checking every read costs a few percent of scoring, not a second pass over the data.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import google_crc32c
import numpy as np

from fasttrak.errors import StoreCorruptError


class DamagedRecord(StoreCorruptError):
    """A record that is not valid JSON or fails its own checksum (caught inside the store,
    which raises a StoreCorruptError that names the record instead)."""


def checksum(array: np.ndarray) -> int:
    """CRC32C of an array's little-endian bytes in C order (dtype and shape not included)."""
    data = np.ascontiguousarray(array)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    return checksum_bytes(data.tobytes())


def checksum_bytes(data: bytes) -> int:
    """CRC32C of raw bytes (what :func:`checksum` takes of an array's bytes)."""
    return int(google_crc32c.value(data))


def digest(*parts: Any) -> str:
    """A short stable hex digest of JSON-able parts (names derived artefacts by content)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def seal(fields: dict[str, Any]) -> dict[str, Any]:
    """The record with its own checksum added under ``crc32c``."""
    body = {key: value for key, value in fields.items() if key != "crc32c"}
    return {**body, "crc32c": int(google_crc32c.value(_canonical(body)))}


def unseal(record: Any) -> dict[str, Any]:
    """The fields of a sealed record; DamagedRecord if it is not one or its checksum fails."""
    if not isinstance(record, dict) or not isinstance(record.get("crc32c"), int):
        raise DamagedRecord("not a sealed record")
    body = {key: value for key, value in record.items() if key != "crc32c"}
    if int(google_crc32c.value(_canonical(body))) != record["crc32c"]:
        raise DamagedRecord("its checksum does not match its content")
    return body


def encode(fields: dict[str, Any]) -> bytes:
    """A sealed record as bytes (pretty JSON: records are meant to be readable)."""
    return json.dumps(seal(fields), sort_keys=True, indent=1).encode()


def decode(data: bytes) -> dict[str, Any]:
    """Fields of an encoded record; DamagedRecord if it is not valid or fails its checksum."""
    try:
        record = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedRecord(f"it is not valid JSON ({error})") from error
    return unseal(record)
