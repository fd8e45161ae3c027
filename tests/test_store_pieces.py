"""``read_pieces``: how one expert's extent is split into reads (specs/runtime.md section 5.3).

A piece ends where a chunk's bytes end, so a completed read releases exactly the chunks it completes
and decoding overlaps the rest of the read; the last span is split by the read depth, so that the
reads still in flight at the end hold only the last chunk's bytes."""
from __future__ import annotations

import pytest

from zipmoe_run.store.buffers import ALIGN
from zipmoe_run.store.worker import read_pieces

# one realdims Qwen expert of a huf4x archive: the exponent planes first, then each chunk's sm plane
ENDS = [3855912, 4904488, 5690920, 6739496, 7788072, 8574504, 9623080, 10671656, 11458088]
LENGTH = ENDS[-1]


def _check_cover(pieces, length, piece):
    pos = 0
    for lo, n in pieces:
        assert lo == pos and lo % ALIGN == 0 and 0 < n <= piece
        pos += n
    assert pos == length


def _released_by(pieces, ends):
    """For each piece: how many chunks become decodable when it (and every piece before it) is in."""
    out, k, srt = [], 0, sorted(ends)
    for lo, n in pieces:
        j = k
        while j < len(srt) and srt[j] <= lo + n:
            j += 1
        out.append(j - k)
        k = j
    return out


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_pieces_cover_the_extent_in_aligned_reads(depth):
    pieces = read_pieces(ENDS, LENGTH, piece=2 << 20, min_piece=256 << 10, depth=depth)
    _check_cover(pieces, LENGTH, 2 << 20)


def test_a_piece_ends_at_each_chunk_end():
    """Each chunk is released by the read that holds its last byte, not one read later (with fixed
    2 MiB pieces four chunks waited for the last read: 4904488, 5690920 in one piece, ...)."""
    pieces = read_pieces(ENDS, LENGTH, piece=2 << 20, min_piece=256 << 10)
    cuts = [lo + n for lo, n in pieces]
    for e in ENDS:
        end = next(c for c in cuts if c >= e)
        assert end - e < ALIGN, (e, end)
    assert _released_by(pieces, ENDS)[-1] == 1  # only the last chunk is left when the last read is in


def test_last_span_is_split_by_the_read_depth():
    one = read_pieces(ENDS, LENGTH, piece=2 << 20, min_piece=256 << 10, depth=1)
    two = read_pieces(ENDS, LENGTH, piece=2 << 20, min_piece=256 << 10, depth=2)
    assert two[:-2] == one[:-1]
    (a, n1), (b, n2) = two[-2:]
    assert a == one[-1][0] and b == a + n1 and n1 + n2 == one[-1][1] and abs(n1 - n2) <= ALIGN
    rel = _released_by(two, ENDS)
    assert rel[-2:] == [0, 1]  # the two reads in flight at the end release only the last chunk


def test_close_chunk_ends_merge_and_long_spans_split():
    ends = [ALIGN * 10, ALIGN * 12, ALIGN * 1000]  # 12 is within min_piece of 10: not a cut
    pieces = read_pieces(ends, ALIGN * 1000, piece=ALIGN * 300, min_piece=ALIGN * 8)
    _check_cover(pieces, ALIGN * 1000, ALIGN * 300)
    assert [lo + n for lo, n in pieces] == [ALIGN * 10, ALIGN * 310, ALIGN * 610, ALIGN * 910, ALIGN * 1000]


def test_unaligned_length_and_no_chunks():
    assert read_pieces([], 5000, piece=2 << 20, min_piece=1) == [(0, 5000)]
    assert read_pieces([5000], 5000, piece=4096, min_piece=1) == [(0, 4096), (4096, 904)]
    assert read_pieces([0, 0], 8192, piece=4096, min_piece=1) == [(0, 4096), (4096, 4096)]


# -- the worker around it --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def arc(faults_archive):
    return faults_archive


def _experts(lm, layer=0):
    return [e.expert for e in lm.source.archive.index.experts if e.layer == layer]


def test_an_extent_that_cannot_be_mapped_fails_the_fetch_not_the_io_thread(arc):
    """An error while mapping a task's chunks (before its first read) became an exception on the I/O
    thread, which then ended: the fetch waiting on it hung for ever."""
    from formats.errors import FormatError
    from tests.bounded import in_thread
    from zipmoe_run.api import load

    with load(arc, memory_budget="40%", threads=2) as lm:
        src = lm.source.store.source
        real = src.chunks

        def bad(ext, view, start):
            raise FormatError(f"{ext.label}: region outside its extent (injected)")

        src.chunks = bad
        experts = _experts(lm)
        try:
            with pytest.raises(FormatError, match=r"\(injected\)"):
                in_thread(lambda: [e for e, _ in lm.source.fetch(0, experts)], 30)
        finally:
            src.chunks = real
        st = lm.source.stats()
        assert st["staging_bytes"] == 0 and st["draining_bytes"] == 0, st
        assert in_thread(lambda: sorted(e for e, _ in lm.source.fetch(0, experts)), 30) == sorted(experts)


@pytest.mark.parametrize("depth", [1, 3])
def test_chunk_pieces_are_bit_exact(store_archive, monkeypatch, depth):
    """Pieces cut at every chunk end (at most 8 KiB here, the last span split by the depth, all queued
    at once to the read threads) fill the same bytes as the archive holds."""
    from tests.storefetch import fetch_all_exact
    from zipmoe_run.store import worker

    monkeypatch.setattr(worker, "READ_PIECE", 8192)
    monkeypatch.setattr(worker, "MIN_PIECE", ALIGN)
    path, ref = store_archive(0)
    st = fetch_all_exact(path, ref, depth)
    assert st["reads"] > 2 * len(ref)
