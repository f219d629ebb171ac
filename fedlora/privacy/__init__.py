"""Privacy: DP-SGD (fedlora's kernels and Opacus), ε accounting, the public start, SecAgg's client
side.
"""
