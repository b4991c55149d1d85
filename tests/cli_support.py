"""Running the `dgport` CLI in-process for tests."""
from __future__ import annotations

from dgport.cli import main


def dg(capsys, *args):
    """`dgport ARGS` in this process: (exit code, its stdout, its stderr); output printed before the
    call is not counted."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err
