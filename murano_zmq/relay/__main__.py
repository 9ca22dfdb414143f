"""`python -m murano_zmq.relay [options]`: the relay device (see relay/main.py)."""

import sys

from .main import main

sys.exit(main(prog="python -m murano_zmq.relay"))
