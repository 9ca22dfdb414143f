"""murano-agent: `python examples/murano/agent.py --relay tcp://RELAY:5570 --units env1/unit1 --state-dir DIR`.

The program lives in murano_zmq/demo/agent.py so that `murano-zmq demo` can run
it from an installed package; this file is its entry point here.
"""

import sys

from murano_zmq.demo.agent import main

sys.exit(main())
