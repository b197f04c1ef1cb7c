"""The edge-lstm benchmark suite: ``python -m bench`` (or ``make bench``).

Benchmarks (``python -m bench NAME``; all of them without a name):

``model``      per-tick inference cost of the one-step model by batch size, quantization mode and
               runtime (ai-edge-litert directly and through ``edge_lstm.runtime``, tflite-runtime
               where it loads the model, the numpy reference), and model size on disk
``pipeline``   the daemon's own code per reading, stage by stage, in one process (no broker)
``ceiling``    a minimal paho subscriber that republishes each reading unchanged: the most the
               daemon's MQTT path could do on this machine
``daemon``     the ceiling, then the daemon, on the same broker in the same run: highest rate
               sustained with no drops for 1, 100 and 10k streams, and the ratio to the ceiling
``cpu``        CPU per reading of the daemon and of the ceiling at the same fixed rate (the
               steadiest before/after comparison on a shared machine)
``latency``    reading published -> forecast received, p50/p99/p99.9 at 10, 50 and 90 % of the
               sustained maximum
``footprint``  resident memory with 1, 10k and 100k streams, CPU per 1k readings, time to
               ``READY=1`` and to the first forecast
``profile``    py-spy profile of the daemon at its sustained maximum

``--repeat N`` repeats the ceiling and daemon searches (alternating) and reports medians;
``--protocol 3.1.1`` runs every MQTT client, the daemon included, with MQTT 3.1.1 instead of 5.

Every benchmark writes ``bench/results/NAME.json`` (with machine details); the suite then
regenerates ``docs/performance.md`` from all result files.  ``--quick`` is a short smoke run
that writes to ``bench/.cache/quick/`` unless ``--out`` says otherwise.
"""

SCHEMA_VERSION = 1
