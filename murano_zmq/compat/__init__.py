"""Drop-ins for other projects' messaging wrappers, over the Node API.

    murano       murano-engine's murano.common.messaging (MqClient,
                 Subscription, Message: bodies decoded from JSON)
    muranoagent  murano-agent's muranoagent.common.messaging (the same,
                 bodies as the exact JSON text; relay only)
    common.py    what they share: AMQP queue -> mailbox names, ssl -> CURVE

docs/murano.md says how to move a Murano deployment to murano-zmq.
"""
