"""scripts/install.sh installs with uv from the package sources pip is configured with."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install.sh"


def _pip_config(tmp_path: Path, what: str) -> list[str]:
    """install.sh's `pip_config WHAT` against a pip.conf of our own (no network: pip only reads it)."""
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\nfind-links = /srv/wheels\n"
        "extra-index-url = https://a.example/simple https://b.example/simple\ncert = /srv/ca.pem\n"
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PIP_CONFIG_FILE": str(conf)}
    env["PIP"] = f"{sys.executable} -m pip"
    env["VENV"] = str(Path(sys.executable).parent.parent)
    code = f'source <(sed -n "/^pip_config()/,/^}}/p" {SCRIPT}); pip_config {what}'
    res = subprocess.run(["bash", "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_uv_gets_the_indexes_find_links_and_ca_bundle_pip_is_configured_with(tmp_path):
    args = _pip_config(tmp_path, "args")
    pairs = list(zip(args[::2], args[1::2], strict=True))
    assert ("--find-links", "/srv/wheels") in pairs
    assert ("--extra-index-url", "https://a.example/simple") in pairs
    assert ("--extra-index-url", "https://b.example/simple") in pairs
    assert "cert" not in args and "/srv/ca.pem" not in args  # uv takes the bundle as SSL_CERT_FILE
    assert _pip_config(tmp_path, "cert") == ["/srv/ca.pem"]


def test_the_install_falls_back_to_pip_and_can_be_told_to_use_it():
    text = SCRIPT.read_text()
    assert "INSTALLER=${INSTALLER:-uv}" in text and "uv failed; installing with pip" in text
    assert "--index-strategy unsafe-best-match" in text  # every index searched, as pip does
