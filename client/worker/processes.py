"""pool="processes": one child process per runner, killed and replaced past a job's hard time limit.

Theory of operation
-------------------
Each runner thread of the worker owns one `ChildProcess` for the worker's life (a "spawn"
child: forking a process that already runs threads can copy a held lock into the child). The
runner hands its child a batch of jobs in one message; the child runs them in turn and sends
their answers back, (result, exception, traceback text, run seconds) per job, several to a
message: at the end of the batch, and also just before and just after a job that has a hard
limit. So the parent can time every limited job without a clock in the child: it started when
the message before it arrived (or when the batch went out). Jobs without a hard limit cost one
message per batch each way (a round trip costs about as much as a 1 ms job).

The parent waits for each answer until that job's hard deadline. Past it, the parent kills the
child (SIGKILL: a handler stuck in C cannot be interrupted any other way), starts a new one, fails
the job with TimeLimitExceeded and sends the rest of the batch to the new child. A child that
dies on its own (os._exit, a segfault, the OOM killer) is replaced the same way; every job of
its batch not answered yet fails with an error naming the exit code (which one killed it is not
known; failing counts an attempt, so a job that kills its child every time reaches the
dead-letter queue). No other child, and no job of another runner, is touched: this is what
`concurrent.futures.ProcessPoolExecutor` cannot do (killing one of its children breaks the pool).

The soft limit is the child's: it arms `setitimer(ITIMER_REAL)` for each job, and the SIGALRM
handler raises SoftTimeLimitExceeded in the handler (signals reach the main thread, which is the
one running handlers; a blocking system call is interrupted too).

Exceptions lose their traceback when pickled, so the child's traceback travels as text and is
put back as the exception's cause. An answer that does not pickle in the child, or does not
unpickle in the parent, becomes an error for that job alone.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import signal
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable, Sequence

from raftq.client.worker.limits import SoftTimeLimitExceeded, TimeLimitExceeded, TimeLimits, hard_message, soft_message

log = logging.getLogger("raftq.worker")

#: How long `close()` waits for an idle child to exit before killing it.
CHILD_EXIT_S = 5.0
#: How long a new child may take to start and import the handlers' modules before the worker
#: goes on without waiting (its first batch then waits behind the imports).
CHILD_READY_S = 120.0

#: One job for a child: the handler, the job, its limits.
Call = tuple[Callable[[Any], Any], Any, TimeLimits]
#: One job's answer: (result, exception or None, run seconds or None when it did not finish).
Answer = tuple[Any, "BaseException | None", "float | None"]


class PoolProcessDied(Exception):
    """The pool process running a job exited before answering (the job is retried)."""


class ChildProcess:
    """One pool process, driven by one runner thread at a time (see the module docstring)."""

    def __init__(self, name: str, handlers: Sequence[Callable[[Any], Any]]) -> None:
        self.name = name
        self._preload = pickle.dumps(list(handlers))
        self._context = multiprocessing.get_context("spawn")
        self._closed = False
        self._start()

    def _start(self) -> None:
        """Starts a child and hands it the handlers, so that it imports their modules before any
        job: a job's hard limit must not pay for a new child's imports. See `wait_ready`."""
        parent_end, child_end = self._context.Pipe(duplex=True)
        self.process = self._context.Process(target=_child_main, args=(child_end,), name=self.name, daemon=True)
        self.process.start()
        child_end.close()
        self.conn: Connection = parent_end
        self.conn.send_bytes(self._preload)

    def wait_ready(self) -> None:
        """Waits until the child has imported the handlers (it answers with an empty message, or
        with the import error as text, which is logged: its jobs will then fail with it)."""
        try:
            if not self.conn.poll(CHILD_READY_S):
                log.warning("%s: not ready after %g s; going on", self.name, CHILD_READY_S)
                return
            answer = self.conn.recv_bytes()
        except (EOFError, OSError):
            log.error("%s exited with code %s while starting", self.name, self.process.exitcode)
            return
        if answer:
            log.error("%s cannot load the handlers: %s", self.name, answer.decode(errors="replace"))

    def run(self, calls: Sequence[Call], on_answer: Callable[[int, Answer], None]) -> None:
        """Runs the calls in the child in order; `on_answer(index, answer)` as each one finishes.

        Returns once every call has its answer. After `close()` the calls not answered yet get a
        PoolProcessDied answer at once.
        """
        done = 0
        while done < len(calls):
            if self._closed:
                on_answer(done, (None, PoolProcessDied(f"{self.name}: the pool is shut down"), None))
                done += 1
                continue
            try:
                self.conn.send_bytes(_dumps_batch(calls[done:]))
            except (OSError, ValueError):  # the child is gone: a new one takes the batch
                self._replace()
                continue
            done = self._collect(calls, done, on_answer)

    def _collect(self, calls: Sequence[Call], done: int, on_answer: Callable[[int, Answer], None]) -> int:
        """Answers of the batch sent from `calls[done]` on; returns how many calls are answered
        once it is complete or its child had to be replaced."""
        started = time.monotonic()
        while done < len(calls):
            limits = calls[done][2]
            # The child flushes its answers just before a limited job: `started` is that job's start.
            timeout = None if limits.hard_s is None else max(0.0, started + limits.hard_s - time.monotonic())
            try:
                ready = self.conn.poll(timeout)
                data = self.conn.recv_bytes() if ready else None
            except (EOFError, OSError):
                ready, data = True, None
            if data is None and ready:  # the child exited before answering
                self.process.join(1.0)
                error = PoolProcessDied(f"{self.name} exited with code {self.process.exitcode} while running this "
                                        f"job or one before it in its batch")
                log.error("%s; starting a new pool process", error)
                self._replace()
                for index in range(done, len(calls)):  # which one it was is not known: all unanswered fail
                    on_answer(index, (None, error, None))
                return len(calls)
            if data is None:  # past the hard limit of calls[done]; the answers before it came already
                log.warning("%s: job %s ran past its hard time limit (%g s); killing the process",
                            self.name, getattr(calls[done][1], "id", "?"), limits.hard_s)
                self._replace()
                on_answer(done, (None, TimeLimitExceeded(hard_message(
                    limits, "its pool process was killed and replaced")), limits.hard_s))
                return done + 1
            started = time.monotonic()
            for answer in _loads_answers(data, len(calls) - done):
                on_answer(done, answer)
                done += 1
        return done

    def _replace(self) -> None:
        self._kill()
        if not self._closed:
            self._start()
            self.wait_ready()

    def _kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(CHILD_EXIT_S)
        self.conn.close()

    def close(self, *, force: bool) -> None:
        """Ends the child: at once with `force` (it runs jobs already handed back), else once idle.

        Safe from another thread than the runner's: the runner then sees the child gone and
        answers what it had left with PoolProcessDied.
        """
        self._closed = True
        if not force:
            try:
                self.conn.send_bytes(b"")  # "exit when idle"
                self.process.join(CHILD_EXIT_S)
            except (OSError, ValueError):
                pass
        if self.process.is_alive():
            self.process.kill()
        self.process.join(CHILD_EXIT_S)


def _dumps_batch(calls: Sequence[Call]) -> bytes:
    # The job count, then one pickle for the batch: the handler, the same object for every job,
    # is written once. The count lets a child that cannot unpickle the batch still answer each job.
    return len(calls).to_bytes(4, "big") + pickle.dumps([(handler, job, limits) for handler, job, limits in calls])


def _loads_answers(data: bytes, left: int) -> list[Answer]:
    """The answers in one message from a child (its first 4 bytes: how many)."""
    count = min(int.from_bytes(data[:4], "big"), left)
    try:
        answers = pickle.loads(data[4:])
    except Exception as error:  # e.g. an exception class whose __init__ wants other arguments
        error = RuntimeError(f"the handler's answer cannot be read back from the pool process: {error!r}")
        return [(None, error, None)] * count
    read = []
    for result, exc, tb_text, run_s in answers[:count]:
        if exc is not None and tb_text:
            exc.__cause__ = ChildTraceback(tb_text)
        read.append((result, exc, run_s))
    return read


class ChildTraceback(Exception):
    """The traceback of an exception raised in a pool process, as text (as concurrent.futures shows it)."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


# ---------------------------------------------------------------------------- in the child


_soft_limit = TimeLimits()  # the limits of the job running in this child, for the SIGALRM handler's message


def _on_alarm(signum: int, frame: Any) -> None:
    raise SoftTimeLimitExceeded(soft_message(_soft_limit))


def _child_main(conn: Connection) -> None:
    """A pool process: runs batches until the parent sends an empty message or goes away."""
    global _soft_limit
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    signal.signal(signal.SIGALRM, _on_alarm)
    try:
        pickle.loads(conn.recv_bytes())  # the handlers: imports their modules now, not in the first job
        conn.send_bytes(b"")
    except (EOFError, OSError):
        return
    except BaseException as exc:
        conn.send_bytes("".join(traceback.format_exception(exc)).encode())
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not data:
            return
        count = int.from_bytes(data[:4], "big")
        try:
            batch = pickle.loads(data[4:])
        except BaseException as exc:  # a handler's module fails to import here, say: each job gets the error
            text = "".join(traceback.format_exception(exc))
            if not _send_answers(conn, [(None, exc, text, None)] * count):
                return
            continue
        answers: list[tuple[Any, Any, str, float | None]] = []
        for handler, job, limits in batch:
            if limits.hard_s is not None and answers:  # the parent times this job from this message
                if not _send_answers(conn, answers):
                    return
                answers = []
            _soft_limit = limits
            started = time.perf_counter()
            try:
                if limits.soft_s is not None:
                    signal.setitimer(signal.ITIMER_REAL, limits.soft_s)
                try:
                    answer = (handler(job), None, "")
                finally:
                    if limits.soft_s is not None:
                        signal.setitimer(signal.ITIMER_REAL, 0)
            except BaseException as exc:  # a handler's failure, even SystemExit, is the job's outcome
                answer = (None, exc, "".join(traceback.format_exception(exc)))
            answers.append((*answer, time.perf_counter() - started))
            if limits.hard_s is not None:  # and the next job's start from this one
                if not _send_answers(conn, answers):
                    return
                answers = []
        if answers and not _send_answers(conn, answers):
            return


def _send_answers(conn: Connection, answers: list[tuple[Any, Any, str, float | None]]) -> bool:
    """Sends answers to the parent in one message; False when the parent is gone."""
    try:
        data = pickle.dumps(answers)
    except Exception:
        data = pickle.dumps([_picklable(answer) for answer in answers])
    try:
        conn.send_bytes(len(answers).to_bytes(4, "big") + data)
        return True
    except (OSError, ValueError):
        return False


def _picklable(answer: tuple[Any, Any, str, float | None]) -> tuple[Any, Any, str, float | None]:
    try:
        pickle.dumps(answer)
        return answer
    except Exception as exc:
        result, error, tb_text, run_s = answer
        what = "result" if error is None else f"exception {type(error).__name__}: {error}"
        return None, RuntimeError(f"the handler's {what} cannot be sent back from the pool process: {exc}"), \
            tb_text, run_s
