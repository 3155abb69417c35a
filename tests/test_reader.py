"""Read-ahead: ranges come back in the announced order with the right bytes, misuse fails loudly, errors surface."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from qlora_merge.errors import CheckpointFormatError
from qlora_merge.inputs.reader import ByteRange, ReadAhead


def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 64)
    return path


def test_ranges_arrive_in_order_with_their_bytes(tmp_path: Path) -> None:
    path = data_file(tmp_path)
    ranges = [ByteRange(path, offset, size) for offset, size in [(0, 10), (100, 3000), (5, 1), (16000, 384)] * 5]
    expected = path.read_bytes()
    with ReadAhead(ranges, depth=2) as ahead:
        for r in ranges:
            assert bytes(ahead.take(r).numpy()) == expected[r.offset : r.offset + r.nbytes]


def test_a_take_out_of_order_is_an_error(tmp_path: Path) -> None:
    path = data_file(tmp_path)
    with ReadAhead([ByteRange(path, 0, 8), ByteRange(path, 8, 8)]) as ahead, pytest.raises(RuntimeError, match="order"):
        ahead.take(ByteRange(path, 8, 8))


def test_a_read_error_in_the_thread_is_raised_by_take(tmp_path: Path) -> None:
    path = data_file(tmp_path)
    ranges = [ByteRange(path, 0, 8), ByteRange(path, 16380, 100)]  # the second runs past the end of the file
    with ReadAhead(ranges) as ahead:
        ahead.take(ByteRange(path, 0, 8))
        with pytest.raises(CheckpointFormatError, match="ended early"):
            ahead.take(ByteRange(path, 16380, 100))


def test_closing_before_all_ranges_are_taken_does_not_hang(tmp_path: Path) -> None:
    path = data_file(tmp_path)
    before = threading.active_count()
    with ReadAhead([ByteRange(path, i, 64) for i in range(0, 16000, 64)], depth=2) as ahead:
        ahead.take(ByteRange(path, 0, 64))
    assert threading.active_count() == before


def test_announced_ranges_are_hinted_not_handed_out(tmp_path: Path) -> None:
    """Copies made elsewhere are announced (fetch=False) for the kernel's sake; take() only sees fetched ranges."""
    path = data_file(tmp_path)
    fetched = [ByteRange(path, 0, 16), ByteRange(path, 4096, 16)]
    ranges = [fetched[0], ByteRange(path, 16, 4080, fetch=False), fetched[1], ByteRange(path, 4112, 100, fetch=False)]
    with ReadAhead(ranges) as ahead:
        for r in fetched:
            assert bytes(ahead.take(r).numpy()) == path.read_bytes()[r.offset : r.offset + 16]
        with pytest.raises(RuntimeError, match="order"):
            ahead.take(ByteRange(path, 4112, 100))
