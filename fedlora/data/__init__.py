"""Data: loading and partitioning labeled files, instruction data."""
