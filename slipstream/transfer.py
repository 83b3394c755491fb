"""Bringing a job's outputs back from its VM without letting the VM write anywhere else.

A VM is not trusted with the host's filesystem: whatever the job (or someone on the VM) leaves in
the job directory, a download only ever creates regular files and directories *under the
results directory*, with ordinary permissions::

    fetched = fetch_outputs(target, "slipstream-job", ["out/summary.json", "a/x.txt", "b/x.txt"],
                            Path("results/<run id>"))
    fetched.files    # ['a/x.txt', 'b/x.txt']  — relative paths kept, nothing flattened
    fetched.missing  # ['out/summary.json']    — named, never retried
    fetched.refused  # {'link': 'a symlink to /etc, outside the job directory'}

How:

- everything lands first in a fresh private directory beside the results (``mkdtemp``), so a
  retry or a rerun never writes through what an earlier attempt left, and is then moved into
  place (a file replaces a same-named file; a symlink already in the results directory is
  replaced, never followed);
- the remote tree is walked with ``lstat``; a VM symlink is never recreated: one that resolves
  (on the VM, the whole chain) to a file inside the job directory is copied as that file, any
  other (out of the job directory, to a directory, dangling) is refused and named;
- devices, sockets and FIFOs are refused; names are single path components from the VM's own
  listing, so ``..`` or ``/`` cannot appear in a local path;
- modes keep only the rwx bits, without world-write: setuid, setgid and sticky never arrive;
- a download never fills the local disk: it writes at most what leaves
  :data:`FREE_SPACE_RESERVE` bytes free (and at most ``SLIPSTREAM_MAX_DOWNLOAD_BYTES`` when set);
  a file over that (a VM can make a 1 TB sparse file in a blink) is refused after at most one
  block, its partial copy deleted.

What exists is always fetched: a missing or refused output does not stop the others.
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from slipstream.ssh import SshError, SshTarget, SshTimeout, _run_sync, _session, _within
from slipstream.untrusted import printable

log = logging.getLogger(__name__)

#: Permission bits a downloaded file or directory may keep: rwx for user and group, r-x for others.
SAFE_MODE_BITS = 0o775
#: Free space a download always leaves on the results directory's filesystem.
FREE_SPACE_RESERVE = 1 << 30
#: Environment variable capping how many bytes one download may write.
MAX_DOWNLOAD_ENV = "SLIPSTREAM_MAX_DOWNLOAD_BYTES"


def download_limit(local_dir: Path) -> int:
    """How many bytes a download into ``local_dir`` may write: what keeps the disk from filling,
    or ``SLIPSTREAM_MAX_DOWNLOAD_BYTES`` if that is less."""
    limit = max(0, shutil.disk_usage(local_dir).free - FREE_SPACE_RESERVE)
    if configured := os.environ.get(MAX_DOWNLOAD_ENV):
        limit = min(limit, int(configured))
    return limit


class _OverLimit(Exception):
    def __init__(self, size: int):
        self.size = size


@dataclass
class FetchedOutputs:
    """What a download brought back, relative to the results directory."""

    local_dir: Path
    files: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for a log or an error (names from the VM with control characters escaped)."""
        parts = [f"{len(self.files)} file(s) in {self.local_dir}"]
        if self.missing:
            parts.append(f"missing on the VM: {', '.join(self.missing)}")
        if self.refused:
            parts.append("refused: " + "; ".join(f"{k} ({why})" for k, why in self.refused.items()))
        return printable(", ".join(parts))


def safe_mode(mode: int) -> int:
    """``mode`` without setuid/setgid/sticky and without world-write; always owner-readable."""
    return (stat.S_IMODE(mode) & SAFE_MODE_BITS) | stat.S_IRUSR | stat.S_IWUSR


class _Walk:
    """One download: walks the VM's tree and writes into the private staging directory."""

    def __init__(self, sftp: asyncssh.SFTPClient, root: str, root_real: str, staging: Path,
                 report: FetchedOutputs, bytes_left: int):
        self.sftp, self.root, self.root_real, self.staging, self.report = sftp, root, root_real, staging, report
        self.bytes_left = bytes_left

    def inside_root(self, real: str) -> bool:
        return real == self.root_real or real.startswith(self.root_real.rstrip("/") + "/")

    async def entry(self, rel: str, attrs: asyncssh.SFTPAttrs) -> None:
        remote = f"{self.root}/{rel}"
        mode = attrs.permissions or 0
        try:
            if stat.S_ISLNK(mode):
                await self._symlink(rel, remote)
            elif stat.S_ISDIR(mode):
                await self._directory(rel, remote, mode)
            elif stat.S_ISREG(mode):
                await self._file(rel, remote, attrs)
            else:
                self.report.refused[rel] = "not a regular file or directory (device, socket or FIFO)"
        except asyncssh.SFTPError as err:  # unreadable on the VM: name it, fetch the rest
            self.report.refused[rel] = f"unreadable on the VM: {err.reason}"

    async def _symlink(self, rel: str, remote: str) -> None:
        try:
            real = await self.sftp.realpath(remote)
            target = await self.sftp.stat(remote)
        except asyncssh.SFTPError:
            self.report.refused[rel] = "a dangling symlink"
            return
        if not self.inside_root(real):
            self.report.refused[rel] = f"a symlink to {real}, outside the job directory"
        elif not stat.S_ISREG(target.permissions or 0):
            self.report.refused[rel] = f"a symlink to {real}, which is not a regular file"
        else:
            await self._file(rel, real, target)

    async def _directory(self, rel: str, remote: str, mode: int) -> None:
        local = self.staging / rel
        local.mkdir(parents=True, exist_ok=True)
        os.chmod(local, safe_mode(mode) | stat.S_IXUSR)
        for name in await self.sftp.readdir(remote):
            child = str(name.filename)
            if child in (".", "..") or "/" in child or "\x00" in child or not child:
                continue
            await self.entry(f"{rel}/{child}", name.attrs)

    async def _file(self, rel: str, remote: str, attrs: asyncssh.SFTPAttrs) -> None:
        local = self.staging / rel
        local.parent.mkdir(parents=True, exist_ok=True)

        def within_limit(_src: bytes, _dst: bytes, copied: int, total: int) -> None:
            if max(copied, total) > self.bytes_left:  # total: the size asyncssh copies, stat'ed by itself
                raise _OverLimit(max(copied, total))

        try:
            await self.sftp.get(remote, str(local), preserve=False, progress_handler=within_limit)
        except _OverLimit as big:
            local.unlink(missing_ok=True)
            self.report.refused[rel] = (f"{big.size} bytes, over the {self.bytes_left} this download may still "
                                        f"write (free disk space less {FREE_SPACE_RESERVE >> 20} MiB, "
                                        f"or {MAX_DOWNLOAD_ENV})")
            return
        self.bytes_left -= local.stat().st_size
        os.chmod(local, safe_mode(attrs.permissions or 0o644))
        if attrs.mtime is not None:
            os.utime(local, (attrs.atime or attrs.mtime, attrs.mtime))
        self.report.files.append(rel)


def _move_into_place(staging: Path, local_dir: Path) -> None:
    """Move what ``staging`` holds into ``local_dir``, replacing same-named files and symlinks
    (never following a symlink found in ``local_dir``)."""
    for src_dir, dirs, files in os.walk(staging):
        rel = Path(src_dir).relative_to(staging)
        dest_dir = local_dir / rel
        for name in dirs:
            dest = dest_dir / name
            if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
                dest.unlink()
            dest.mkdir(exist_ok=True)
            os.chmod(dest, stat.S_IMODE(os.stat(Path(src_dir) / name).st_mode))
        for name in files:
            dest = dest_dir / name
            if dest.is_dir() and not dest.is_symlink():  # never delete a directory of yours for a file
                log.warning("kept the directory %s: the VM's file of that name was not brought back", printable(str(dest)))
                continue
            os.replace(Path(src_dir) / name, dest)


def fetch_outputs(target: SshTarget, remote_dir: str, outputs: Iterable[str], local_dir: Path, *,
                  timeout: float = 3600.0) -> FetchedOutputs:
    """Fetch each of ``outputs`` (paths relative to ``remote_dir``; directories recursively) into
    ``local_dir``, keeping their relative paths. Missing and refused outputs are reported, not
    raised; what arrived before a timeout or a dropped connection is kept, then the error raised."""
    wanted = list(dict.fromkeys(posixpath.normpath(o) for o in outputs))
    if bad := [o for o in wanted if o.startswith(("/", "..")) or o in ("", ".")]:
        raise ValueError(f"output paths must stay inside {remote_dir}: {', '.join(bad)}")
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    report = FetchedOutputs(local_dir)
    if not wanted:
        return report
    staging = Path(tempfile.mkdtemp(prefix=".slipstream-download-", dir=local_dir))

    async def walk(sftp: asyncssh.SFTPClient) -> None:
        root_real = await sftp.realpath(remote_dir)
        walker = _Walk(sftp, remote_dir, root_real, staging, report, download_limit(local_dir))
        for rel in wanted:
            try:
                attrs = await sftp.lstat(f"{remote_dir}/{rel}")
            except asyncssh.SFTPNoSuchFile:
                report.missing.append(rel)
                continue
            if not stat.S_ISLNK(attrs.permissions or 0) and not walker.inside_root(await sftp.realpath(
                    f"{remote_dir}/{rel}")):
                report.refused[rel] = "reached through a symlink out of the job directory"
                continue
            await walker.entry(rel, attrs)

    async def go() -> None:
        deadline = time.monotonic() + timeout  # connect, download and close: all within it
        async with _session(target, deadline, f"the download from {remote_dir}") as conn:
            async def transfer() -> None:
                async with conn.start_sftp_client() as sftp:
                    await walk(sftp)

            try:
                await _within(conn, deadline, transfer())
            except asyncio.TimeoutError:
                raise SshTimeout(f"download from {target.endpoint} took over {timeout:.0f} s; "
                                 f"kept what arrived: {report.summary()}") from None
            except (asyncssh.Error, OSError) as err:
                raise SshError(f"download from {target.endpoint} failed: {err}; "
                               f"kept what arrived: {report.summary()}") from None

    log.debug("fetching %s from %s:%s to %s", wanted, target.endpoint, remote_dir, local_dir)
    try:
        _run_sync(go)
    finally:
        _move_into_place(staging, local_dir)
        shutil.rmtree(staging, ignore_errors=True)
        report.files = list(dict.fromkeys(report.files))  # "a" and "a/x.txt" both asked for
    return report


def download(target: SshTarget, remote_paths: Iterable[str], local_dir: Path, *,
             timeout: float = 3600.0) -> list[str]:
    """Fetch remote files and directories (relative to $HOME) into ``local_dir`` under their
    base names, the same safe way; raises :class:`SshError` naming any that is missing or refused."""
    fetched: list[str] = []
    for path in remote_paths:
        parent, name = posixpath.split(posixpath.normpath(path))
        got = fetch_outputs(target, parent or ".", [name], local_dir, timeout=timeout)
        if got.missing or got.refused:
            raise SshError(f"download of {path} from {target.endpoint} failed: "
                           + ("no such file" if got.missing else "; ".join(got.refused.values())))
        fetched += got.files
    return fetched
