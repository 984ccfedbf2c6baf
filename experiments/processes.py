"""What the processes of `fit --distributed` tell each other, through the key-value store of
JAX's distributed runtime (the coordinator `jax.distributed.initialize` connected them to).

`fit --frames --track --distributed`: process 0 fits the keyframes together (Eq. 13) and hands
their shape and texture to the others, which then track their share of the other frames; at the
end process 0 waits until every other process is done before it writes the whole sequence. The
messages go through the coordinator, not the file system: no process waits on a shared folder.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

# as long as a finished process waits for the others at exit (fit's SHUTDOWN_WAIT_S): shares
# take hours, and a process that dies is reported by JAX's heartbeat long before this
WAIT_MS = 48 * 3600 * 1000


class ProcessFailed(Exception):
    """Another process could not do its part (its error in the message)."""


def _client():
    # JAX has no public key-value API; this is the client jax.distributed itself holds (jax is
    # pinned in requirements.txt, and tests/test_distributed.py runs this path)
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed.initialize has not been called")
    return client


def _pack(values: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in values.items()})
    return buffer.getvalue()


def _unpack(data: bytes) -> dict:
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return {k: arrays[k] for k in arrays.files}


def from_process_zero(compute, index: int, name: str) -> dict:
    """`compute()` (a dict of arrays, numbers and strings) on process 0, published to the others
    under `name`; the others wait for it and get the same dict (arrays). If process 0's
    `compute` raises, it publishes the error and re-raises; the others raise ProcessFailed."""
    client = _client()
    key = f"ganfit/{name}"
    if index == 0:
        try:
            values = compute()
        except BaseException as e:
            client.key_value_set_bytes(key, _pack({"error": f"{e}"}))
            raise
        client.key_value_set_bytes(key, _pack(values))
        return values
    print(f"process {index}: waiting for process 0's {name}", flush=True)
    values = _unpack(client.blocking_key_value_get_bytes(key, WAIT_MS))
    if "error" in values:
        raise ProcessFailed(f"process 0 could not produce the {name}: {values['error']}")
    return values


@contextlib.contextmanager
def reporting_done(index: int, count: int):
    """Around a process's share of the work: tells process 0 when it ends, also when it ends
    with an error (process 0 must not wait for it forever)."""
    outcome = "error"
    try:
        yield
        outcome = "done"
    finally:
        if count > 1 and index > 0:
            _client().key_value_set(f"ganfit/done/{index}", outcome)


def wait_for_others(index: int, count: int) -> list[str]:
    """Process 0: waits until every other process has reported (`reporting_done`); returns
    their outcomes ('done' or 'error'), in process order. The others return at once."""
    if index != 0 or count == 1:
        return []
    print(f"waiting for the other {count - 1} process(es) to finish", flush=True)
    client = _client()
    return [client.blocking_key_value_get(f"ganfit/done/{k}", WAIT_MS) for k in range(1, count)]
