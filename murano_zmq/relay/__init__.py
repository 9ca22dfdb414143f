"""The relay: engine (mailboxes, consumers, expiry) and the process loop around it."""
