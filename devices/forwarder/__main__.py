"""The pub/sub forwarder device: `python -m devices.forwarder [--xsub E] [--xpub E]`
from the repository root; the same as `murano-zmq forwarder`."""

import sys

from murano_zmq.forwarder import main

sys.exit(main(prog="python -m devices.forwarder"))
