"""A real OpenSSH server for one LocalCloud VM: what makes a local VM reachable like a cloud one.

LocalCloud calls :func:`prepare_sshd` when a VM boots, runs the returned command as a child in
the VM's process group and prints :attr:`SshdSetup.console_banner` to the VM's console log, as
cloud-init does on Jetstream2. Flows then verify the host key against that console log exactly as
they do on OpenStack (see :mod:`slipstream.ssh`)::

    setup = prepare_sshd(vm_dir / "sshd", [("127.64.0.7", 22)], public_key,
                         {"HOME": str(vm_dir / "home"), "PATH": "/usr/bin:/bin"}, vm_dir / "home")
    console.write(setup.console_banner)
    subprocess.Popen(setup.command, start_new_session=True, ...)

Everything lives in ``state_dir``: host keys (generated on the first call and reused afterwards:
a VM keeps its host keys across stop/start), ``sshd_config``, ``authorized_keys`` and the pid
file. Nothing outside it is touched, except ``/run/sshd`` (sshd's privilege separation
directory), which is created when running as root.

Where sessions start. sshd always starts a session in the login user's *passwd* home (``/root``
when root), not in the VM's disk, and no sshd option changes that without side effects
(``ChrootDirectory`` changes the root, ``ForceCommand`` also swallows the SFTP subsystem). So:

- ``SetEnv HOME=<VM home>`` makes ``$HOME`` the VM's directory in every session (SetEnv
  overrides the HOME sshd sets from passwd);
- :mod:`slipstream.ssh` starts every command with ``cd "$HOME"`` — a no-op on a real VM, where
  the session already starts in ``$HOME`` — so commands land in ``start_dir``;
- the SFTP server is started with ``-d <start_dir>``, so relative SFTP paths land there too.

An interactive ``ssh`` login by hand starts in the passwd home; ``cd`` brings you to the VM.

Root and non-root. As root, sshd listens on port 22 of the VM's own 127.x address, any login
user may be used (``PermitRootLogin prohibit-password``) and ``/run/sshd`` must exist. As a
normal user, sshd cannot switch users: only the user running it can log in, privilege
separation is skipped, PAM must be off (it is) and the port must be unprivileged (>= 1024, or
``net.ipv4.ip_unprivileged_port_start``); ``StrictModes no`` accepts an ``authorized_keys`` in
a state directory whatever its permissions (e.g. under /tmp). LocalCloud picks the port and the
login user accordingly. With ``UsePAM no``, sshd running as root refuses accounts whose
/etc/shadow password starts with "!" (``passwd -S`` says L), as root is on some hosts.

Ending a VM. sshd puts every connection and every session in a session of its own (setsid), so
ending the VM's process group ends the listener but not live SSH sessions or what they started
(``nohup ... &``). Also end the listener's descendants (while it still runs), and processes
carrying a marker variable passed in ``session_env`` (sessions start with a fresh environment
built from SetEnv, so every session process has it in /proc/<pid>/environ).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
SFTP_SERVER = "internal-sftp"  # in-process: no dependency on /usr/lib/openssh/sftp-server
PRIVSEP_DIR = Path("/run/sshd")
HOST_KEY_TYPES = ("ecdsa", "ed25519")  # cloud-init's order; RSA left out: slow to generate

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# sshd_config splits on whitespace, treats '#' as a comment and expands '%' tokens in paths;
# the SFTP subsystem's arguments are split again on spaces at run time. Refuse, do not escape.
_UNSAFE_IN_PATH = re.compile(r"[\s\"'\\%#]")


@dataclass(frozen=True)
class SshdSetup:
    """How to run the VM's sshd and what the VM prints about its host keys."""

    command: list[str]
    """Runs sshd in the foreground (``-D``), logging to stderr (``-e``)."""
    console_banner: str
    """The fingerprint and key blocks cloud-init prints to the console at the end of boot."""
    fingerprints: tuple[str, ...]
    """The host keys' ``SHA256:...`` fingerprints, in the banner's order."""
    config_path: Path


def prepare_sshd(
    state_dir: Path,
    listen: list[tuple[str, int]],
    authorized_keys: str,
    session_env: dict[str, str],
    start_dir: Path,
    *,
    host_name: str = "localhost",
) -> SshdSetup:
    """Write host keys, ``authorized_keys`` and ``sshd_config`` into ``state_dir``.

    ``listen`` holds (address, port) pairs, all in 127.0.0.0/8; ``session_env`` is set in every
    session (pass HOME and PATH); relative SFTP paths resolve in ``start_dir``. ``host_name``
    only goes into the host keys' comments (``root@<host_name>``), as on a real VM.
    Raises ValueError for a bad address, port, environment name or path, and RuntimeError
    when OpenSSH is missing or refuses the configuration (with its own message).
    """
    _require_openssh()
    if not listen:
        raise ValueError("sshd needs at least one (address, port) to listen on")
    for address, port in listen:
        _check_listen(address, port)
    for name, value in session_env.items():
        if not _ENV_NAME.match(name) or any(c in value for c in "\n\r\0"):
            raise ValueError(
                f"session variable {name!r} cannot go into sshd_config: names are letters, "
                "digits and '_'; values may not contain a line break or NUL"
            )
    state_dir = Path(state_dir).absolute()
    start_dir = Path(start_dir).absolute()
    for path in (state_dir, start_dir):
        if _UNSAFE_IN_PATH.search(str(path)):
            raise ValueError(
                f"path {str(path)!r} cannot be used by sshd: it contains whitespace, a quote, "
                "'\\', '%' or '#'. Put the LocalCloud state in a plain directory."
            )
    state_dir.mkdir(parents=True, exist_ok=True)
    start_dir.mkdir(parents=True, exist_ok=True)

    with (state_dir / ".host-keys.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two boots racing must not mix halves of two keys
        host_keys = [_ensure_host_key(state_dir, kind, _key_comment_host(host_name))
                     for kind in HOST_KEY_TYPES]
    auth_file = state_dir / "authorized_keys"
    auth_file.write_text(authorized_keys.rstrip("\n") + "\n")
    auth_file.chmod(0o600)

    config = state_dir / "sshd_config"
    config.write_text(
        _render_config(state_dir, listen, host_keys, auth_file, session_env, start_dir))
    if os.geteuid() == 0:
        # sshd refuses to start as root without its privilege separation directory; a
        # container or a minimal install may not have created it.
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    _run([SSHD, "-t", "-f", str(config)], "sshd refused its configuration")

    fingerprint_lines = [_run([SSH_KEYGEN, "-l", "-f", f"{k}.pub"], "ssh-keygen -l failed").strip()
                         for k in host_keys]
    fingerprints = tuple(line.split()[1] for line in fingerprint_lines)
    public_keys = [Path(f"{k}.pub").read_text().strip() for k in host_keys]
    banner = "\n".join([
        "-----BEGIN SSH HOST KEY FINGERPRINTS-----", *fingerprint_lines,
        "-----END SSH HOST KEY FINGERPRINTS-----",
        "-----BEGIN SSH HOST KEY KEYS-----", *public_keys,
        "-----END SSH HOST KEY KEYS-----",
    ]) + "\n"
    return SshdSetup(
        command=[SSHD, "-D", "-e", "-f", str(config)],
        console_banner=banner,
        fingerprints=fingerprints,
        config_path=config,
    )


def _require_openssh() -> None:
    missing = [p for p in (SSHD, SSH_KEYGEN) if not os.access(p, os.X_OK)]
    if missing:
        raise RuntimeError(
            f"{' and '.join(missing)} not found: LocalCloud VMs run a real OpenSSH server. "
            "Install it with 'apt-get install openssh-server' (Debian/Ubuntu package "
            "openssh-server, which brings openssh-client's ssh-keygen)."
        )


def _check_listen(address: str, port: int) -> None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"sshd listen address {address!r} is not an IP address") from None
    if ip.version != 4 or ip not in ipaddress.ip_network("127.0.0.0/8"):
        # LocalCloud never touches real networks: every VM lives on a loopback address.
        raise ValueError(f"sshd may only listen on 127.0.0.0/8, not {address}")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"sshd listen port {port!r} is not a TCP port")
    if os.geteuid() != 0 and port < _unprivileged_port_start():
        raise ValueError(
            f"port {port} needs root; when not running as root give the VM's sshd a port "
            f"of {_unprivileged_port_start()} or above"
        )


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def _quoted(value: str) -> str:
    """``value`` inside sshd_config's double quotes (OpenSSH unescapes \\ and \\")."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _key_comment_host(name: str) -> str:
    """``name`` as a hostname for the host keys' comments: the comment is printed inside the
    console's fingerprint block, where any ``SHA256:...`` text would be trusted as a host key."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-.")[:63] or "localhost"


def _ensure_host_key(state_dir: Path, kind: str, host_name: str) -> Path:
    """The host key of type ``kind``: generated the first time, then reused."""
    key = state_dir / f"ssh_host_{kind}_key"
    pub = Path(f"{key}.pub")
    if key.exists() and pub.exists():
        return key
    # Generate under a temporary name and rename, so that an interrupted first boot never
    # leaves a key without its public half (or a half-written key) to be reused.
    tmp = state_dir / f".ssh_host_{kind}_key.{os.getpid()}"
    for stale in (tmp, Path(f"{tmp}.pub")):
        stale.unlink(missing_ok=True)
    _run([SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-C", f"root@{host_name}", "-f", str(tmp)],
         f"ssh-keygen could not create the {kind} host key in {state_dir}")
    os.replace(f"{tmp}.pub", pub)
    os.replace(tmp, key)
    return key


def _render_config(
    state_dir: Path,
    listen: list[tuple[str, int]],
    host_keys: list[Path],
    auth_file: Path,
    session_env: dict[str, str],
    start_dir: Path,
) -> str:
    lines = [
        "# Written by slipstream LocalCloud; regenerated at every boot.",
        *(f"ListenAddress {address}:{port}" for address, port in listen),
        *(f"HostKey {key}" for key in host_keys),
        f"PidFile {state_dir / 'sshd.pid'}",
        f"AuthorizedKeysFile {auth_file}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        "AcceptEnv LANG LC_*",  # as on Ubuntu images: client-sent variables are mostly ignored
        # Many workers may connect at once when a pool scales up; OpenSSH's default (10)
        # starts dropping unauthenticated connections too early for that.
        "MaxStartups 100:30:200",
        f"Subsystem sftp {SFTP_SERVER} -d {start_dir}",
    ]
    if session_env:
        # sshd keeps only the first SetEnv line: every variable must be on it.
        lines.append("SetEnv " + " ".join(f'{k}="{_quoted(v)}"' for k, v in session_env.items()))
    return "\n".join(lines) + "\n"


def _run(argv: list[str], what: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"{what}: {err}") from None
    if done.returncode != 0:
        raise RuntimeError(f"{what}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout

