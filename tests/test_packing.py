import pytest
import torch

from horovod_truncq import pack, packed_size, unpack


def reference_pack(codes: list[int], bits: int) -> bytes:
    """Little-endian bit stream, code i at bits [bits*i, bits*i + bits): plain Python."""
    stream = 0
    for i, code in enumerate(codes):
        stream |= code << (bits * i)
    return stream.to_bytes(packed_size(len(codes), bits), "little")


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 1000003])
def test_round_trip(bits, numel):
    codes = torch.randint(0, 2 ** bits, (numel,), generator=torch.Generator().manual_seed(bits * 31 + numel))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (numel * bits + 7) // 8
    assert torch.equal(unpack(packed, bits, numel), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_layout_matches_reference_bit_stream(bits):
    codes = torch.randint(0, 2 ** bits, (37,), generator=torch.Generator().manual_seed(bits))
    assert bytes(pack(codes, bits).tolist()) == reference_pack(codes.tolist(), bits)


def test_eight_codes_take_b_bytes():
    assert pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3).tolist() == [0xD1, 0x58, 0x1F]


@pytest.mark.parametrize("bits", [0, 9])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="between 1 and 8"):
        pack(torch.zeros(8, dtype=torch.int64), bits)


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 9)
