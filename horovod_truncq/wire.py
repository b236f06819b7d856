"""The payload format, version 3: exactly the bytes that travel for one tensor.

    offset    size   field
    0         2      magic b"TQ"
    2         1      format version (FORMAT_VERSION)
    3         1      scheme id (see quantizers.SCHEMES)
    4         1      bits per code
    5         1      tail model id the sender fitted (0 = none, 1 = laplace, 2 = powerlaw)
    6         1      flags: bit 0 set when the input held NaN or Inf, or overflowed float32
    7         1      reserved, 0
    8         8      element count n, int64 little-endian
    16        4*k    side information, k float32 values:
                       truncated schemes: the 2^bits levels themselves, ascending (k = 2^bits)
                       QSGD, NQSGD: one L2 norm per bucket (k = number of buckets)
    16+4k     4*w    codes, w = bits * ceil(n / 32) int32 words (packing.py)

Every section starts at a multiple of 4 bytes, so side information and codes are read in place as
float32 and int32. The size depends only on (scheme, bits, bucket size, n), so every rank sends the
same number of bytes for a given tensor. Decoding is a table lookup: the levels travel, so every
rank and every kind of hardware reconstructs the same values without refitting a tail model
(uniform levels are computed from two of them, to the same floats). Code
bits carry no checksum: every bit pattern decodes to a valid level, and transport integrity is the
collective library's job. Version 3 packs the codes in blocks of 2048 (packing.py); version 2 had
the same sizes and another order of the codes, so its payloads are refused, not misread.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

MAGIC = b"TQ"
FORMAT_VERSION = 3
HEADER_BYTES = 16
FLAGS_OFFSET = 6
FLAG_NONFINITE = 1
_STRUCT = struct.Struct("<2sBBBBBBq")


@dataclass(frozen=True)
class Layout:
    """Where each section of one payload lies: the only place that computes offsets and sizes."""

    side_count: int  # float32 values of side information
    code_words: int  # int32 words of packed codes

    @property
    def side_end(self) -> int:
        return HEADER_BYTES + 4 * self.side_count

    @property
    def size(self) -> int:
        return self.side_end + 4 * self.code_words

    def side(self, payloads: torch.Tensor) -> torch.Tensor:
        """The side information of (rows, size) uint8 payloads, read in place: float32 (rows, k)."""
        return payloads[:, HEADER_BYTES:self.side_end].view(torch.float32)

    def codes(self, payloads: torch.Tensor) -> torch.Tensor:
        """The packed codes of (rows, size) uint8 payloads, read in place: int32 (rows, w)."""
        return payloads[:, self.side_end:].view(torch.int32)

    def flags(self, payloads: torch.Tensor) -> torch.Tensor:
        """The flags byte of each payload: uint8 (rows,)."""
        return payloads[:, FLAGS_OFFSET]


@dataclass(frozen=True)
class Header:
    scheme: int
    bits: int
    tail: int
    flags: int
    numel: int


def header_bytes(scheme: int, bits: int, tail: int, numel: int) -> bytes:
    """The fixed 16-byte header with flags cleared (they are set on the device)."""
    return _STRUCT.pack(MAGIC, FORMAT_VERSION, scheme, bits, tail, 0, 0, numel)


def parse_header(raw: bytes) -> Header:
    """Read and sanity-check the fixed header; ValueError on anything that is not ours."""
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"payload of {len(raw)} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, version, scheme, bits, tail, flags, reserved, numel = _STRUCT.unpack(raw[:HEADER_BYTES])
    if magic != MAGIC:
        raise ValueError(f"payload does not start with {MAGIC!r} (got {magic!r}): not a horovod-truncq payload")
    if version != FORMAT_VERSION:
        raise ValueError(f"payload format version {version} is not supported (this build reads {FORMAT_VERSION})")
    if reserved != 0 or flags & ~FLAG_NONFINITE or numel < 0:
        raise ValueError("corrupted payload header")
    return Header(scheme, bits, tail, flags, numel)
