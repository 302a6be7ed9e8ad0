"""Ways to run the image tower besides eager torch (see model.Encoder for the interface they plug into)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

# OpenVINO's converter and NNCF send usage events to Google Analytics unless the user has opted out (a file in
# ~/intel), each from a process of their own. A tool that runs from cron over private photo libraries sends
# nothing: with the package seen as absent, both use their own no-op stand-ins. (The converter also called
# that code from C++ in the main thread, where a Ctrl-C aborted the whole process.)
sys.modules.setdefault("openvino_telemetry", None)


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM are held until the block ends. For the converters, which call back into Python from
    C++: a KeyboardInterrupt raised there ends in std::terminate, a core dump and a half-written cache. A
    second signal ends the process at once, as it would have."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum, frame):
        if held:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        held.append(signum)
        print("siglip: stopping once this conversion ends (again to stop at once)", file=sys.stderr)

    before = {
        s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN
    }  # one the process ignores (started with &) stays so
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])  # to the handler the run had: KeyboardInterrupt, as at any other time
