"""`outrider control serve` refuses to start, with a message saying what to fix."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.control_process import outrider


async def test_an_invalid_config_names_every_bad_key(tmp_path: Path) -> None:
    config = tmp_path / "control.yaml"
    config.write_text(yaml.safe_dump({"trust_domain": "example.org", "listen": "nowhere"}))
    ran = await outrider("control", "serve", "--config", str(config))
    assert ran.returncode == 2
    assert f"invalid config {config}:" in ran.stderr
    for line in ("listen: 'nowhere' is not host:port", "tls.cert_file: required"):
        assert line in ran.stderr


async def test_missing_svid_files_are_named(tmp_path: Path) -> None:
    config = tmp_path / "control.yaml"
    tls = {"cert_file": "svid.pem", "key_file": "svid.key", "bundle_file": "bundle.pem"}
    config.write_text(yaml.safe_dump({"trust_domain": "example.org", "tls": tls}))
    ran = await outrider("control", "serve", "--config", str(config))
    assert ran.returncode == 2
    assert "cannot load the SVID, key and bundle of tls:" in ran.stderr
    assert "svid.pem" in ran.stderr
