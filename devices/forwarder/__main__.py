"""The pub/sub forwarder device: `python -m devices.forwarder [--xsub E] [--xpub E]`
from the repository root; the same as `murano-zmq forwarder`."""

import sys

from murano_zmq.cli import main

sys.exit(main(["forwarder", *sys.argv[1:]]))
