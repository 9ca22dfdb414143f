"""The relay device: `python -m devices.relay [--bind E] [--data-dir D]` from the
repository root; the same as `murano-zmq relay`."""

import sys

from murano_zmq.relay.main import main

sys.exit(main(prog="python -m devices.relay"))
