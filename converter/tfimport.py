"""TensorFlow and Keras, imported without their start-up lines on the terminal.

On a CPU where TensorFlow turns on oneDNN's custom operations (AVX-512 machines, for one),
importing it prints ``oneDNN custom operations are on ...`` through Abseil's logger, once per
native library and after Abseil's own preamble, whatever ``TF_CPP_MIN_LOG_LEVEL`` says: the
level is read only later.  The converter's modules import TensorFlow from here, so those lines
go to the debug log as the level asks (``TF_CPP_MIN_LOG_LEVEL`` 1 drops Abseil's info lines, 2
its warnings too; 0 or unset shows them, as TensorFlow would).  On an x86 CPU without AVX the
import is left alone: TensorFlow then prints why it cannot run and aborts, and that line must
show.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from edge_lstm.runtime import NATIVE_INFO, native_log_to_debug

ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def absl_lines_below(level: str) -> re.Pattern[str] | None:
    """Abseil's lines that ``TF_CPP_MIN_LOG_LEVEL`` = ``level`` hides: ``I...`` at 1, ``I``/``W`` at 2 and up.

    Error lines are never taken (TensorFlow hides them at 3, but a start-up error is worth seeing).
    """
    try:
        n = int(level.strip())
    except ValueError:
        return None
    if n < 1:
        return None
    severities = "I" if n == 1 else "IW"
    # I1130 01:23:45.678901   1234 file.cc:153] message  (before Abseil is set up: I0000 00:00:<epoch>...)
    return re.compile(rf"^[{severities}]\d{{4}} \d\d:\d\d:\d+\.\d+ +\d+ [^\s\]]+:\d+\] ")


def lacks_avx(cpuinfo: str | None = None) -> bool:
    """True on an x86 CPU without AVX, where TensorFlow's wheels print a fatal line and abort on import.

    That line must reach the terminal directly: an abort ends the process before the thread
    that passes lines on could copy it.  ``cpuinfo``: the text of ``/proc/cpuinfo`` (read when None).
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False  # not Linux, or no /proc: nothing to go on
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return "avx" not in line.partition(":")[2].split()
    return False


_hidden = absl_lines_below(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
if _hidden is None or lacks_avx():
    import keras
    import tensorflow as tf
else:
    with native_log_to_debug((NATIVE_INFO, ABSL_PREAMBLE), _hidden):
        import keras
        import tensorflow as tf

__all__ = ["ABSL_PREAMBLE", "absl_lines_below", "keras", "lacks_avx", "tf"]
