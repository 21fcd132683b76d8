"""serve_app/fault_injection.py: a wedge names PIDs, so only the chosen replica blocks and its
replacement runs; without the variable nothing ever blocks."""

import os
import threading
import time

from serve_app import fault_injection


def test_wedged_only_for_the_pids_the_file_names(tmp_path):
    f = tmp_path / "wedge"
    assert not fault_injection.wedged(f)  # no file: not wedged
    f.write_text(f"1\n{os.getpid()}\n")
    assert fault_injection.wedged(f)
    assert not fault_injection.wedged(f, pid=os.getpid() + 1)


def test_block_while_wedged_blocks_until_the_file_goes(tmp_path, monkeypatch):
    f = tmp_path / "wedge"
    f.write_text(str(os.getpid()))
    monkeypatch.setattr(fault_injection, "_wedge_file", f)
    released = threading.Timer(0.3, f.unlink)
    released.start()
    started = time.perf_counter()
    fault_injection.block_while_wedged(poll_s=0.02)
    assert time.perf_counter() - started >= 0.25
    monkeypatch.setattr(fault_injection, "_wedge_file", None)
    started = time.perf_counter()
    fault_injection.block_while_wedged()
    assert time.perf_counter() - started < 0.01
