"""``outbox relay --import bench.quiet``: the relay without its per-message INFO log line.

Measures the change proposed for ``outbox/relay.py`` (``Relay._log_outcome``: log successes at
DEBUG, one INFO line per batch) without touching the library: warnings and errors still show.
"""

from __future__ import annotations

import logging

logging.getLogger("outbox.relay").setLevel(logging.WARNING)
