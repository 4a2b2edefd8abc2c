"""How the scripts end: one handler that turns what went wrong into one line and an exit code.

    def main(argv=None) -> int:
        return run_script("t_models.py", lambda: _export(parse_args(argv)))

Exit codes, the same in every script:

    0    done
    1    done in part (some inputs could not be read), or stopped on purpose (a non-finite loss): the body
         returns 1, or raises an error whose ``exit_code`` is 1
    2    a problem the message explains (a flag, a file, a data set, a checkpoint): the error's one line is printed
    130  interrupted (Ctrl-C): one line, with what to do next when the script knows it
"""
from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager

from utils import ProjectError

# Errors whose message is written for the user: the model's own (CheckpointError) and the data's are ValueErrors,
# the training loop's ProjectErrors; an OSError names its file (missing, unreadable, existing where refused).
EXPLAINED = (ProjectError, ValueError, OSError)


@contextmanager
def starting(script: str, active: bool = True):
    """Around a script's heavy imports (torch takes seconds to load): a Ctrl-C meanwhile is held until they are
    done (one interrupted half-way can leave a library broken and end in a long unrelated traceback), then the
    script ends with one line, ``<script>: interrupted``, and exit status 130. ``active``: only when run as a
    script (``__name__ == "__main__"``), so that importing the script changes nothing."""
    if not active:
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        print(f"{script}: interrupted while starting; nothing was written", file=sys.stderr)
        sys.exit(130)


def run_script(script: str, body: Callable[[], int], interrupted: Callable[[], str] | None = None) -> int:
    """Run ``body`` and return its exit code, or the code of what it raised (module docstring); each failure
    is reported as one line on stderr, ``<script>: error: <message>``, without a traceback."""
    try:
        return body()
    except KeyboardInterrupt as stop:
        hint = str(stop) or (interrupted() if interrupted else "")      # an interrupt that says what was kept
        print(f"{script}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    except EXPLAINED as error:
        print(f"{script}: error: {error}", file=sys.stderr)
        return error.exit_code if isinstance(error, ProjectError) else 2
