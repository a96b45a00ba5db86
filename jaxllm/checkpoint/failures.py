"""Reading a checkpoint fails quietly and in one line: which failures blame the stored bytes, and
orbax's background reads muted once a failure is reported."""
from __future__ import annotations

import json




# ----------------------------------------------------------------------------------------- failures, quietly

def one_line(err) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def describe_failure(err: BaseException) -> str:
    """The real cause of a failed restore on one line: TensorStore's own message (which names the file and
    what is wrong with it) rather than orbax's wrapper with a repr of the whole spec."""
    messages = [one_line(e).split(" See full TensorStore details:")[0] for e in _causes(err)]
    specific = [m for m in messages if _is_storage_message(m)]
    return (specific or messages)[0][:400]


def _causes(err: BaseException) -> list[BaseException]:
    seen, out, queue = set(), [], [err]
    while queue:  # breadth first: the wrapper, then its causes and grouped exceptions
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        out.append(current)
        queue.extend(getattr(current, "exceptions", ()) or ())
        queue.extend([current.__cause__, current.__context__])
    return out


def _is_storage_message(message: str) -> bool:
    return ' file "' in message or message.split(":")[0] in _TS_CODES


def is_storage_failure(err: BaseException) -> bool:
    """Whether a restore failed on the stored bytes (missing, truncated, undecodable files) rather than on
    a mismatch between what was asked for and what is stored."""
    return any(isinstance(e, (OSError, json.JSONDecodeError, EOFError)) or _is_storage_message(one_line(e))
               for e in _causes(err))


# TensorStore status codes that mean the stored bytes (not the request) are at fault.
_TS_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND", "PERMISSION_DENIED", "UNAVAILABLE")
_quiet_installed = False
_quiet_saves_installed = False


def quiet_failed_saves() -> None:
    """Mute orbax's error logs (each with a traceback) of a failed background save: the save's failure is
    reported by the caller, on one line (`RunCheckpoints`). Idempotent, process-wide."""
    global _quiet_saves_installed
    if _quiet_saves_installed:
        return
    _quiet_saves_installed = True
    import logging

    class _OrbaxErrors(logging.Filter):
        def filter(self, record):
            return not (record.levelno >= logging.ERROR and "/orbax/" in record.pathname.replace("\\", "/"))

    logging.getLogger("absl").addFilter(_OrbaxErrors())


def quiet_failed_reads() -> None:
    """Silence the after-effects of a failed orbax restore (idempotent, process-wide): TensorStore reads
    still in flight complete after orbax closed its event loop ("Event loop is closed", once per array) and
    their futures are collected unretrieved. The failure itself is reported by the caller, on one line."""
    global _quiet_installed
    if _quiet_installed:
        return
    _quiet_installed = True
    import logging
    import sys

    previous = sys.unraisablehook

    def hook(unraisable):
        err = unraisable.exc_value
        if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
            return
        # a read coroutine of the failed restore, closed unfinished, re-raising the read's error
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and "read_array" in code.co_name and "error while reading array" in str(err):
            return
        previous(unraisable)

    sys.unraisablehook = hook

    class _Unretrieved(logging.Filter):
        def filter(self, record):
            text = record.getMessage()
            return not ("exception was never retrieved" in text and
                        ("TensorStore" in text or "reading array" in text or "tensorstore" in text))

    logging.getLogger("asyncio").addFilter(_Unretrieved())


