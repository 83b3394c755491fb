"""Running a LocalCloud VM's user_data, as cloud-init would on a Jetstream2 VM.

Three forms are understood, as cloud-init reads them:

- a script starting with ``#!``: written to ``<disk>/var/lib/cloud/instance/scripts/part-001``
  and executed;
- ``#cloud-config`` YAML with ``write_files`` (``path``, ``content``, ``permissions``,
  ``encoding`` b64/base64/gzip/gz+b64, ``append``) and ``runcmd`` (a string runs with
  ``sh -c``, a list is executed as is). Absolute paths are mapped under the VM's disk
  (``/etc/x`` -> ``<disk>/etc/x``): nothing outside the disk is ever written. Other keys are
  reported on the console and ignored;
- a MIME multipart message (``Content-Type: multipart/...``, as ``cloud-init devel make-mime``
  writes) of ``text/x-shellscript`` and ``text/cloud-config`` parts (gzip parts unpacked, as
  cloud-init does, up to UNPACKED_MAX bytes like all gzip data here): every part's write_files
  first, then the scripts in order, then the runcmds in order (cloud-init's scripts-user runs
  ``part-NNN`` before ``runcmd``).

Everything runs with cwd ``<disk>/home``, ``HOME`` set to it, and output going to the VM's
console log. Each command's failure is reported and the rest still run (cloud-init does too).

user_data runs once per instance; at *every* boot, before it, the executables in
``<disk>/var/lib/cloud/scripts/per-boot`` run in name order, as cloud-init's scripts-per-boot do
(``$SLIPSTREAM_VM_DISK`` tells a script where the VM's disk is). That is how a worker restarts
itself after an unshelve.
"""

from __future__ import annotations

import asyncio
import base64
import email
import gzip
import io
import os
import posixpath
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

Say = Callable[[str], None]


class UserDataError(ValueError):
    """The user_data cannot be understood (bad YAML, a write_files path outside the disk...)."""


MIME_PART_KINDS = {"text/x-shellscript": "script", "text/cloud-config": "cloud-config"}
# cloud-init unpacks MIME parts of these types (its TYPE_NEEDED_DECOMP) before reading them.
GZIP_PART_TYPES = {"application/gzip", "application/gzip-compressed", "application/gzipped",
                   "application/x-compress", "application/x-compressed", "application/x-gunzip",
                   "application/x-gzip", "application/x-gzip-compressed"}
#: Most bytes any gzip data in user_data may unpack to: a 64 KiB user_data could otherwise
#: unpack to gigabytes (gzip within gzip) in the memory and on the disk of the host.
UNPACKED_MAX = 16 << 20


def gunzip(raw: bytes) -> bytes:
    """``raw`` unpacked, at most UNPACKED_MAX bytes; raises UserDataError beyond, or if it is
    not gzip data."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as unpacked:
            data = unpacked.read(UNPACKED_MAX + 1)
    except (OSError, EOFError, zlib.error) as err:
        raise UserDataError(f"gzip data in user_data cannot be unpacked: {err}") from None
    if len(data) > UNPACKED_MAX:
        raise UserDataError(f"gzip data in user_data unpacks to more than {UNPACKED_MAX} bytes: "
                            "send less, or fetch the rest from the VM")
    return data


def kind_of(user_data: str) -> str:
    """"script", "cloud-config", "multipart" or "unknown"."""
    if user_data.startswith("#!"):
        return "script"
    if user_data.startswith("#cloud-config"):
        return "cloud-config"
    head = user_data.lstrip()[:40].lower()
    if head.startswith(("content-type: multipart/", "mime-version:")):
        return "multipart"
    return "unknown"


def mime_parts(user_data: str) -> list[tuple[str, str]]:
    """(kind, text) of each part of a MIME multipart user_data, in order; a part of another
    content type is classified by its first line, as cloud-init does for text/plain. A gzip
    part is unpacked first; one that cannot be is ("unreadable", why)."""
    parts = []
    for part in email.message_from_string(user_data).walk():
        if part.is_multipart():
            continue
        raw = part.get_payload(decode=True) or b""
        if part.get_content_type() in GZIP_PART_TYPES or raw[:2] == b"\x1f\x8b":
            try:
                raw = gunzip(raw)
            except UserDataError as err:
                parts.append(("unreadable", str(err)))
                continue
        try:
            text = raw.decode(part.get_content_charset() or "utf-8", "replace")
        except LookupError:  # a charset Python does not know: one bad header must not lose the rest
            text = raw.decode("utf-8", "replace")
        kind = MIME_PART_KINDS.get(part.get_content_type()) or kind_of(text)
        parts.append((kind, text))
    return parts


def disk_path(disk: Path, path: str) -> Path:
    """Where the VM path ``path`` lives on the host: always inside ``disk``."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise UserDataError(f"write_files: bad path {path!r}")
    # normpath of an absolute path cannot climb above "/": "/../etc" is "/etc".
    inside = posixpath.normpath("/" + path).lstrip("/")
    target = (disk / inside).resolve()
    root = disk.resolve()
    if target != root and root not in target.parents:
        # A symlink on the disk pointing out of it: refuse rather than follow.
        raise UserDataError(f"write_files: {path!r} resolves outside the VM's disk")
    return target


def _decode(content: object, encoding: str | None) -> bytes:
    raw = content if isinstance(content, bytes) else str(content if content is not None else "").encode()
    enc = (encoding or "text/plain").lower()
    if enc in ("text/plain", "text"):
        return raw
    if enc in ("b64", "base64"):
        return base64.b64decode(raw)
    if enc in ("gz+b64", "gzip+base64", "gz+base64", "gzip+b64"):
        return gunzip(base64.b64decode(raw))
    if enc in ("gz", "gzip"):
        return gunzip(raw)
    raise UserDataError(f"write_files: unknown encoding {encoding!r}")


def write_files(disk: Path, entries: object, say: Say) -> None:
    if not isinstance(entries, list):
        raise UserDataError("write_files must be a list")
    for entry in entries:
        if not isinstance(entry, dict) or "path" not in entry:
            raise UserDataError(f"write_files entry without a path: {entry!r}")
        target = disk_path(disk, entry["path"])
        data = _decode(entry.get("content"), entry.get("encoding"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "ab" if entry.get("append") else "wb") as f:
            f.write(data)
        perms = entry.get("permissions", "0644")
        os.chmod(target, int(str(perms), 8) if not isinstance(perms, int) else perms)
        say(f"write_files: wrote {entry['path']} ({len(data)} bytes)")


def commands(runcmd: object) -> list[list[str]]:
    """``runcmd`` as argument vectors: a string item runs with ``sh -c``, a list item as is."""
    if runcmd is None:
        return []
    if not isinstance(runcmd, list):
        raise UserDataError("runcmd must be a list")
    argvs = []
    for item in runcmd:
        if isinstance(item, str):
            argvs.append(["sh", "-c", item])
        elif isinstance(item, list) and item:
            argvs.append([str(x) for x in item])
        else:
            raise UserDataError(f"runcmd item must be a string or a non-empty list: {item!r}")
    return argvs


async def _run(argv: list[str], cwd: Path, env: Mapping[str, str]) -> int:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=dict(env), stdin=asyncio.subprocess.DEVNULL)  # output: the console
    except OSError as err:
        print(f"slipstream-local: cannot run {argv[0]}: {err}", flush=True)
        return 127
    try:
        return await proc.wait()
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.terminate()  # the VM is stopping
        raise


async def run_user_data(user_data: str, disk: Path, env: Mapping[str, str], say: Say) -> int:
    """Run ``user_data`` on the VM whose disk is ``disk``; returns how many steps failed."""
    kind = kind_of(user_data)
    if kind == "unknown":
        say("user_data is neither a '#!' script, '#cloud-config' nor MIME multipart: ignored")
        return 0
    parts = mime_parts(user_data) if kind == "multipart" else [(kind, user_data)]
    failed, scripts, argvs = 0, [], []
    for part_kind, text in parts:
        if part_kind == "script":
            scripts.append(text)
        elif part_kind == "cloud-config":
            found = _cloud_config(text, disk, say)
            if found is None:
                failed += 1
            else:
                argvs += found
        elif part_kind == "unreadable":
            say(f"a user_data part is ignored: {text}")
            failed += 1
        else:
            say("a user_data part is neither a '#!' script nor '#cloud-config': ignored")
    home = disk / "home"
    for number, text in enumerate(scripts, start=1):
        code = await _run_script(text, number, disk, env)
        if code != 0:
            say(f"user_data script part-{number:03d} exited with status {code}")
            failed += 1
    for i, argv in enumerate(argvs):
        code = await _run(argv, home, env)
        if code != 0:
            say(f"runcmd[{i}] exited with status {code}")
            failed += 1
    return failed


async def _run_script(text: str, number: int, disk: Path, env: Mapping[str, str]) -> int:
    scripts = disk / "var/lib/cloud/instance/scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    script = scripts / f"part-{number:03d}"
    with os.fdopen(os.open(script, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700), "w") as f:
        f.write(text)  # owner only from the first byte: it may hold a key
    return await _run([str(script)], disk / "home", env)


def _cloud_config(text: str, disk: Path, say: Say) -> list[list[str]] | None:
    """Write a #cloud-config's files now; returns its runcmd (None when it failed)."""
    try:
        import yaml  # only cloud-config needs it; a guest without PyYAML still runs scripts
    except ImportError:
        say("cloud-config needs PyYAML, which the Python running this VM lacks: ignored")
        return None
    try:
        config = yaml.safe_load(text) or {}
        if not isinstance(config, dict):
            raise UserDataError("#cloud-config must be a mapping")
        for key in sorted(set(config) - {"write_files", "runcmd"}):
            say(f"cloud-config key {key!r} is not supported by LocalCloud: ignored")
        if "write_files" in config:
            write_files(disk, config["write_files"], say)
        return commands(config.get("runcmd"))
    except (yaml.YAMLError, UserDataError, ValueError, OSError) as err:
        say(f"cloud-config failed: {err}")
        return None


PER_BOOT = "var/lib/cloud/scripts/per-boot"


async def run_per_boot_scripts(disk: Path, env: Mapping[str, str], say: Say) -> int:
    """Run the VM's per-boot scripts, each to its end; returns how many failed."""
    folder = disk / PER_BOOT
    scripts = sorted(p for p in folder.iterdir() if p.is_file() and os.access(p, os.X_OK)) if folder.is_dir() else []
    failed = 0
    for script in scripts:
        code = await _run([str(script)], disk / "home", env)
        if code != 0:
            say(f"per-boot script {script.name} exited with status {code}")
            failed += 1
    return failed
