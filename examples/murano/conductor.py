"""murano-conductor: `python examples/murano/conductor.py --relay auto --discovery-interfaces 127.0.0.1`.

The program lives in murano_zmq/demo/conductor.py so that `murano-zmq demo` can
run it from an installed package; this file is its entry point here.
"""

import sys

from murano_zmq.demo.conductor import main

sys.exit(main())
