"""The runtime counters: atomic, shared node-wide through a file, kernel time not double-counted."""

import subprocess
import sys
import threading
import time

import pytest

from vtpu.counters import COUNTERS, RuntimeCounters, kernel_scope


def test_adds_from_many_threads_are_not_lost():
    counters = RuntimeCounters()
    before = counters.snapshot()["siw_issued"]

    def work():
        for _ in range(10_000):
            counters.add(siw_issued=1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counters.snapshot()["siw_issued"] - before == 40_000


def test_an_unknown_counter_name_is_refused_with_the_known_names():
    with pytest.raises(AttributeError, match="no counter named 'opz'.*ops"):
        COUNTERS.add(opz=1)
    with pytest.raises(ValueError, match="pipe must be one of"):
        COUNTERS.add_pipe_busy("X", 1)


def test_two_processes_attached_to_one_file_share_their_counts(tmp_path):
    path = tmp_path / "counters"
    code = (
        "import sys; from vtpu.counters import COUNTERS; COUNTERS.attach(sys.argv[1]); "
        "[COUNTERS.add(ops=3, ppt_hits=1) for _ in range(1000)]"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)]) for _ in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    reader = RuntimeCounters()
    reader.attach(path)
    snap = reader.snapshot()
    assert snap["ops"] == 6000 and snap["ppt_hits"] == 2000
    assert abs(snap["started_at"] - time.time()) < 120


def test_a_file_that_is_not_a_counters_file_is_refused(tmp_path):
    path = tmp_path / "counters"
    path.write_bytes(b"x" * 1024)
    with pytest.raises(RuntimeError, match="not a vtpu counters file"):
        RuntimeCounters().attach(path)


def test_kernel_scope_counts_ops_and_runtime_time_once_for_overlapping_kernels():
    before = COUNTERS.snapshot()
    barrier = threading.Barrier(2)

    def kernel():
        with kernel_scope(1000):
            barrier.wait()
            deadline = time.perf_counter() + 0.05
            while time.perf_counter() < deadline:
                pass

    threads = [threading.Thread(target=kernel) for _ in range(2)]
    t0 = time.perf_counter_ns()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter_ns() - t0
    after = COUNTERS.snapshot()
    assert after["ops"] - before["ops"] == 2000
    assert after["kernel_calls"] - before["kernel_calls"] == 2
    wall = after["kernel_wall_ns"] - before["kernel_wall_ns"]
    # One union interval, not two summed: at least one kernel's 50 ms, at most the whole run.
    assert 50e6 <= wall <= elapsed
    assert after["runtime_cpu_ns"] > before["runtime_cpu_ns"]


def test_a_failing_kernel_counts_no_ops():
    before = COUNTERS.snapshot()["ops"]
    with pytest.raises(ZeroDivisionError), kernel_scope(50):
        1 / 0  # noqa: B018
    assert COUNTERS.snapshot()["ops"] == before
