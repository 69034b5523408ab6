"""Random GCM nonces cut from a buffer of CSPRNG bytes (keymgr.envelope._nonces): never the same
bytes twice, across refills, threads and fork."""

from __future__ import annotations

import os
import threading

from keymgr.envelope._nonces import _BATCH, NONCE_SIZE, random_nonce


def test_nonces_are_twelve_distinct_bytes_across_refills() -> None:
    count = 5 * _BATCH // NONCE_SIZE + 7  # five refills and a part
    nonces = [random_nonce() for _ in range(count)]
    assert all(type(n) is bytes and len(n) == NONCE_SIZE for n in nonces)
    assert len(set(nonces)) == count


def test_threads_never_get_the_same_nonce() -> None:
    out: list[list[bytes]] = [[] for _ in range(4)]

    def draw(sink: list[bytes]) -> None:
        sink.extend(random_nonce() for _ in range(3000))

    threads = [threading.Thread(target=draw, args=(sink,)) for sink in out]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [n for sink in out for n in sink]
    assert len(set(everything)) == len(everything) == 12_000


def test_a_forked_child_does_not_reuse_the_parents_buffer() -> None:
    """The parent has most of a buffer left when it forks; the child must not cut from it."""
    random_nonce()  # a fresh buffer, nearly all of it unused
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send its first nonces and leave
        try:
            os.close(read_end)
            os.write(write_end, b"".join(random_nonce() for _ in range(50)))
        finally:
            os._exit(0)
    os.close(write_end)
    child = b""
    while chunk := os.read(read_end, 4096):
        child += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    parent = [random_nonce() for _ in range(50)]
    from_child = [child[i:i + NONCE_SIZE] for i in range(0, len(child), NONCE_SIZE)]
    assert len(from_child) == 50 and not set(from_child) & set(parent)
