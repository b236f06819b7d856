import pytest
import torch

from horovod_truncq import pack, packed_size, unpack


def reference_pack(codes: list[int], bits: int) -> bytes:
    """The layout of packing.py in plain Python: blocks of 32 x 64 codes, the last one 32 x r, each
    read as 32 rows of c codes; column g of a block is a little-endian bit stream of b words (row k
    at bits [b k, b k + b)); word j of column g is stored at j c + g of the block's words."""
    m = -(-len(codes) // 32)
    padded = codes + [0] * (32 * m - len(codes))
    words = []
    for start in range(0, m, 64):
        c = min(64, m - start)
        block = padded[32 * start: 32 * (start + c)]
        block_words = [0] * (bits * c)
        for g in range(c):
            stream = sum(block[k * c + g] << (bits * k) for k in range(32))
            for j in range(bits):
                block_words[j * c + g] = (stream >> (32 * j)) & 0xFFFFFFFF
        words += block_words
    return b"".join(word.to_bytes(4, "little") for word in words)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 31, 32, 33, 2047, 2048, 2080, 1000003])
def test_round_trip(bits, numel):
    codes = torch.randint(0, 2 ** bits, (numel,), generator=torch.Generator().manual_seed(bits * 31 + numel))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == 4 * bits * ((numel + 31) // 32)
    assert torch.equal(unpack(packed, bits, numel), codes.to(torch.int32))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [37, 64, 100, 2047, 2048, 2049, 2 * 2048 + 100])
def test_layout_matches_reference(bits, numel):
    codes = torch.randint(0, 2 ** bits, (numel,), generator=torch.Generator().manual_seed(bits))
    assert bytes(pack(codes, bits).tolist()) == reference_pack(codes.tolist(), bits)


def test_b_codes_take_b_words():
    """32 codes of 3 bits: 3 words, the first holding codes 0..9 and the low 2 bits of code 10."""
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0] * 4)
    words = pack(codes, 3).view(torch.int32).tolist()
    assert len(words) == 3
    stream = sum(c << (3 * k) for k, c in enumerate(codes.tolist()))
    assert [w & 0xFFFFFFFF for w in words] == [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(3)]


@pytest.mark.parametrize("bits", [0, 9, True, 2.0])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="between 1 and 8"):
        pack(torch.zeros(8, dtype=torch.int64), bits)


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 9)


def test_packed_size_formula():
    assert [packed_size(n, 3) for n in (0, 1, 32, 33, 64)] == [0, 12, 12, 24, 24]
