"""The ingest decode worker: `python -P -m meshgate.audit.decode_worker`, one per core it may use.

A plain child process on two pipes, not `multiprocessing`: its spawn re-imports the parent's
`__main__` in the child (an unguarded script embedding the control plane would run again
there), and fork is unsafe next to gRPC's threads. Requests and answers are frames, in order:
a 4-byte big-endian length, then `marshal` data (plain tuples, lists, strings, numbers and bytes;
loading it runs no code, and it is faster than pickle for these).

    request: (raw message bytes, node id, agent name or None)
    answer:  (values, digests) -- or (code, message) for a refusal (see `messages.Refusal`)
"""

from __future__ import annotations

import marshal
import os
import signal
import struct
import sys
import traceback
from typing import Any, BinaryIO

from meshgate.audit.messages import Decoded, Refusal, decode_message

HEADER = struct.Struct(">I")


def frame(data: Any) -> bytes:
    payload = marshal.dumps(data)
    return HEADER.pack(len(payload)) + payload


def answer(result: Decoded | Refusal) -> Any:
    return (result.code, result.message) if isinstance(result, Refusal) else result


def from_answer(data: Any) -> Decoded | Refusal:
    first, second = data
    return Refusal(first, second) if isinstance(first, str) else (first, second)


def _read(stream: BinaryIO, n: int) -> bytes | None:
    data = stream.read(n)
    if len(data) < n:
        return None  # the parent closed the pipe (it stopped, or died): exit
    return data


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    while (header := _read(requests, HEADER.size)) is not None:
        (size,) = HEADER.unpack(header)
        body = _read(requests, size)
        if body is None:
            return
        raw, node_id, agent = marshal.loads(body)
        try:
            result = decode_message(raw, node_id, agent)
        except Exception as exc:  # a bug, not the sender's fault alone: fail only its stream
            traceback.print_exc()
            result = Refusal("INTERNAL", f"the audit decoder failed: {type(exc).__name__}")
        answers.write(frame(answer(result)))
        answers.flush()


def main() -> None:
    # the control plane stops its workers by closing their input (or by dying): a signal to
    # the whole process group (Ctrl-C, a service manager's SIGTERM) must not end a worker
    # while the control plane is still finishing its streams
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # answers go to a private copy of stdout; anything printed lands on stderr, not in a frame
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, answers)


if __name__ == "__main__":
    main()
