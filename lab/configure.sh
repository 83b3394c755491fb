#!/bin/bash
# Writes every config file of the lab under $SLIPSTREAM_LAB_HOME/etc (idempotent, ~50 ms; run by `lab.sh up`).
# All listeners are 127.0.0.1. Region IU (as Jetstream2's primary cloud). Services log to stdout/stderr,
# which lab.sh appends to $SLIPSTREAM_LAB_HOME/logs/<service>.log.
set -euo pipefail
LAB=${SLIPSTREAM_LAB_HOME:?}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
X=$LAB/pkg/root                                   # unpacked service packages (paste files)
E=$LAB/etc
DB="mysql+pymysql://os:ospass@127.0.0.1:${SLIPSTREAM_LAB_DB_PORT:-13306}"
RABBIT="rabbit://guest:guest@127.0.0.1:5672/"
KS=http://127.0.0.1:5000
REGION=IU
# oslo.service: on SIGTERM wait at most 3 s for in-flight work (the default 60 s makes `down` slow)
SHUTDOWN="graceful_shutdown_timeout = 3"
case "${SLIPSTREAM_LAB_APPCRED_TRUSTS:-1}" in 0|false|no) APPCRED_TRUSTS=false ;; *) APPCRED_TRUSTS=true ;; esac
mkdir -p $E/{keystone/fernet-keys,keystone/credential-keys,glance,placement,nova,neutron,cinder,heat,rabbitmq} \
         $LAB/data/{glance/images,glance/staging,glance/tasks,nova/instances,neutron,cinder,heat} $LAB/lock

# the lab's own python bits (ML2 mechanism driver, cinder backend, guest virt driver), on PYTHONPATH;
# the guest driver runs the repo's own guest runtime (slipstream.cloud.local): linked, not copied
rm -rf $LAB/pylib; cp -r "$HERE/pylib" $LAB/pylib
ln -s "$(cd "$HERE/.." && pwd)/slipstream" $LAB/pylib/slipstream

authtoken() { # $1 = service user
cat <<EOT
[keystone_authtoken]
www_authenticate_uri = $KS/
auth_url = $KS/
region_name = $REGION
memcached_servers =
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = service
username = $1
password = servicepass
service_token_roles_required = true
EOT
}
svcauth() { # $1 = section, $2 = service user: credentials a service uses to call another one
cat <<EOT
[$1]
auth_url = $KS/
auth_type = password
project_domain_name = Default
user_domain_name = Default
region_name = $REGION
project_name = service
username = $2
password = servicepass
EOT
}
common() { # oslo sections every service shares
cat <<EOT
[oslo_concurrency]
lock_path = $LAB/lock
[oslo_messaging_notifications]
driver = noop
EOT
}

# ------------------------------------------------------------------ rabbitmq (env in lab.sh binds 127.0.0.1)
cat > $E/rabbitmq/rabbitmq.conf <<EOT
listeners.tcp.1 = 127.0.0.1:5672
log.console = false
log.file.level = warning
EOT
echo '[].' > $E/rabbitmq/enabled_plugins

# ------------------------------------------------------------------ keystone
cat > $E/keystone/keystone.conf <<EOT
[DEFAULT]
$SHUTDOWN
[database]
connection = $DB/keystone
[token]
provider = fernet
[identity]
# bcrypt cost 4 instead of 12: every token request hashes a password or app-credential secret (lab only)
password_hash_rounds = 4
[fernet_tokens]
key_repository = $E/keystone/fernet-keys
[credential]
key_repository = $E/keystone/credential-keys
[security_compliance]
# Heat creates a trust for every stack; since LP#2150089 (Debian security update) keystone refuses trust
# operations to application-credential tokens unless this is on. On here so Heat works with the cloud "lab";
# SLIPSTREAM_LAB_APPCRED_TRUSTS=0 turns it off (then stacks fail as on a cloud that keeps the default).
allow_insecure_application_credential_trust_escalation = ${APPCRED_TRUSTS}
EOT

# ------------------------------------------------------------------ glance (file store)
cp $X/usr/share/glance-common/glance-api-paste.ini $E/glance/glance-api-paste.ini
{ cat <<EOT
[DEFAULT]
$SHUTDOWN
bind_host = 127.0.0.1
bind_port = 9292
workers = 1
enabled_backends = file:file
[glance_store]
default_backend = file
[file]
filesystem_store_datadir = $LAB/data/glance/images
[os_glance_staging_store]
filesystem_store_datadir = $LAB/data/glance/staging
[os_glance_tasks_store]
filesystem_store_datadir = $LAB/data/glance/tasks
[database]
connection = $DB/glance
[paste_deploy]
flavor = keystone
config_file = $E/glance/glance-api-paste.ini
EOT
common; authtoken glance; } > $E/glance/glance-api.conf

# ------------------------------------------------------------------ placement
{ cat <<EOT
[DEFAULT]
$SHUTDOWN
[placement_database]
connection = $DB/placement
[api]
auth_strategy = keystone
EOT
authtoken placement; } > $E/placement/placement.conf

# ------------------------------------------------------------------ nova (guest virt driver)
# nova-compute gets its own file without [database]/[api_database] (it must not have DB access).
cp $X/usr/share/nova-common/api-paste.ini $E/nova/api-paste.ini
nova_common() {
cat <<EOT
[DEFAULT]
$SHUTDOWN
transport_url = $RABBIT
my_ip = 127.0.0.1
host = lab-compute
state_path = $LAB/data/nova
instances_path = $LAB/data/nova/instances
# pylib/labguest_driver.py (nova-compute runs as pylib/lab_nova_compute.py): nova's FakeDriver whose
# servers on 127.x addresses boot a real guest (slipstream's LocalCloud guest runtime: process group,
# sshd, user_data, console). It reports one host of 1000 vCPU / 800000 MiB / 600000 GB; the ratios
# make room for many Jetstream2-sized servers (max_unit stays 800000 MiB: every seeded flavour but
# r3.xl fits on the host).
compute_driver = labguest.LabGuestDriver
# a restarted nova-compute boots again the guests of servers that were running (the driver ends
# them all when it stops, as a host shutdown would)
resume_guests_state_on_host_boot = true
cpu_allocation_ratio = 16.0
ram_allocation_ratio = 4.0
disk_allocation_ratio = 1.0
osapi_compute_listen = 127.0.0.1
osapi_compute_workers = 1
metadata_listen = 127.0.0.1
enabled_apis = osapi_compute
reserved_host_memory_mb = 0
[api]
auth_strategy = keystone
[wsgi]
api_paste_config = $E/nova/api-paste.ini
[conductor]
workers = 1
[scheduler]
workers = 1
discover_hosts_in_cells_interval = 10
[glance]
api_servers = http://127.0.0.1:9292
[vnc]
enabled = False
[cinder]
os_region_name = $REGION
auth_url = $KS/
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = service
username = nova
password = servicepass
[service_user]
send_service_user_token = true
auth_url = $KS/
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = service
username = nova
password = servicepass
EOT
common; authtoken nova; svcauth placement placement; svcauth neutron neutron
}
nova_common > $E/nova/nova-compute.conf
{ nova_common; cat <<EOT
[api_database]
connection = $DB/nova_api
[database]
connection = $DB/nova
EOT
} > $E/nova/nova.conf

# ------------------------------------------------------------------ neutron (ML2, no agents)
# Mechanism driver `labnoop` (pylib/labnoop_mech.py) binds every port and marks it ACTIVE; nothing is
# plumbed: no OVS/OVN, no DHCP/L3/metadata agent, no namespace, no interface, no route. Networks,
# subnets, routers and floating IPs exist only as database rows.
cp $X/usr/share/neutron-common/api-paste.ini $E/neutron/api-paste.ini
{ cat <<EOT
[DEFAULT]
$SHUTDOWN
bind_host = 127.0.0.1
bind_port = 9696
api_workers = 1
rpc_workers = 0
rpc_state_report_workers = 0
core_plugin = ml2
# auto_allocate: GET /v2.0/auto-allocated-topology/{project} (Jetstream2's auto_allocated_* names)
service_plugins = router,auto_allocate
auth_strategy = keystone
transport_url = $RABBIT
api_paste_config = $E/neutron/api-paste.ini
state_path = $LAB/data/neutron
notify_nova_on_port_status_changes = true
notify_nova_on_port_data_changes = true
allow_overlapping_ips = true
dhcp_agent_notification = false
[database]
connection = $DB/neutron
EOT
common; authtoken neutron; svcauth nova nova; } > $E/neutron/neutron.conf
cat > $E/neutron/ml2_conf.ini <<EOT
[ml2]
type_drivers = flat,vxlan
tenant_network_types = vxlan
mechanism_drivers = labnoop
extension_drivers = port_security
[ml2_type_flat]
flat_networks = public
[ml2_type_vxlan]
vni_ranges = 1:1000
[securitygroup]
enable_security_group = true
EOT

# ------------------------------------------------------------------ cinder (backend keeps no data)
cp $X/usr/share/cinder-common/api-paste.ini $E/cinder/api-paste.ini
cp $X/etc/cinder/resource_filters.json $E/cinder/resource_filters.json
{ cat <<EOT
[DEFAULT]
$SHUTDOWN
osapi_volume_listen = 127.0.0.1
osapi_volume_listen_port = 8776
osapi_volume_workers = 1
transport_url = $RABBIT
auth_strategy = keystone
api_paste_config = $E/cinder/api-paste.ini
resource_query_filters_file = $E/cinder/resource_filters.json
state_path = $LAB/data/cinder
my_ip = 127.0.0.1
host = lab-volume
enabled_backends = lab
glance_api_servers = http://127.0.0.1:9292
[lab]
volume_driver = labnoop_cinder.LabFakeVolumeDriver
volume_backend_name = lab
[database]
connection = $DB/cinder
EOT
common; authtoken cinder; svcauth nova nova; } > $E/cinder/cinder.conf

# ------------------------------------------------------------------ heat (api + engine; no heat-api-cfn)
cp $X/etc/heat/api-paste.ini $E/heat/api-paste.ini
rm -rf $E/heat/environment.d $E/heat/templates
cp -r $X/etc/heat/environment.d $X/etc/heat/templates $E/heat/
{ cat <<EOT
[DEFAULT]
$SHUTDOWN
transport_url = $RABBIT
num_engine_workers = 1
region_name_for_services = $REGION
heat_metadata_server_url = http://127.0.0.1:8000
heat_waitcondition_server_url = http://127.0.0.1:8000/v1/waitcondition
stack_user_domain_name = heat
stack_domain_admin = heat_domain_admin
stack_domain_admin_password = servicepass
environment_dir = $E/heat/environment.d
template_dir = $E/heat/templates
[heat_api]
bind_host = 127.0.0.1
bind_port = 8004
workers = 1
[paste_deploy]
api_paste_config = $E/heat/api-paste.ini
[database]
connection = $DB/heat
[clients_keystone]
auth_uri = $KS
[ec2authtoken]
auth_uri = $KS/v3
[trustee]
auth_type = password
auth_url = $KS/
username = heat
password = servicepass
user_domain_name = Default
EOT
common; authtoken heat; } > $E/heat/heat.conf
