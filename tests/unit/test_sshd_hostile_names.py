"""A server's name reaches its sshd (host key comments, so the console's fingerprint block, and
the sessions' SLIPSTREAM_VM_NAME) on LocalCloud and on the lab's guests. slipstream only creates
hostname-like names, but the lab's Nova takes any printable name from any client: a hostile one
must neither add a fingerprint that SSH then trusts nor keep the server's sshd from starting."""

from __future__ import annotations

import subprocess

from slipstream import ssh
from slipstream.cloud.local.sshd import SSHD, prepare_sshd

FORGED = "SHA256:" + "A" * 43


def _prepare(tmp_path, name):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return prepare_sshd(tmp_path / "sshd", [("127.64.251.1", 22)], "",
                        {"HOME": str(home), "SLIPSTREAM_VM_NAME": name}, home, host_name=name)


def test_a_server_named_like_a_fingerprint_adds_no_trusted_host_key(tmp_path):
    setup = _prepare(tmp_path, f"job {FORGED} (ED25519)")
    trusted = ssh.host_keys_from_console("[ 3.1] booting\n" + setup.console_banner)
    assert FORGED not in trusted
    assert trusted == setup.fingerprints
    assert "root@job-SHA256-" in setup.console_banner  # still says which server it is


def test_quotes_and_backslashes_in_a_name_reach_the_sessions_unchanged(tmp_path):
    name = 'results "v2" C:\\data #1 %h'
    setup = _prepare(tmp_path, name)  # refused with ValueError before: no sshd, no SSH
    effective = subprocess.run([SSHD, "-T", "-f", str(setup.config_path)], capture_output=True,
                               text=True, timeout=60, check=True).stdout
    assert f"setenv SLIPSTREAM_VM_NAME={name}\n" in effective
