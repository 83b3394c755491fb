"""Jetstream2 facts slipstream relies on, each with its source.

Sources are keyed as in ``shared/research/jetstream2-facts.md``: JS2DOCS (the js2docs repository,
docs.jetstream-cloud.org's source, early 2024), DOCS-LIVE (stored copies of the live docs), EXO
(Exosphere's source, 2026). Where the live cloud can tell (``openstack flavor list --long``, the
``accounting`` endpoint), the live cloud wins; these are the defaults and the local cloud's truth.

- :data:`FLAVORS` — the flavour catalogue (vCPU, RAM, root disk, share of an A100).
- :data:`SU_PER_VCPU_HOUR` — Service Units per vCPU-hour by family.
- :data:`CHARGE_FRACTION` — the share of that rate charged in each server state.
- :data:`REGIONS`, :data:`DEFAULT_REGION`, :data:`DEFAULT_IMAGE`, network names, auth URL.
"""

from __future__ import annotations

from dataclasses import dataclass

from slipstream.cloud.models import Flavor, ServerStatus


def _gb(n: float) -> int:
    return int(n * 1024)


# JS2DOCS docs/general/vmsizes.md; DOCS-LIVE /general/instance-flavors/ (m3, r3, g3.small-large).
# g3.xl RAM 120 GB: gitlab.com/jetstream-cloud/jetstream2/docs issue #97.
# vGPU shares: "5 GPU slices = 1 A100" (vmsizes.md); g3.medium/large are 1/4 and 1/2 of an A100.
FLAVORS: dict[str, Flavor] = {
    f.name: f
    for f in [
        Flavor("m3.tiny", 1, _gb(3), 20),
        Flavor("m3.small", 2, _gb(6), 20),
        Flavor("m3.quad", 4, _gb(15), 20),
        Flavor("m3.medium", 8, _gb(30), 60),
        Flavor("m3.large", 16, _gb(60), 60),
        Flavor("m3.xl", 32, _gb(125), 60),
        Flavor("m3.2xl", 64, _gb(250), 60),
        Flavor("r3.large", 64, _gb(500), 60),
        Flavor("r3.xl", 128, _gb(1000), 60),
        Flavor("g3.small", 4, _gb(15), 60, gpus=0.2),
        Flavor("g3.medium", 8, _gb(30), 60, gpus=0.25),
        Flavor("g3.large", 16, _gb(60), 60, gpus=0.5),
        Flavor("g3.xl", 32, _gb(120), 60, gpus=1.0),
        # Unverified (see UNVERIFIED_FLAVORS): mmartial/OpenInfra25-GenAI slides citing the live
        # flavours page for g5.xl (1 H100); g4 (L40S) sizes are not published in any source we have.
        Flavor("g4.xl", 32, _gb(120), 60, gpus=1.0),
        Flavor("g5.xl", 20, _gb(240), 300, gpus=1.0),
    ]
}

#: Flavours whose sizes no primary source confirms; the live cloud's numbers must win.
UNVERIFIED_FLAVORS = frozenset({"g4.xl", "g5.xl"})

#: m3.3xl exists but only "by request and with proper justification" (JS2DOCS vmsizes.md).
BY_REQUEST_FLAVORS = frozenset({"m3.3xl", "r3.large", "r3.xl"})

# JS2DOCS docs/general/access.md and DOCS-LIVE /general/access/ (m3 1, r3 2, g3 2 since July 2024);
# EXO src/Helpers/Jetstream2.elm resourceMultiplier (g4 7.0, g5 6.4; GPU cut 4 -> 2 in 982ea2e).
SU_PER_VCPU_HOUR: dict[str, float] = {"m3": 1.0, "r3": 2.0, "g3": 2.0, "g4": 7.0, "g5": 6.4}

# JS2DOCS access.md (ACTIVE 100 %, SUSPENDED 75 %, SHUTOFF 50 %, SHELVED 0 %);
# EXO stateChargeMultiplier for BUILD/ERROR/DELETED (0).
CHARGE_FRACTION: dict[ServerStatus, float] = {
    ServerStatus.BUILD: 0.0,
    ServerStatus.ACTIVE: 1.0,
    ServerStatus.SUSPENDED: 0.75,
    ServerStatus.SHUTOFF: 0.5,
    ServerStatus.SHELVED_OFFLOADED: 0.0,
    ServerStatus.ERROR: 0.0,
    ServerStatus.DELETED: 0.0,
}

#: The separate ACCESS resources (each with its own SU balance) and the families charged to them
#: (JS2DOCS vmsizes.md, resources.md; resource ids from EXO Types/Jetstream2Accounting.elm).
ACCESS_RESOURCES: dict[str, str] = {
    "m3": "jetstream2.indiana.xsede.org",
    "r3": "jetstream2-lm.indiana.xsede.org",
    "g3": "jetstream2-gpu.indiana.xsede.org",
    "g4": "jetstream2-gpu.indiana.xsede.org",
    "g5": "jetstream2-gpu.indiana.xsede.org",
}

#: Families Jetstream2 says must never be suspended (JS2DOCS docs/faq/gpu.md; EXO flavour groups).
NEVER_SUSPEND_FAMILIES = frozenset({"g3", "g4", "g5", "r3"})

# JS2DOCS overview/architecture.md, faq/general-faq.md; EXO cloud_configs.js region ids.
REGIONS: tuple[str, ...] = ("IU", "ASU", "Cornell", "TACC", "UH")
DEFAULT_REGION = "IU"
AUTH_URL = "https://js2.jetstream-cloud.org:5000/v3/"  # JS2DOCS ui/cli/auth.md, openrc examples

# JS2DOCS general/featured.md; EXO cloud_configs.js (Featured-Ubuntu24 is Exosphere's primary).
DEFAULT_IMAGE = "Featured-Ubuntu24"
FEATURED_IMAGE_PREFIX = "Featured-"
# JS2DOCS ui/cli/launch.md: default login users.
LOGIN_USER_BY_DISTRO = {"Ubuntu": "ubuntu", "RockyLinux": "rocky"}

# JS2DOCS faq/security.md, network.md, ui/cli/launch.md.
DEFAULT_NETWORK = "auto_allocated_network"
EXTERNAL_NETWORK = "public"


@dataclass(frozen=True)
class Quotas:
    """A project's compute quotas."""

    instances: int
    cores: int
    ram_mb: int
    floating_ips: int
    volumes: int = 10
    volume_gb: int = 1000


# JS2DOCS docs/general/quotas.md ("under review"), Startup/Research allocations; instance counts
# are not published, so we take Nova's default of 10 per project. Volumes: JS2DOCS storage.md.
RESEARCH_QUOTAS: dict[str, Quotas] = {
    "cpu": Quotas(instances=10, cores=150, ram_mb=_gb(585), floating_ips=10),
    "gpu": Quotas(instances=10, cores=64, ram_mb=_gb(250), floating_ips=4),
    "large-memory": Quotas(instances=10, cores=128, ram_mb=_gb(1000), floating_ips=2),
}


def su_per_hour(flavor: Flavor, status: ServerStatus = ServerStatus.ACTIVE) -> float:
    """What one server of ``flavor`` costs per hour in ``status``, in Jetstream2 SUs."""
    try:
        rate = SU_PER_VCPU_HOUR[flavor.family]
    except KeyError:
        known = ", ".join(sorted(SU_PER_VCPU_HOUR))
        raise ValueError(
            f"no Jetstream2 SU rate for flavour family {flavor.family!r} ({flavor.name}); "
            f"known families: {known}"
        ) from None
    return rate * flavor.vcpus * CHARGE_FRACTION.get(status, 1.0)


def login_user_for_image(image_name: str) -> str:
    """The default login user of a Featured image ("ubuntu" unless a known distro says else)."""
    for distro, user in LOGIN_USER_BY_DISTRO.items():
        if distro in image_name:
            return user
    return "ubuntu"
