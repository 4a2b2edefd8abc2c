"""A Ctrl-C while a script loads its libraries ends in one line and exit status 130, never a traceback (one
through a half-imported numpy ended in a RecursionError)."""
from __future__ import annotations

import os
import signal

import pytest

from utils.cli import starting


def test_a_ctrl_c_while_starting_waits_for_the_imports_then_ends_in_one_line(capsys):
    before = signal.getsignal(signal.SIGINT)     # Python's handler, or SIG_IGN in a shell's background job
    done = []
    with pytest.raises(SystemExit) as info:
        with starting("t_models.py"):
            os.kill(os.getpid(), signal.SIGINT)          # held: the block goes on to its end
            done.append(True)
    assert info.value.code == 130 and done == [True]
    assert capsys.readouterr().err == "t_models.py: interrupted while starting; nothing was written\n"
    assert signal.getsignal(signal.SIGINT) is before                         # Ctrl-C works as before afterwards


def test_imported_as_a_module_nothing_changes(capsys):
    before = signal.getsignal(signal.SIGINT)
    with starting("t_models.py", active=False):
        assert signal.getsignal(signal.SIGINT) is before
    assert capsys.readouterr().err == ""
