"""Building an authenticated, checked connection: :func:`connect`.

Two ways in, as Jetstream2 users have them:

- a cloud from ``clouds.yaml`` (Horizon/Exosphere write one per allocation and region)::

      cloud = connect("TRA160003_IU")                       # ~/.config/openstack/clouds.yaml
      cloud = connect("lab", clouds_yaml_path="/var/tmp/slipstream-lab/clouds.yaml")

- an application credential (Horizon → Identity → Application Credentials)::

      cloud = connect(application_credential_id="...", application_credential_secret="...",
                      region="IU")                          # auth URL defaults to Jetstream2's

``connect`` authenticates at once (one token request) and checks the service catalogue, so that
Jetstream2's usual mistakes surface here, as a :class:`CredentialError` that says what to do,
instead of later as a bare HTTP 401 in the middle of a flow:

- leftover ``OS_USERNAME``/``OS_PROJECT_NAME``/... variables next to an application credential
  (Keystone answers "Application credentials cannot request a scope");
- an expired credential (Horizon's default expiry is *today*);
- a region the project has no access to (regional clouds are by invitation).

No message ever contains the credential's secret.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import openstack.config
import openstack.connection
from keystoneauth1 import exceptions as ks_exc
from openstack import exceptions as sdk_exc

from slipstream.cloud.errors import CloudError
from slipstream.cloud.openstack.errors import EXPIRED_HINT, CredentialError, sdk_errors, translate
from slipstream.jetstream2 import AUTH_URL, DEFAULT_REGION, EXTERNAL_NETWORK

if TYPE_CHECKING:
    from slipstream.cloud.openstack.cloud import OpenStackCloud

#: Variables from a password-era openrc that give an application credential a scope.
SCOPE_VARIABLES = (
    "OS_USERNAME",
    "OS_USER_ID",
    "OS_PASSWORD",
    "OS_PROJECT_NAME",
    "OS_PROJECT_ID",
    "OS_TENANT_NAME",
    "OS_TENANT_ID",
    "OS_USER_DOMAIN_NAME",
    "OS_USER_DOMAIN_ID",
    "OS_PROJECT_DOMAIN_NAME",
    "OS_PROJECT_DOMAIN_ID",
    "OS_DOMAIN_NAME",
    "OS_DOMAIN_ID",
    "OS_SYSTEM_SCOPE",
    "OS_TOKEN",
)
_SCOPE_KEYS = (
    "username",
    "user_id",
    "password",
    "project_name",
    "project_id",
    "tenant_name",
    "tenant_id",
    "user_domain_name",
    "user_domain_id",
    "project_domain_name",
    "project_domain_id",
    "domain_name",
    "domain_id",
    "system_scope",
    "token",
)
_APP_CREDENTIAL = "v3applicationcredential"


def leftover_scope_variables(environ: dict[str, str] | None = None) -> list[str]:
    """The ``OS_*`` variables in ``environ`` that would clash with an application credential."""
    env = os.environ if environ is None else environ
    return [name for name in SCOPE_VARIABLES if env.get(name)]


#: Seconds any one HTTP request may take (connect or read) unless clouds.yaml sets ``api_timeout``:
#: a stalled TCP connection must fail a poll or a delete, not block it past every deadline.
API_TIMEOUT = 60.0


def connect(
    cloud: str | None = None,
    *,
    clouds_yaml_path: str | Path | None = None,
    auth_url: str = AUTH_URL,
    application_credential_id: str | None = None,
    application_credential_secret: str | None = None,
    region: str | None = None,
    external_network: str = EXTERNAL_NETWORK,
    exosphere_metadata: bool | None = None,
    ignore_environment: bool = False,
    api_timeout: float | None = None,
) -> OpenStackCloud:
    """An :class:`OpenStackCloud` for a ``clouds.yaml`` cloud or an application credential.

    Where each setting comes from:

    - with ``cloud``: everything from that cloud in ``clouds.yaml`` (``clouds_yaml_path``, else
      the usual places); ``region`` overrides the file's region when given;
    - with an application credential: only the given fields (``auth_url``, id, secret,
      ``region``) — never a ``clouds.yaml`` nor ``OS_*`` variables;
    - the region, in both cases, must be one the project's catalogue offers (checked at sign-in,
      the error lists them); none given and none in clouds.yaml: IU if offered (Jetstream2's
      primary region), else the catalogue's only region;
    - ``api_timeout`` (seconds per HTTP request): the argument, else clouds.yaml's
      ``api_timeout``, else :data:`API_TIMEOUT`.

    ``exosphere_metadata`` (default: on for Jetstream2 auth URLs) makes servers show their
    creator in Exosphere. With an explicit credential, leftover ``OS_*`` scope variables are an
    error unless ``ignore_environment`` (slipstream never reads them, but your ``openstack`` CLI
    in the same shell will fail with "Application credentials cannot request a scope").
    """
    from slipstream.cloud.openstack.cloud import OpenStackCloud

    if cloud and (application_credential_id or application_credential_secret):
        raise CredentialError(
            "give either a clouds.yaml cloud name or an application credential, not both",
            resource=cloud,
            hint="Drop the cloud name to use the credential, or drop the credential fields.",
        )
    label = cloud or "openstack"
    if cloud:
        region_config = _cloud_from_yaml(cloud, clouds_yaml_path, region)
    elif application_credential_id and application_credential_secret:
        leftovers = [] if ignore_environment else leftover_scope_variables()
        if leftovers:
            raise CredentialError(
                "an application credential is already scoped to one project, but these "
                f"variables ask for a scope too: {', '.join(leftovers)}",
                resource=f"application credential {application_credential_id}",
                hint=f"Unset them (`unset {' '.join(leftovers)}`) — they come from an older openrc "
                '— or else Keystone answers "Application credentials cannot request a scope".',
            )
        # No clouds.yaml, no environment: a file in ./ or ~/.config/openstack/ holding one cloud
        # would otherwise be merged into the credential (its region, its project scope).
        region_config = openstack.config.OpenStackConfig(
            load_yaml_config=False, load_envvars=False
        ).get_one(
            auth_type=_APP_CREDENTIAL,
            auth={
                "auth_url": auth_url,
                "application_credential_id": application_credential_id,
                "application_credential_secret": application_credential_secret,
            },
            interface="public",
            identity_api_version="3",
        )
    else:
        raise CredentialError(
            "no credentials given",
            hint="Name a cloud from clouds.yaml, or give an application credential id and secret "
            "(Horizon → Identity → Application Credentials).",
        )
    if api_timeout is not None or not region_config.config.get("api_timeout"):
        region_config.config["api_timeout"] = api_timeout or API_TIMEOUT
    wanted_region = region or region_config.get_region_name() or None
    region_config.config["region_name"] = wanted_region
    conn = openstack.connection.Connection(config=region_config)
    url = str(region_config.config.get("auth", {}).get("auth_url", ""))
    cloud_obj = OpenStackCloud(
        conn,
        name=f"{label}:{wanted_region or 'default'}",
        region=wanted_region,
        external_network=external_network,
        exosphere_metadata="jetstream-cloud.org" in url
        if exosphere_metadata is None
        else exosphere_metadata,
    )
    who = f"application credential {application_credential_id}" if application_credential_id else "credentials"
    access = _authenticate(conn, cloud_obj.name, who)
    # The catalogue decides the region before any service is asked (proxies read it on first use).
    chosen = _catalogue_region(access, wanted_region, who, cloud_obj.name)
    region_config.config["region_name"] = chosen
    cloud_obj.region, cloud_obj.name = chosen, f"{label}:{chosen}"
    with sdk_errors("reading the user name", cloud=cloud_obj.name):
        cloud_obj.username = access.username
    return cloud_obj


def _cloud_from_yaml(cloud: str, path: str | Path | None, region: str | None):
    if path and not Path(path).is_file():
        raise CredentialError(
            f"clouds.yaml not found at {path}",
            resource=cloud,
            hint="Give the path of the clouds.yaml Horizon or Exosphere wrote for you.",
        )
    config = openstack.config.OpenStackConfig(
        config_files=[str(path)] if path else None, load_envvars=False
    )
    try:
        try:
            region_config = config.get_one(cloud=cloud, region_name=region)
        except sdk_exc.ConfigException as err:
            if not region or "not a valid region name" not in str(err):
                raise
            # A region the file does not list (Exosphere writes one cloud per region): the
            # catalogue, checked at sign-in, is the judge of whether the project has it.
            region_config = config.get_one(cloud=cloud)
    except (sdk_exc.ConfigException, ks_exc.ClientException, TypeError) as err:
        where = str(path) if path else "clouds.yaml (./, ~/.config/openstack/, /etc/openstack/)"
        raise CredentialError(
            f"cloud {cloud!r} cannot be used: {err}",
            resource=where,
            hint="Check the cloud's name and region in clouds.yaml (`openstack --os-cloud NAME "
            "token issue` tests it).",
        ) from None
    auth = region_config.config.get("auth", {})
    if region_config.config.get("auth_type") == _APP_CREDENTIAL:
        scoped = [k for k in _SCOPE_KEYS if auth.get(k)]
        if scoped:
            raise CredentialError(
                f"cloud {cloud!r} has an application credential and also {', '.join(scoped)}",
                resource=str(path or "clouds.yaml"),
                hint="Remove those keys: an application credential is already scoped to its "
                'project, and Keystone answers "Application credentials cannot request a scope".',
            )
    return region_config


def _authenticate(conn, name: str, who: str):
    """Get a token (one request): the Keystone access info, with its catalogue and user name."""
    try:
        return conn.session.auth.get_access(conn.session)
    except ks_exc.Unauthorized as err:
        scope = "cannot request a scope" in str(getattr(err, "details", "") or err)
        raise CredentialError(
            f"Keystone refused the {who} (HTTP 401"
            + (": application credentials cannot request a scope)" if scope else ")"),
            resource=who,
            cloud=name,
            hint="Remove project/user/domain settings next to the application credential."
            if scope
            else EXPIRED_HINT,
        ) from None
    except (ks_exc.ClientException, sdk_exc.SDKException) as err:
        error = translate(err, "signing in", who, name)
        if isinstance(error, CloudError) and _status(err) in (400, 404):
            raise CredentialError(
                error.message, resource=who, cloud=name, hint=EXPIRED_HINT
            ) from None
        raise error from err


def _catalogue_region(access, wanted: str | None, who: str, name: str) -> str:
    """``wanted`` if the project's catalogue has compute there; with none wanted, IU when offered
    (Jetstream2's primary region), else the only region offered."""
    catalog = access.service_catalog.catalog or []
    compute = sorted(
        {
            ep.get("region_id") or ep.get("region")
            for svc in catalog
            if svc.get("type") == "compute"
            for ep in svc.get("endpoints", [])
        }
        - {None}
    )
    if wanted in compute:
        return wanted
    if wanted is None and (DEFAULT_REGION in compute or len(compute) == 1):
        return DEFAULT_REGION if DEFAULT_REGION in compute else compute[0]
    asked = f"in region {wanted!r}" if wanted else "without a region"
    raise CredentialError(
        f"the project has no compute service {asked}; its catalogue offers "
        f"{', '.join(compute) or 'no regions'}",
        resource=who,
        cloud=name,
        hint=f"Set the region to one of: {', '.join(compute) or 'none'}. Jetstream2 grants IU by "
        "default; ASU, Cornell, TACC and UH are by request.",
    )


def _status(err: BaseException) -> int | None:
    return getattr(err, "status_code", None) or getattr(err, "http_status", None)
