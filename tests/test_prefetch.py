"""Background prefetching keeps order, overlaps work, and hands errors back per item."""

import threading
import time

from ganfit_jax import inputs


def test_prefetch_order_errors_and_overlap():
    seen_threads = set()

    def work(x):
        seen_threads.add(threading.get_ident())
        time.sleep(0.05)
        if x == 3:
            raise ValueError("bad item 3")
        return x * x

    t0 = time.time()
    out = list(inputs.prefetch_map(work, range(8), workers=4, ahead=8))
    elapsed = time.time() - t0
    assert [i for i, _ in out] == list(range(8))
    assert [r for i, r in out if i != 3] == [i * i for i in range(8) if i != 3]
    assert isinstance(out[3][1], ValueError) and "bad item 3" in str(out[3][1])
    assert len(seen_threads) > 1 and threading.get_ident() not in seen_threads
    assert elapsed < 8 * 0.05  # ran concurrently, not one after another
