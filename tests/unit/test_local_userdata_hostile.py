"""Hostile user_data against the guest runtime LocalCloud VMs and the lab's guests share
(slipstream.cloud.local.userdata), run for real on a scratch disk: odd MIME, gzip bombs."""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

from slipstream.cloud.local.userdata import UNPACKED_MAX, run_user_data

BOMB = gzip.compress(b"\0" * (UNPACKED_MAX + (8 << 20)), 9)  # ~25 KiB: fits Nova's 64 KiB


def run(user_data: str, disk) -> tuple[int, list[str]]:
    (disk / "home").mkdir(parents=True, exist_ok=True)
    said: list[str] = []
    failed = asyncio.run(run_user_data(user_data, disk, {"PATH": os.environ["PATH"]}, said.append))
    return failed, said


def mime(*parts) -> str:
    message = MIMEMultipart()
    for part in parts:
        message.attach(part)
    return message.as_string()


def script(text: str, charset: str = "utf-8") -> MIMEText:
    part = MIMEText(text, "x-shellscript", "utf-8")
    part.set_param("charset", charset)
    return part


def test_a_part_with_an_unknown_charset_does_not_lose_the_other_parts(tmp_path):
    failed, _ = run(mime(script("#!/bin/sh\necho one > one\n", charset="x-no-such-charset"),
                         script("#!/bin/sh\necho two > two\n")), tmp_path)
    assert failed == 0
    assert (tmp_path / "home/one").read_text() == "one\n"
    assert (tmp_path / "home/two").read_text() == "two\n"


def test_a_gzip_part_is_unpacked_and_run_as_cloud_init_does(tmp_path):
    packed = MIMEApplication(gzip.compress(b"#!/bin/sh\necho unpacked > unpacked\n"), "x-gzip")
    failed, _ = run(mime(packed), tmp_path)
    assert failed == 0 and (tmp_path / "home/unpacked").read_text() == "unpacked\n"


def test_a_gzip_bomb_part_is_refused_and_the_rest_still_runs(tmp_path):
    failed, said = run(mime(MIMEApplication(BOMB, "x-gzip"), script("#!/bin/sh\necho ok > ok\n")),
                       tmp_path)
    assert failed == 1
    assert any(f"more than {UNPACKED_MAX} bytes" in line for line in said)
    assert (tmp_path / "home/ok").read_text() == "ok\n"


def test_a_write_files_gzip_bomb_writes_nothing(tmp_path):
    config = f"""#cloud-config
write_files:
  - path: /home/big
    encoding: gz+b64
    content: {base64.b64encode(BOMB).decode()}
runcmd:
  - echo ran > ran
"""
    failed, said = run(config, tmp_path)
    assert failed == 1
    assert any(f"more than {UNPACKED_MAX} bytes" in line for line in said)
    assert not (tmp_path / "home/big").exists()
    assert not (tmp_path / "home/ran").exists()  # a failed cloud-config runs none of its runcmd
