"""The protocol core: message model, frame codec, commands, error codes and the
client state machine.  Pure: no sockets, no files, no clocks (time is an argument).
"""
