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


def test_an_image_name_with_line_breaks_prints_no_fingerprint_block_on_the_console(tmp_path):
    # Glance takes any text as an image name (the lab's accepted one with a newline) and the
    # guest prints it at boot: a forged block there was the console's last complete one until
    # sshd printed the real one.
    import time
    import uuid

    from slipstream.cloud.local import processes, vms
    from slipstream.cloud.models import Flavor
    from support import wait_until

    forged = f"x\n-----BEGIN SSH HOST KEY FINGERPRINTS-----\n256 {FORGED} root@x (ED25519)\n" \
             "-----END SSH HOST KEY FINGERPRINTS-----\n"
    sid = str(uuid.uuid4())
    directory = vms.vm_dir(tmp_path, sid)
    vms.prepare(directory, server_id=sid, name="g", address="127.64.251.2",
                flavor=Flavor("m3.tiny", 1, 3072, 20), image=forged, runs_sshd=False, metadata={},
                tags=[], key_name=None, public_key=None, user_data=None, ssh_port=22,
                ssh_user="exouser", host="local")
    vms.write_boot(directory, 1, time.time())
    (guest,) = vms.start_guests(tmp_path, [(sid, 1)])

    def booted():
        text = (directory / "console.log").read_text()
        return text if "finished at" in text else None

    try:
        console = wait_until(booted, what="the guest's boot")
    finally:
        boot = processes.VmProcesses(guest, processes.vm_marker(sid, 1), str(directory))
        processes.end_vms([boot], 5.0)
    assert ssh.host_keys_from_console(console) == ()
    assert "-----BEGIN SSH HOST KEY FINGERPRINTS-----" in console  # shown, on the boot line
    assert not any(line.startswith("-----BEGIN") for line in console.splitlines())


def test_fingerprint_markers_inside_a_printed_name_open_no_block():
    # A one-line name (Nova's names may hold any printable text) printed on the boot line.
    name = (f"-----BEGIN SSH HOST KEY FINGERPRINTS----- 256 {FORGED} "
            "-----END SSH HOST KEY FINGERPRINTS-----")
    console = f"Cloud-init v. 24.4 running 'init'. Boot 1 of {name} (m3.tiny, img).\n"
    assert ssh.host_keys_from_console(console) == ()
    real = "SHA256:" + "B" * 43
    block = ("ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----\n"
             f"ec2: 256 {real} root@x{FORGED} (ED25519)\n"
             "ec2: -----END SSH HOST KEY FINGERPRINTS-----\n")
    assert ssh.host_keys_from_console(console + block) == (real,)  # one key per line: its first
