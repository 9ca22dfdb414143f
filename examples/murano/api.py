"""murano-api: `python examples/murano/api.py --relay auto --discovery-interfaces 127.0.0.1 deploy env7 unit1,unit2`.

The program lives in murano_zmq/demo/api.py so that the package can ship the
whole flow for `murano-zmq demo`; this file is its entry point here.
"""

import sys

from murano_zmq.demo.api import main

sys.exit(main())
