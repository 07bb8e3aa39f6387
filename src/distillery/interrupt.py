"""Ctrl-C as one line: remember that SIGINT arrived, since an interrupt inside a lazy import
(transformers') can surface as another error whose chain has lost the KeyboardInterrupt."""

from __future__ import annotations

import signal
import threading

_SEEN: list[bool] = []


def _on_sigint(signum: int, frame: object) -> None:
    _SEEN.append(True)
    raise KeyboardInterrupt


def watch_sigint() -> None:
    """Record SIGINT (then raise KeyboardInterrupt as Python does), from the main thread and
    only where SIGINT has Python's default handler (not where it is ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def sigint_seen() -> bool:
    """Whether SIGINT arrived since ``watch_sigint``."""
    return bool(_SEEN)
