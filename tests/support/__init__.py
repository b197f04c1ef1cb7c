"""Shared test helpers: a real Mosquitto, the daemon as a subprocess, an MQTT collector.

* :mod:`tests.support.broker` - :class:`Broker`, a private Mosquitto on a free loopback port
  that a test can stop and restart (same port), with optional persistence and extra config.
* :mod:`tests.support.collector` - :class:`Collector`, a paho client that records what arrives.
* :mod:`tests.support.daemon` - :class:`DaemonProcess`, ``edge-lstm run`` in a subprocess with a
  generated config; waits for its status ``online``; stops it with SIGTERM or SIGKILL; reads metrics.

The fixtures in ``tests/conftest.py`` wrap these and clean up after each test.
"""
