"""tidar-bench: TiDAR against AR, speculative and block-diffusion decoders on one model core.

Every message of the library goes through `logging` under the `tidar_bench` logger (e.g.
`tidar_bench.compiled`'s line per compiled step shape): silence it with
`logging.getLogger("tidar_bench").setLevel(logging.WARNING)`. The `tidar-bench` command prints
INFO and above on stderr (`setup_logging`)."""

import logging
import os
import sys

logging.getLogger(__name__).addHandler(logging.NullHandler())


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at each message (a redirect or a test's capture after setup)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def setup_logging() -> None:
    """The CLI's handler: the library's messages as plain lines on stderr, once per process.
    TIDAR_BENCH_COMPILE_LOG=off silences the compile lines (tidar_bench.compiled)."""
    log = logging.getLogger(__name__)
    if any(getattr(h, "_tidar_bench", False) for h in log.handlers):
        return
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._tidar_bench = True
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    if os.environ.get("TIDAR_BENCH_COMPILE_LOG", "on").lower() in ("off", "0", "false", "no"):
        logging.getLogger(f"{__name__}.compiled").setLevel(logging.WARNING)
