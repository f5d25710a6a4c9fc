"""Helpers shared by the test modules.

``HANG_GUARD_S``: the only time limit a test may set on a subprocess or a wait loop. It exists to end
a hung test, never to judge speed: no test may depend on how fast a loaded machine is, so every wait
is for an event (a file, a line, an exit) and this bound is far beyond any run on a loaded 2-core
machine.
"""

HANG_GUARD_S = 3 * 3600
