"""TensorFlow and Keras, imported without their start-up lines on the terminal.

On a CPU where TensorFlow turns on oneDNN's custom operations (AVX-512 machines, for one),
importing it prints ``oneDNN custom operations are on ...`` through Abseil's logger, once per
native library and after Abseil's own preamble, whatever ``TF_CPP_MIN_LOG_LEVEL`` says: the
level is read only later.  The converter's modules import TensorFlow from here, so those lines
go to the debug log as the level asks (``TF_CPP_MIN_LOG_LEVEL`` 1 drops Abseil's info lines, 2
its warnings too; 0 or unset shows them, as TensorFlow would).
"""

from __future__ import annotations

import os
import re

from edge_lstm.runtime import NATIVE_INFO, native_log_to_debug

ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def absl_lines_below(level: str) -> re.Pattern[str] | None:
    """Abseil's lines that ``TF_CPP_MIN_LOG_LEVEL`` = ``level`` hides: ``I...`` at 1, ``I``/``W`` at 2 and up."""
    severities = {"1": "I", "2": "IW", "3": "IW"}.get(level.strip())
    if severities is None:
        return None
    # I1130 01:23:45.678901   1234 file.cc:153] message  (before Abseil is set up: I0000 00:00:<epoch>...)
    return re.compile(rf"^[{severities}]\d{{4}} \d\d:\d\d:\d+\.\d+ +\d+ [^\s\]]+:\d+\] ")


_hidden = absl_lines_below(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
if _hidden is None:
    import keras
    import tensorflow as tf
else:
    with native_log_to_debug((NATIVE_INFO, ABSL_PREAMBLE), _hidden):
        import keras
        import tensorflow as tf

__all__ = ["ABSL_PREAMBLE", "absl_lines_below", "keras", "tf"]
