"""SSH to the servers slipstream creates: run commands and copy files, with the host key checked.

A flow makes a throwaway keypair, registers its public half with the cloud, boots a server and
then talks to it here. The server's host key is never trusted blindly: cloud-init prints the
host key fingerprints to the console log at boot, and a connection is accepted only if the key
the server presents has one of them. A mismatch stops the run (:class:`HostKeyMismatch`)::

    keypair = generate_keypair("slipstream-<run id>")
    cloud.create_keypair(name, keypair.public_key)
    ...
    target = wait_for_ssh(
        lambda: target_for(cloud.get_server(sid), keypair, cloud.console_log(sid)), timeout=600)
    upload(target, [Path("input.csv")], "job")
    print(run_command(target, "cd job && python3 analyse.py", timeout=3600).stdout)
    download(target, ["job/results"], Path("results"))

The API is synchronous (Prefect tasks, scripts); each call opens its own connection on a
private event loop, so it works from worker threads and notebooks alike. Commands run in the
login home (``cd "$HOME"`` first); relative SFTP paths resolve there too. ``~/.ssh/config``,
``known_hosts`` and the SSH agent are ignored: a :class:`SshTarget` says everything.

The private key stays in the process that generated it: it is absent from repr/str, logs and
errors, and a pickled keypair carries only a reference that resolves in this process (Prefect
can pass it between tasks; a persisted result holds no key).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import secrets
import shlex
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import asyncssh

from slipstream.cloud.errors import TransientError
from slipstream.cloud.models import Server
from slipstream.untrusted import printable

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT = 20.0  # longest wait for one TCP connect + SSH handshake + authentication
#: Longest wait for the job's secret environment file to be written (SFTP open + write).
SECRET_WRITE_TIMEOUT = 30.0
#: Longest wait for the server to acknowledge our goodbye before the socket is simply dropped.
CLOSE_TIMEOUT = 2.0


class SshError(Exception):
    """Base of every SSH failure. ``str(err)`` says what happened, where, and what to do."""


class HostKeyUnavailable(SshError):
    """No host key fingerprints are known for the server (its console has not printed them)."""


class HostKeyMismatch(SshError):
    """The server presented a host key that is not among the fingerprints from its console."""

    def __init__(self, host: str, port: int, presented: str | None, expected: tuple[str, ...]):
        self.host, self.port, self.presented, self.expected = host, port, presented, expected
        super().__init__(
            f"host key mismatch for {host}:{port}: it presented {presented or 'no usable key'}, "
            f"its console log printed {', '.join(expected)}. Slipstream hung up before sending "
            "its key or any command. Either "
            "someone is intercepting the connection (possible man-in-the-middle: do not retry, "
            "check the address) or the console log is from another boot or another server "
            "(check that the address still belongs to this server, then fetch its console again)."
        )


class SshUnreachable(SshError):
    """Could not reach the SSH server: refused, unreachable, reset or timed out (not up yet?)."""


class SshAuthFailed(SshError):
    """The server refused our key (not installed yet on a booting server, or the wrong key)."""


class SshTimeout(SshError):
    """A command, a transfer or the wait for SSH did not finish before its deadline."""


class RemoteCommandFailed(SshError):
    """A remote command exited non-zero. Carries the exit status and the end of its stderr."""

    def __init__(self, command: str, exit_status: int, stderr: str = "", *,
                 host: str | None = None):
        self.command, self.exit_status = command, exit_status
        self.stderr_tail = "\n".join(printable(line) for line in stderr.rstrip().splitlines()[-20:])
        text = f"remote command {command[:200]!r} exited with status {exit_status}"
        text += f" on {host}" if host else ""
        super().__init__(f"{text}; last lines of stderr:\n{self.stderr_tail}" if self.stderr_tail
                         else f"{text} (no stderr)")


# Private keys alive in this process, by fingerprint: what an unpickled keypair resolves to.
# Weak values: a key is gone from here as soon as its keypair is.
_LIVE_KEYS: weakref.WeakValueDictionary[str, _PrivateKey] = weakref.WeakValueDictionary()


class _PrivateKey:
    """Holds an asyncssh private key so that it cannot leak by accident.

    repr/str are redacted, and pickling (Prefect results, multiprocessing) carries only the
    fingerprint, resolved back to the live key in this process.
    """

    def __init__(self, fingerprint: str, key: asyncssh.SSHKey | None):
        self.fingerprint, self._key = fingerprint, key
        if key is not None:
            _LIVE_KEYS[fingerprint] = self

    def __repr__(self) -> str:
        return "<private key redacted>"

    def __reduce__(self) -> tuple[Callable[[str], _PrivateKey], tuple[str]]:
        return _resolve_private_key, (self.fingerprint,)

    def __deepcopy__(self, memo: dict) -> _PrivateKey:
        return self  # immutable: copies share the key instead of serialising it

    def get(self) -> asyncssh.SSHKey:
        if self._key is None:
            raise SshError(f"the private key of {self.fingerprint} is not in this process: it "
                           "never leaves the one that generated it. Generate the keypair where "
                           "you connect (or use a thread-based task runner).")
        return self._key


def _resolve_private_key(fingerprint: str) -> _PrivateKey:
    return _LIVE_KEYS.get(fingerprint) or _PrivateKey(fingerprint, None)


@dataclass(frozen=True)
class SshKeypair:
    """An ed25519 keypair. ``public_key`` is an OpenSSH line; the private half is never shown."""

    public_key: str
    fingerprint: str
    _private: _PrivateKey = field(repr=False, compare=False)

    def private_key(self) -> asyncssh.SSHKey:
        """The asyncssh key object, for authenticating (raises SshError in another process)."""
        return self._private.get()


def generate_keypair(comment: str) -> SshKeypair:
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    fingerprint = key.get_fingerprint("sha256")
    public = key.export_public_key("openssh").decode().strip()
    return SshKeypair(public, fingerprint, _PrivateKey(fingerprint, key))


_BEGIN = "-----BEGIN SSH HOST KEY FINGERPRINTS-----"
_END = "-----END SSH HOST KEY FINGERPRINTS-----"
_SHA256 = re.compile(r"\bSHA256:[A-Za-z0-9+/]{43}(?![A-Za-z0-9+/=])")


def host_keys_from_console(console_text: str) -> tuple[str, ...]:
    """The SHA256 host key fingerprints cloud-init printed, from the *last* complete block.

    Console lines may carry prefixes (``ec2: ``, kernel timestamps) and CRs; after a reboot the
    block appears again and the last one is the current boot's. A block that has begun but not
    ended yet counts as not printed: an earlier boot's keys could be stale.
    """
    # Markers count only at the end of their line and each line gives one fingerprint (its
    # first): a server or image name printed mid-line (the lab takes any) cannot open a block
    # or add a key to one.
    lines = [line.rstrip() for line in console_text.replace("\r", "").split("\n")]
    begins = [i for i, line in enumerate(lines) if line.endswith(_BEGIN)]
    if not begins:
        return ()
    block = []
    for line in lines[begins[-1] + 1:]:
        if line.endswith(_END):
            found = (_SHA256.search(line) for line in block)
            return tuple(dict.fromkeys(m.group(0) for m in found if m))
        block.append(line)
    return ()


@dataclass(frozen=True)
class SshTarget:
    """Where to connect, as whom, and which host keys to accept."""

    host: str
    port: int
    user: str
    keypair: SshKeypair
    expected_fingerprints: tuple[str, ...] = ()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


def target_for(server: Server, keypair: SshKeypair, console_text: str) -> SshTarget:
    """The target for ``server`` (its floating IP if it has one), keys read from its console."""
    host = server.reachable_address
    if not host:
        raise SshUnreachable(f"server {server.name} ({server.id}) has no address yet")
    return SshTarget(host, server.ssh_port, server.ssh_user, keypair,
                     host_keys_from_console(console_text))


class _HostKeyCheck(asyncssh.SSHClient):
    """Accepts the server only if its host key has one of the expected SHA256 fingerprints."""

    def __init__(self, expected: tuple[str, ...]):
        self.expected = expected
        self.presented: str | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        self.presented = key.get_fingerprint("sha256")
        return self.presented in self.expected


def _no_known_hosts(host: str, addr: str, port: int | None) -> tuple[list, list, list]:
    # Trust nothing up front, so every host key goes through _HostKeyCheck. (known_hosts=None
    # would switch checking off, and an empty value would read ~/.ssh/known_hosts.)
    return [], [], []


async def _connect(target: SshTarget, timeout: float) -> asyncssh.SSHClientConnection:
    if not target.expected_fingerprints:
        raise HostKeyUnavailable(f"no host key fingerprints known for {target.endpoint}: its "
                                 "console log has not printed them yet. Wait for the server to "
                                 "finish booting (wait_for_ssh does).")
    check = _HostKeyCheck(target.expected_fingerprints)
    try:
        return await asyncssh.connect(
            target.host, target.port, username=target.user,
            client_factory=lambda: check, known_hosts=_no_known_hosts, x509_trusted_certs=None,
            client_keys=[target.keypair.private_key()], agent_path=None, config=None,
            password_auth=False, kbdint_auth=False, gss_auth=False, host_based_auth=False,
            connect_timeout=timeout, keepalive_interval=30,
        )
    except asyncssh.HostKeyNotVerifiable:
        raise HostKeyMismatch(target.host, target.port, check.presented,
                              target.expected_fingerprints) from None
    except asyncssh.PermissionDenied:
        raise SshAuthFailed(f"{target.endpoint} refused key {target.keypair.fingerprint} for "
                            f"{target.user!r}: not installed yet, or wrong login user") from None
    except (OSError, asyncio.TimeoutError, asyncssh.DisconnectError) as err:
        why = str(err) or type(err).__name__
        raise SshUnreachable(f"cannot reach SSH on {target.endpoint}: {why}") from None


def _left(deadline: float) -> float:
    """Seconds until ``deadline`` (a ``time.monotonic()`` value), never negative."""
    return max(0.0, deadline - time.monotonic())


async def _within(conn: asyncssh.SSHClientConnection, deadline: float, work: Awaitable[T]) -> T:
    """``work`` on ``conn``, cut off at ``deadline`` (``time.monotonic()``) with
    :class:`asyncio.TimeoutError`. The connection is dropped then: the goodbye of a channel stuck
    behind a full link (an SFTP session mid-upload) could otherwise wait as long as the link."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.wait_for(asyncio.shield(task), _left(deadline))
    except asyncio.TimeoutError:
        conn.abort()
        task.cancel()
        await asyncio.wait([task], timeout=CLOSE_TIMEOUT)  # aborted: it ends at once
        raise


@contextlib.asynccontextmanager
async def _session(target: SshTarget, deadline: float, what: str) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """A connection that exists only until ``deadline`` (``time.monotonic()``): the connect gets
    what is left of it (at most :data:`CONNECT_TIMEOUT`), and so does the goodbye, so that
    connect + work + close together never outlive the deadline of the phase they belong to."""
    if _left(deadline) <= 0:  # asyncssh reads a zero connect timeout as "no timeout at all"
        raise SshTimeout(f"no time left to connect to {target.endpoint} for {what}: its deadline passed")
    conn = await _connect(target, min(_left(deadline), CONNECT_TIMEOUT))
    try:
        yield conn
    finally:
        conn.close()
        try:  # a peer that stops reading must not hold us past the deadline: drop it then
            await asyncio.wait_for(conn.wait_closed(), min(_left(deadline), CLOSE_TIMEOUT))
        except asyncio.TimeoutError:
            conn.abort()


def _run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a private event loop, from any thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())  # the usual case: a Prefect worker thread or a script
    # This thread already runs a loop (a notebook, an async flow): use a thread of our own.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slipstream-ssh") as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


@dataclass(frozen=True)
class CommandResult:
    exit_status: int
    """The command's exit status; minus the signal number if a signal ended it."""
    stdout: str
    stderr: str


def _env_name(name: str) -> str:
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
        raise ValueError(f"{name!r} is not an environment variable name")
    return name


def _in_home(command: str, env: dict[str, str] | None) -> str:
    # Real VMs start sessions in $HOME already; LocalCloud's sshd starts in the passwd home and
    # sets HOME to the VM's disk. Variables go into the script, not SSH "env" requests: stock
    # sshd (AcceptEnv LANG LC_*) silently drops those.
    lines = ['cd "$HOME" || exit 1']
    for name, value in (env or {}).items():
        lines.append(f"export {_env_name(name)}={shlex.quote(value)}")
    return "\n".join([*lines, command])


#: Receives each line of a command's output as it arrives: ``on_output("stdout"|"stderr", line)``.
OutputSink = Callable[[str, str], None]


async def _secret_env_file(conn: asyncssh.SSHClientConnection, secret_env: dict[str, str], timeout: float,
                           where: str) -> str:
    """Write ``secret_env`` as ``export`` lines into a fresh owner-only file in the login home
    over SFTP, and return the shell lines that load and delete it. The values travel inside the
    encrypted SFTP channel: never in a command line (visible in the VM's process table), a log or
    user_data. Fails with :class:`SshError` if that takes over ``timeout`` seconds."""
    name = f".slipstream-env-{secrets.token_hex(8)}"
    body = "".join(f"export {_env_name(k)}={shlex.quote(v)}\n" for k, v in secret_env.items())

    async def write() -> None:
        async with conn.start_sftp_client() as sftp:
            flags = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | asyncssh.FXF_EXCL  # a fresh file, never another's
            async with sftp.open(name, flags, asyncssh.SFTPAttrs(permissions=0o600)) as handle:
                await handle.write(body)

    try:  # bounded: a VM whose SFTP hangs must not keep the run (and its bill) going
        await _within(conn, time.monotonic() + timeout, write())
    except asyncio.TimeoutError:
        raise SshError(f"writing the job's secret environment file on {where} "
                       f"took over {timeout:.0f} s, so the command was not started. The VM's SFTP server "
                       "is not answering: check its console log and disk.") from None
    except (asyncssh.Error, OSError) as err:
        raise SshError(f"could not write the job's secret environment file on {where}: {err}; the "
                       "command was not started") from None
    return f'. "$HOME/{name}"; rc=$?; rm -f "$HOME/{name}"; [ "$rc" = 0 ] || exit 1'


def run_command(target: SshTarget, command: str, *, timeout: float,
                env: dict[str, str] | None = None, check: bool = True,
                on_output: OutputSink | None = None,
                secret_env: dict[str, str] | None = None, keep_lines: int | None = None) -> CommandResult:
    """Run ``command`` with the login shell, in the login home, and wait at most ``timeout`` s:
    connecting, writing ``secret_env`` and closing count in it, so the call returns by then.

    ``on_output`` hears every line of stdout and stderr as the command prints it. ``secret_env``
    is exported to the command without ever appearing in a command line or a log. ``keep_lines``
    keeps only the last lines of each stream in memory (and in the result): a job may print
    more than this process can hold, and ``on_output`` sees every line anyway.
    Raises :class:`RemoteCommandFailed` on a non-zero exit when ``check``, :class:`SshTimeout`
    when the command outlives ``timeout`` (it may keep running on the server; the output it
    printed until then is on the exception, as ``stdout`` and ``stderr``).
    """
    stdout: deque[str] = deque(maxlen=keep_lines)
    stderr: deque[str] = deque(maxlen=keep_lines)

    async def pump(stream: asyncssh.SSHReader, name: str, sink: deque[str]) -> None:
        async for line in stream:
            if not line:  # the reader's end-of-stream
                break
            sink.append(line)
            if on_output:
                on_output(name, line.rstrip("\n"))

    async def go() -> CommandResult:
        deadline = time.monotonic() + timeout
        async with _session(target, deadline, f"running {command[:60]!r}") as conn:
            script = _in_home(command, env)
            if secret_env:
                loads = await _secret_env_file(conn, secret_env, min(_left(deadline), SECRET_WRITE_TIMEOUT),
                                               target.endpoint)
                script = script.replace("\n", f"\n{loads}\n", 1)
            try:
                proc = await conn.create_process(script, stdin=asyncssh.DEVNULL, errors="replace")
                try:
                    await asyncio.wait_for(asyncio.gather(pump(proc.stdout, "stdout", stdout),
                                                          pump(proc.stderr, "stderr", stderr), proc.wait()),
                                           _left(deadline))
                finally:
                    proc.close()  # no wait: a command that outlived its time may never close its side
                status = proc.returncode
            except asyncio.TimeoutError:
                err = SshTimeout(f"command did not finish within {timeout:.0f} s on "
                                 f"{target.endpoint}: {command[:200]!r}")
                err.stdout, err.stderr = "".join(stdout), "".join(stderr)
                raise err from None
            except (asyncssh.Error, OSError) as err:
                lost = f"{err}"
            else:
                if status is None:
                    lost = "the session closed without an exit status"
                elif status < 0 and await _closes_soon(conn, min(2.0, _left(deadline))):
                    # Killed by a signal as the connection went down: the server is stopping (its
                    # sshd signals the session first), not the command failing by itself.
                    lost = f"the command was killed by signal {-status} as the connection closed"
                else:
                    return CommandResult(status, "".join(stdout), "".join(stderr))
            raise SshError(f"connection to {target.endpoint} lost while running "
                           f"{command[:200]!r}: {lost}. The server may have been stopped.")

    log.debug("running on %s as %s: %s", target.endpoint, target.user, command)
    result = _run_sync(go)
    if check and result.exit_status != 0:
        raise RemoteCommandFailed(command, result.exit_status, result.stderr, host=target.endpoint)
    return result


async def _closes_soon(conn: asyncssh.SSHClientConnection, within: float = 2.0) -> bool:
    """Whether the server closes ``conn`` within ``within`` seconds."""
    try:
        await asyncio.wait_for(conn.wait_closed(), within)
    except TimeoutError:
        return False
    return True


async def _transfer(target: SshTarget, what: str, timeout: float,
                    action: Callable[[asyncssh.SFTPClient], Awaitable[None]]) -> None:
    deadline = time.monotonic() + timeout  # connect, transfer and close: all within it
    async with _session(target, deadline, what) as conn:
        async def transfer() -> None:
            async with conn.start_sftp_client() as sftp:
                await action(sftp)

        try:
            await _within(conn, deadline, transfer())
        except asyncio.TimeoutError:
            raise SshTimeout(f"{what} on {target.endpoint} took over {timeout:.0f} s") from None
        except (asyncssh.Error, OSError) as err:  # SFTP errors, local I/O, a dropped link
            raise SshError(f"{what} on {target.endpoint} failed: {err}") from None


def upload(target: SshTarget, local_paths: Iterable[Path], remote_dir: str, *,
           timeout: float = 3600.0) -> None:
    """Copy files and directories (recursively) into ``remote_dir`` (relative: under $HOME),
    creating it if needed."""
    paths = [Path(p) for p in local_paths]
    if missing := [str(p) for p in paths if not p.exists()]:
        raise FileNotFoundError(f"cannot upload {', '.join(missing)}: no such file or directory")

    async def action(sftp: asyncssh.SFTPClient) -> None:
        await sftp.makedirs(remote_dir, exist_ok=True)
        if paths:
            await sftp.put([str(p) for p in paths], remote_dir, recurse=True, preserve=True)

    log.debug("uploading %s to %s:%s", [str(p) for p in paths], target.endpoint, remote_dir)
    _run_sync(lambda: _transfer(target, f"upload to {remote_dir}", timeout, action))


def download(target: SshTarget, remote_paths: Iterable[str], local_dir: Path, *,
             timeout: float = 3600.0) -> list[str]:
    """Copy remote files and directories into ``local_dir``: see :func:`slipstream.transfer.download`
    (the one safe way to bring files back from a VM)."""
    from slipstream.transfer import download as safe_download  # it builds on this module

    return safe_download(target, remote_paths, local_dir, timeout=timeout)


def wait_for_ssh(
    target: SshTarget | Callable[[], SshTarget],
    *,
    timeout: float,
    on_progress: Callable[[int, str], None] | None = None,
    poll_interval: float = 2.0,
) -> SshTarget:
    """Wait until the server accepts our key over SSH, with its host key verified.

    ``target`` may be a function building a fresh target each attempt (re-reading the server
    and its console log, whose fingerprints appear late in boot). Refused or dropped connections,
    missing fingerprints, a key not installed yet and transient cloud errors are retried until
    ``timeout``; a host key mismatch never is. Returns the target that worked.
    ``on_progress(attempt, detail)`` hears about every failed attempt.
    """
    deadline = time.monotonic() + timeout
    detail = "the deadline passed before the first attempt"
    for attempt in itertools.count(1):
        try:
            current = target() if callable(target) else target
            _run_sync(lambda: _probe(current, deadline))
            return current
        except HostKeyMismatch:
            raise
        except SshTimeout:  # no time left to try again: the previous attempt's failure says why
            raise SshTimeout(f"SSH not ready after {timeout:.0f} s ({attempt - 1} attempts); "
                             f"last: {detail}. Check the server's console log.") from None
        except HostKeyUnavailable:
            if not callable(target):
                raise  # a fixed target will never learn its fingerprints
            detail = "host key fingerprints not on the console yet"
        except (SshUnreachable, SshAuthFailed, TransientError) as err:
            detail = str(err)
        log.debug("SSH attempt %d: %s", attempt, detail)
        if on_progress:
            on_progress(attempt, detail)
        if time.monotonic() >= deadline:
            raise SshTimeout(f"SSH not ready after {timeout:.0f} s ({attempt} attempts); "
                             f"last: {detail}. Check the server's console log.")
        time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))
    raise AssertionError("unreachable")


async def _probe(target: SshTarget, deadline: float) -> None:
    async with _session(target, deadline, "the SSH probe"):
        pass  # connected, host key verified and authenticated: that is all we need to know
