"""`fedlora-server`: not available yet (the deployment issue builds it)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Say plainly that deployment is not built yet, and what to use meanwhile."""
    print("fedlora-server: not yet available: deployment on Flower's SuperLink/SuperNode"
          " is still being built; use fedlora-sim for in-process runs", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
