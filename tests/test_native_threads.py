"""The native kernels' thread pool: starting no threads or fewer than asked, forking, concurrent callers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fastfed._backend import available_backends

pytestmark = pytest.mark.skipif("native" not in available_backends(), reason="the native extension is not built")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("headroom_mib", [0, 24])
def test_kernels_run_when_threads_cannot_start(headroom_mib: int) -> None:
    # Under an address-space limit a new thread cannot map its stack: with no headroom none starts,
    # with 24 MiB a few do. Either way the kernels finish on the threads they have, with the same bits.
    completed = _run(f"""
        import resource, numpy as np, fastfed
        from fastfed import _core
        _core.set_num_threads(1)  # nothing starts the pool before the limit
        rng = np.random.default_rng(0)
        updates = [[rng.standard_normal(1_000_000).astype(np.float32)] for _ in range(6)]
        expected = fastfed.weighted_mean(updates, np.arange(1, 7), out=[np.empty(1_000_000, np.float32)])[0].copy()
        out = [np.empty(1_000_000, np.float32)]
        with open("/proc/self/status") as status:
            used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (used + {headroom_mib} * 2**20, resource.RLIM_INFINITY))
        _core.set_num_threads(64)
        # non_finite="propagate" writes straight into out: nothing is allocated under the limit.
        result = fastfed.weighted_mean(updates, np.arange(1, 7), out=out, non_finite="propagate")[0]
        assert np.array_equal(result, expected)
        print(_core.num_threads(), _core.pool_threads())
    """)
    assert completed.returncode == 0, completed.stderr[-2000:]
    wanted, running = map(int, completed.stdout.split())
    assert wanted == 64 and (running == 1 if headroom_mib == 0 else 1 < running < 64)


def test_kernels_work_in_a_forked_child_and_from_many_python_threads() -> None:
    completed = _run("""
        import os, threading, time, numpy as np, fastfed
        from fastfed import _core
        _core.set_num_threads(4)
        updates = [[np.full(3_000_000, k, np.float32)] for k in range(8)]
        assert fastfed.weighted_mean(updates)[0][0] == 3.5  # the pool is running
        # The child has none of the parent's helper threads, and must still work. Its new helpers once
        # took the parent's finished job (about one fork in ten hung or crashed): ten forks.
        for attempt in range(10):
            child = os.fork()
            if child == 0:
                os._exit(0 if fastfed.weighted_mean(updates)[0][-1] == 3.5 else 1)
            deadline = time.monotonic() + 30
            while (ended := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            if ended[0] == 0:
                os.kill(child, 9)
            assert ended[0] == child and ended[1] == 0, (attempt, ended)
        results = []
        threads = [threading.Thread(target=lambda: results.append(fastfed.weighted_mean(updates)[0])) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(results) == 6 and all(np.all(result == 3.5) for result in results)
        print("ok")
    """)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == "ok"
