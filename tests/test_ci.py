"""CI's install: uv gets the package sources pip is configured with (``.ci/uv_env.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("uv_env", ROOT / ".ci" / "uv_env.py")
uv_env = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(uv_env)

LISTING = """\
:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/srv/other /srv/more'
"""


def test_pips_sources_become_uvs_variables_the_environment_first():
    # Execute
    options = uv_env.pip_options(LISTING)
    lines = uv_env.exports(options, {})
    # Assert: PIP_FIND_LINKS (":env:") wins over the file's two links; several indexes stay
    # space-separated; the CA bundle becomes SSL_CERT_FILE; pip's other settings are left out
    assert options == {"find-links": "/opt/wheels", "cert": "/etc/ssl/certs/ca-certificates.crt",
                       "constraint": "/etc/xdg/pip/constraints.txt",
                       "extra-index-url": "file:///opt/pypi/simple file:///opt/pypi-more/simple"}
    assert lines == ["export UV_FIND_LINKS=/opt/wheels",
                     "export SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
                     "export UV_CONSTRAINT=/etc/xdg/pip/constraints.txt",
                     "export UV_EXTRA_INDEX_URL='file:///opt/pypi/simple file:///opt/pypi-more/simple'",
                     "export UV_INDEX_STRATEGY=unsafe-best-match"]
    # ... a CA bundle the environment already names is kept
    assert "export SSL_CERT_FILE" not in "\n".join(uv_env.exports(options, {"SSL_CERT_FILE": "/x.pem"}))
    assert uv_env.pip_options("global.find-links='/a /b'") == {"find-links": "/a,/b"}
