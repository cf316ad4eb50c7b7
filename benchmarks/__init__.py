"""Speed and accuracy benchmarks of the suite. ``benchmarks.bench`` is the ``tricks bench`` command (installed
with the suite); the other modules are scripts run from a checkout (``python benchmarks/<name>.py``)."""
