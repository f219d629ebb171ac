"""The round: the loop, the coordinator of the global state, transports, wire format, validation,
checkpoints.
"""
