"""Node (threads) and AsyncNode (asyncio): thin drivers of the protocol core."""
