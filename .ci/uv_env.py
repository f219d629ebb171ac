"""Print ``export UV_...`` lines that give uv the package sources pip is configured with.

uv does not read pip's configuration files. This reads them through ``pip config list`` (every
file and ``PIP_*`` variable pip itself would read) and maps find-links, index-url,
extra-index-url and constraint to uv's variables, and pip's ``cert`` (a CA bundle, as behind a
TLS-inspecting proxy) to ``SSL_CERT_FILE`` unless that is set already. The index strategy is pip's:
the best version from any source, not the first source that has the package.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

#: pip's option -> uv's variable
OPTIONS = {"find-links": "UV_FIND_LINKS", "index-url": "UV_INDEX_URL",
           "extra-index-url": "UV_EXTRA_INDEX_URL", "constraint": "UV_CONSTRAINT", "cert": "SSL_CERT_FILE"}


def pip_options(listing: str) -> dict[str, str]:
    """``{option: value}`` from ``pip config list`` output (``global.find-links='/opt/wheels'``)."""
    found: dict[str, str] = {}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        if not sep or option not in OPTIONS:
            continue
        # a PIP_* variable (":env:") overrides the files, as in pip; several links: uv takes commas
        values = " ".join(shlex.split(value)).split()
        joined = ",".join(values) if option == "find-links" else " ".join(values)
        if key.startswith(":env:"):
            found[option] = joined
        else:
            found.setdefault(option, joined)
    return found


def exports(options: dict[str, str], environ: dict[str, str]) -> list[str]:
    """The ``export`` lines for ``options``; a variable ``environ`` already sets is left as it is."""
    lines = [f"export {OPTIONS[k]}={shlex.quote(v)}" for k, v in options.items() if OPTIONS[k] not in environ]
    return [*lines, "export UV_INDEX_STRATEGY=unsafe-best-match"]


if __name__ == "__main__":
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                             text=True, check=False).stdout
    print("\n".join(exports(pip_options(listing), dict(os.environ))))
