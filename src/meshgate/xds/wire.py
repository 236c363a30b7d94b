"""Hand-assembled protobuf wire bytes for discovery responses.

A snapshot's payload is serialised once; each stream then only appends its own nonce. Protobuf
merges concatenated encodings of one message, so `body + nonce_field` decodes as the full response.
"""

from __future__ import annotations


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """Encode one length-delimited field (strings, bytes, embedded messages)."""
    return _varint((field_number << 3) | 2) + _varint(len(payload)) + payload


def string_field(field_number: int, value: str) -> bytes:
    return length_delimited(field_number, value.encode())
