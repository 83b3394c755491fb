"""Agent-less ML2 mechanism driver for the slipstream lab.

Binds every port on the first segment offered (vif_type=ovs) and marks it ACTIVE, so nova's fake
driver can boot servers with real neutron ports while no L2 agent, OVS or OVN exists. Nothing is
plumbed: the port is a database row. Registered through labnoop_mech-0.1.dist-info/entry_points.txt
(found by stevedore when this folder is on PYTHONPATH).
"""

from neutron_lib import constants
from neutron_lib.api.definitions import portbindings
from neutron_lib.plugins.ml2 import api


class NoopBindMechanismDriver(api.MechanismDriver):
    def initialize(self):
        pass

    def bind_port(self, context):
        for segment in context.segments_to_bind:
            context.set_binding(
                segment[api.ID],
                portbindings.VIF_TYPE_OVS,
                {portbindings.CAP_PORT_FILTER: True, portbindings.OVS_HYBRID_PLUG: False},
                status=constants.PORT_STATUS_ACTIVE,
            )
            return
