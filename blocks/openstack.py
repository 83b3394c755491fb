"""OpenStack credentials as a Prefect block: a Jetstream2 allocation (or any OpenStack project).

Save one in the UI (Blocks → "OpenStack Credentials") or in code, then name it in a flow's
``cloud`` parameter as ``"slipstream-openstack-credentials/<name>"``::

    from slipstream.blocks.openstack import OpenStackCredentials

    # a Jetstream2 application credential (Horizon → Identity → Application Credentials;
    # give it an expiry date — Horizon's default is today)
    OpenStackCredentials(
        application_credential_id="8a1f...",
        application_credential_secret="...",
        region="IU",
    ).save("js2-iu")

    # or a cloud from the clouds.yaml Horizon/Exosphere wrote for you
    OpenStackCredentials(cloud="TRA160003_IU").save("js2-clouds-yaml")

    cloud = OpenStackCredentials.load("js2-iu").get_cloud()     # an OpenStackCloud

The block only turns its fields into arguments for :func:`slipstream.cloud.openstack.connect`,
which signs in at once and explains Jetstream2's usual credential mistakes (leftover ``OS_*``
variables, an expired credential, a region the allocation has no access to). With a ``cloud``,
everything comes from clouds.yaml except the fields set here (``region``, ``api_timeout``); with
an application credential, only these fields count — no clouds.yaml, no ``OS_*`` variables.
"""

from __future__ import annotations

import hashlib
from prefect.blocks.core import Block
from pydantic import Field, PrivateAttr, SecretStr, model_validator

from slipstream.cloud.openstack import OpenStackCloud, connect
from slipstream.jetstream2 import AUTH_URL, EXTERNAL_NETWORK


class OpenStackCredentials(Block):
    """Credentials for an OpenStack project: a clouds.yaml cloud, or an application credential."""

    _block_type_name = "OpenStack Credentials"
    _block_type_slug = "slipstream-openstack-credentials"
    _description = (
        "A Jetstream2 allocation (or any OpenStack project) for slipstream: a cloud from "
        "clouds.yaml, or an application credential id and secret."
    )
    _documentation_url = "https://docs.jetstream-cloud.org/ui/cli/auth/"

    cloud: str | None = Field(
        default=None,
        description="Name of a cloud in clouds.yaml (e.g. TRA160003_IU). Leave empty to use the "
        "application credential below.",
    )
    clouds_yaml_path: str | None = Field(
        default=None,
        description="Path of clouds.yaml on the machine that runs the flow. Empty: the usual "
        "places (./clouds.yaml, ~/.config/openstack/, /etc/openstack/).",
    )
    auth_url: str = Field(
        default=AUTH_URL,
        description="Keystone URL for the application credential (Jetstream2's by default).",
    )
    application_credential_id: str | None = Field(
        default=None,
        description="Application credential ID (Horizon → Identity → Application Credentials).",
    )
    application_credential_secret: SecretStr | None = Field(
        default=None,
        description="Application credential secret. Shown once by Horizon when you create it.",
    )
    region: str | None = Field(
        default=None,
        description="Region, as the project's catalogue names it (Jetstream2: IU, ASU, Cornell, "
        "TACC, UH; elsewhere e.g. RegionOne). Empty: the clouds.yaml cloud's region, else IU "
        "when the catalogue offers it, else the catalogue's only region.",
    )
    external_network: str = Field(
        default=EXTERNAL_NETWORK,
        description="Network that floating IPs come from (Jetstream2: public).",
    )
    api_timeout: float | None = Field(
        default=None,
        gt=0,
        description="Seconds any one request to the cloud may take before it counts as failed "
        "(and is retried). Empty: clouds.yaml's api_timeout, else 60.",
    )
    exosphere_metadata: bool = Field(
        default=True,
        description="On Jetstream2, mark servers so Exosphere shows their creator to teammates. "
        "Has no effect on other clouds.",
    )

    _cached: tuple[str, OpenStackCloud] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_way_in(self) -> OpenStackCredentials:
        has_id = bool(self.application_credential_id)
        has_secret = self.application_credential_secret is not None and bool(
            self.application_credential_secret.get_secret_value()
        )
        if self.cloud and (has_id or has_secret):
            raise ValueError(
                "Fill in either `cloud` (a clouds.yaml name) or the application credential "
                "fields, not both: clear one of them."
            )
        if not self.cloud and not (has_id and has_secret):
            missing = (
                "application_credential_secret"
                if has_id
                else (
                    "application_credential_id"
                    if has_secret
                    else "`cloud`, or the application credential id and secret"
                )
            )
            raise ValueError(f"Missing {missing}: slipstream needs one way to sign in.")
        return self

    def connect_arguments(self) -> dict:
        """The arguments :func:`connect` gets (the secret as plain text: keep this private)."""
        common = {
            "region": self.region or None,
            "api_timeout": self.api_timeout,
            "external_network": self.external_network,
            "exosphere_metadata": None if self.exosphere_metadata else False,
        }
        if self.cloud:
            return {"cloud": self.cloud, "clouds_yaml_path": self.clouds_yaml_path, **common}
        return {
            "auth_url": self.auth_url,
            "application_credential_id": self.application_credential_id,
            "application_credential_secret": self.application_credential_secret.get_secret_value(),
            **common,
        }

    def get_cloud(self) -> OpenStackCloud:
        """The signed-in cloud, built once per set of field values and then reused."""
        args = self.connect_arguments()
        key = hashlib.sha256(
            repr(sorted((k, str(v)) for k, v in args.items())).encode()
        ).hexdigest()
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, connect(**args))
        return self._cached[1]
