"""Local training: the batched training loop, optimizers, Fed-SB's gradient sketches, a deployed
client's state.
"""
