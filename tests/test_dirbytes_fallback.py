"""A shard whose O_DIRECT reads fail falls back to buffered reads once, whichever of several read threads
(read depth > 1) gets there first, and never closes a descriptor another read may still be using."""
from __future__ import annotations

import errno
import logging
import os
import threading

import pytest

from zipmoe_run.store import dirbytes


def test_two_read_threads_falling_back_at_once(tmp_path, monkeypatch, caplog):
    p = tmp_path / "shard.bin"
    p.write_bytes(bytes(range(256)) * 64)
    monkeypatch.setattr(dirbytes, "probe_direct", lambda path: None)  # as if O_DIRECT worked here
    opened = []
    real_open = os.open

    def fake_open(path, flags, *a):  # no O_DIRECT needed on the test's file system: a plain descriptor
        fd = real_open(path, flags & ~getattr(os, "O_DIRECT", 0), *a)
        opened.append(fd)
        return fd

    monkeypatch.setattr(dirbytes.os, "open", fake_open)
    f = dirbytes.ShardFile(p, p.stat().st_size, "auto")
    direct = f.fd_direct
    assert direct is not None and f.mode == "O_DIRECT"
    err = OSError(errno.EINVAL, "Invalid argument (injected)")
    start = threading.Barrier(2)
    errors = []

    def fall_back():
        start.wait()
        try:
            f._fall_back(err)
        except BaseException as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    with caplog.at_level(logging.WARNING, logger="zipmoe_run.store.dirbytes"):
        threads = [threading.Thread(target=fall_back) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        f._fall_back(err)  # a third, later: nothing to do
    assert errors == []
    assert f.fd_direct is None and f.mode == "buffered+DONTNEED"
    assert sum("O_DIRECT read refused" in r.getMessage() for r in caplog.records) == 1
    os.fstat(direct)  # still open: a read on another thread may be using it
    f.close()
    for fd in opened:
        with pytest.raises(OSError):
            os.fstat(fd)
