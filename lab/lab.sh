#!/bin/bash
# slipstream's OpenStack lab: a real, minimal OpenStack (Debian bookworm = Zed) on this machine,
# every service bound to 127.0.0.1, seeded like Jetstream2. See lab/README.md.
#
#   lab/lab.sh install   apt packages (idempotent, seconds when already done) + service launchers
#   lab/lab.sh up        configure, (first time) init DBs/keystone/catalog/seed, start all, wait READY
#   lab/lab.sh down      stop every process the lab started (by recorded PID / process group), verify
#   lab/lab.sh status    one line per service, exit 0 only when all are running
#   lab/lab.sh smoke     end-to-end check with the repo's openstacksdk and the non-admin cloud `lab`
#   lab/lab.sh reset     down + wipe all state (keeps the unpacked packages)
#   lab/lab.sh mem       RSS/PSS per service
#
# Env: SLIPSTREAM_LAB_HOME (default /var/tmp/slipstream-lab) holds everything: configs, DB datadir,
#      logs, pids, clouds.yaml. SLIPSTREAM_LAB_DB_PORT (13306), SLIPSTREAM_LAB_TIMEOUT (up deadline, 600 s).
# Safety: only loopback. Neutron networks/subnets/floating IPs are database records: no agent, no
#      namespace, no interface, no route is ever created. Processes are ended only by recorded PID/PGID.
set -euo pipefail
set +m   # no job control: background jobs stay in our process group, so `setsid` execs without forking
         # and $! is the new session/process-group leader (its PID == PGID)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export SLIPSTREAM_LAB_HOME=${SLIPSTREAM_LAB_HOME:-/var/tmp/slipstream-lab}
export SLIPSTREAM_LAB_DB_PORT=${SLIPSTREAM_LAB_DB_PORT:-13306}
LAB=$SLIPSTREAM_LAB_HOME
PKG=$LAB/pkg                     # downloaded service .debs, unpacked (launchers + paste files)
B=$PKG/root/usr/bin              # service launchers (10-line pbr wrappers for /usr/bin/python3)
E=$LAB/etc
LOGS=$LAB/logs
RUN=$LAB/run
STATE=$LAB/state                 # marker files: first-start work already done
SOCK=$LAB/mysqld/mysqld.sock
GUEST_USER=ubuntu                # slipstream.jetstream2.login_user_for_image("Featured-Ubuntu24")
PY=/usr/bin/python3              # Debian's python: the OpenStack packages live there (not pyenv's)
TIMEOUT=${SLIPSTREAM_LAB_TIMEOUT:-600}
# Every process the lab starts carries this variable in its environment (inherited by its children):
# `down` uses it to verify that nothing of the lab is left running.
TAG="SLIPSTREAM_LAB_PROC=$LAB"
export OS_CLIENT_CONFIG_FILE=$LAB/clouds.yaml

T0=$EPOCHREALTIME
el() { printf '[%6.1fs] %s\n' "$(awk "BEGIN{print $EPOCHREALTIME - $T0}")" "$*"; }
die() { echo "lab: ERROR: $*" >&2; exit 1; }
remaining() { local r=$((DEADLINE - SECONDS)); [ $r -gt 0 ] && echo $r || echo 1; }   # seconds to the deadline

APT_PKGS="python3-keystone python3-nova python3-glance python3-placement python3-neutron python3-cinder
  python3-heat python3-pymysql python3-openstacksdk mariadb-server mariadb-client rabbitmq-server
  uwsgi-core uwsgi-plugin-python3 procps util-linux openssh-server python3-yaml"
# (service package : python library whose version it must match) - only unpacked, never installed,
# so no postinst/debconf/init script runs; we take their /usr/bin launchers and api-paste files.
SVC_DEBS="glance-common:python3-glance glance-api:python3-glance nova-common:python3-nova nova-api:python3-nova
  nova-conductor:python3-nova nova-scheduler:python3-nova nova-compute:python3-nova neutron-common:python3-neutron
  neutron-server:python3-neutron cinder-common:python3-cinder cinder-api:python3-cinder
  cinder-scheduler:python3-cinder cinder-volume:python3-cinder heat-common:python3-heat heat-api:python3-heat
  heat-engine:python3-heat"

# ------------------------------------------------------------------------------------------ install
installed() { dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q 'install ok installed'; }
install() {
  [ "$(id -u)" = 0 ] || die "install needs root (apt-get)"
  local p missing="" made_policy=0
  for p in $APT_PKGS; do installed $p || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    el "apt-get install:$missing"
    if [ ! -e /usr/sbin/policy-rc.d ]; then   # keep package scripts from starting system mariadb/rabbitmq
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
    fi
    local apt="apt-get -o DPkg::Lock::Timeout=900 -q -y"
    DEBIAN_FRONTEND=noninteractive $apt update >/dev/null
    local rc=0
    DEBIAN_FRONTEND=noninteractive $apt install --no-install-recommends $missing > $LOGS/apt-install.log 2>&1 || rc=$?
    if [ $made_policy = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    [ $rc = 0 ] || { tail -n 30 $LOGS/apt-install.log >&2; die "apt-get install failed (log: $LOGS/apt-install.log)"; }
  fi
  # service launchers, unpacked at the exact version of the installed libraries
  local want d
  want=$(for d in $SVC_DEBS; do echo "${d%%:*}=$(dpkg-query -W -f='${Version}' ${d#*:})"; done)
  if [ ! -x $B/nova-api ] || [ "$(cat $PKG/versions 2>/dev/null)" != "$want" ]; then
    el "unpacking service launchers"
    rm -rf $PKG; mkdir -p $PKG/debs; chown _apt $PKG/debs 2>/dev/null || true
    (cd $PKG/debs && { apt-get -q download $want >/dev/null 2>&1 \
        || apt-get -q download $(for d in $SVC_DEBS; do echo ${d%%:*}; done) >/dev/null; })
    for d in $PKG/debs/*.deb; do dpkg-deb -x "$d" $PKG/root; done
    [ -x $B/nova-api ] || die "service launchers missing after unpacking"
    echo "$want" > $PKG/versions
  fi
  # Lab guests (pylib/labguest_driver.py) log in as the Featured images' default user, and their
  # sshd runs as root: the account must exist. No password ('*', not '!': sshd refuses a locked
  # account), home / (sessions get the guest's HOME; / only spares sshd a chdir warning), system uid.
  if ! getent passwd $GUEST_USER >/dev/null; then
    local group=""; getent group $GUEST_USER >/dev/null && group="-g $GUEST_USER"   # useradd refuses to make it twice
    useradd --system --no-create-home --home-dir / --shell /bin/sh -p '*' $group $GUEST_USER
    el "install: created login user $GUEST_USER for lab guests"
  fi
  el "install: done"
}

# ------------------------------------------------------------------------------- process handling
# $RUN/NAME.pid holds "PID STARTTIME" (STARTTIME = field 22 of /proc/PID/stat): a recorded PID is trusted,
# and ever signalled, only while the process with that PID is the very one we started (no stale-PID
# accidents after a reboot). Each service is its own session and process group: PID == PGID == SID.
starttime() { local s; s=$(cat /proc/$1/stat 2>/dev/null) || return 0; s=${s##*) }; set -- $s; [ "$1" != Z ] && echo ${20}; }
svc_pid() { # NAME -> prints the PID when the recorded process is alive
  local rec; rec=$(cat $RUN/$1.pid 2>/dev/null) || return 1
  [ -n "${rec#* }" ] && [ "$(starttime ${rec%% *})" = "${rec#* }" ] && echo ${rec%% *}
}
alive() { svc_pid $1 >/dev/null; }
tail_log() { # name [lines]
  local f=$LOGS/$1.log
  echo "---- last ${2:-40} lines of $f" >&2
  tail -n ${2:-40} $f >&2 2>/dev/null || echo "(no log)" >&2
  echo "----" >&2
}
fail_svc() { echo "lab: ERROR: $1: $2" >&2; tail_log $1; echo "lab: stop what is running with: $HERE/lab.sh down" >&2; exit 1; }

# start NAME [VAR=value ...] COMMAND [ARGS ...]
# A fresh environment (nothing of the caller's OS_*, PYTHONPATH, venv leaks in), its own session and
# process group (setsid), output appended to $LOGS/NAME.log, PID (== PGID) recorded in $RUN/NAME.pid.
start() {
  local name=$1; shift
  alive $name && return 0
  echo "==== $(date -Is) lab.sh start $name" >> $LOGS/$name.log
  setsid env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root "$TAG" "$@" \
    >> $LOGS/$name.log 2>&1 < /dev/null &
  echo "$! $(starttime $!)" > $RUN/$name.pid
}

wait_port() { # NAME PORT: until 127.0.0.1:PORT accepts; fail fast when NAME died; deadline
  until (exec 3<>/dev/tcp/127.0.0.1/$2) 2>/dev/null; do
    alive $1 || fail_svc $1 "exited before listening on 127.0.0.1:$2"
    [ $SECONDS -lt $DEADLINE ] || fail_svc $1 "not listening on 127.0.0.1:$2 after ${TIMEOUT}s"
    sleep 0.2
  done
}

# stop NAME...: TERM every process group at once, wait (<= 30 s) for the groups to empty, then KILL.
stop() {
  local n p pids="" left="" i
  for n in "$@"; do
    if p=$(svc_pid $n); then pids="$pids $p"; kill -TERM -- -$p 2>/dev/null || true; fi
  done
  for i in $(seq 1 150); do
    left=""; for p in $pids; do pgrep -g $p >/dev/null && left="$left $p"; done
    [ -z "$left" ] && break
    sleep 0.2
  done
  for p in $left; do echo "lab: process group $p still there 30 s after TERM: KILL" >&2; kill -KILL -- -$p 2>/dev/null || true; done
  for n in "$@"; do rm -f $RUN/$n.pid; done
}

# PIDs still running that the lab started: members of a recorded session (left their process group),
# or carrying the lab's environment tag (inherited by every child, unless it rewrote its environment).
leftovers() {
  local d s
  for s in "$@"; do pgrep -s $s || true; done
  for d in /proc/[0-9]*; do grep -qxzF "$TAG" $d/environ 2>/dev/null && echo ${d#/proc/}; done
  true
}

OS_SERVICES="keystone placement glance-api neutron-server nova-api nova-conductor nova-scheduler nova-compute
  cinder-api cinder-scheduler cinder-volume heat-api heat-engine"
ALL_SERVICES="mariadb epmd rabbitmq $OS_SERVICES"

down() {
  local n sids="" left p
  for n in $ALL_SERVICES; do sids="$sids $(svc_pid $n || true)"; done
  stop nova-compute heat-engine heat-api cinder-volume cinder-scheduler cinder-api nova-scheduler \
       nova-conductor nova-api neutron-server glance-api placement keystone
  el "openstack services stopped"
  if alive rabbitmq; then   # as the reference: ask the node to shut down cleanly, then end its group
    timeout 60 setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups env -i HOME=/var/lib/rabbitmq \
      PATH=/usr/sbin:/usr/bin:/sbin:/bin /usr/lib/rabbitmq/bin/rabbitmqctl -n rabbit@localhost shutdown \
      >> $LOGS/rabbitmq.log 2>&1 || echo "lab: rabbitmqctl shutdown failed; stopping rabbitmq by its group" >&2
  fi
  stop rabbitmq
  stop epmd
  el "rabbitmq stopped"
  stop mariadb
  el "mariadb stopped"
  left=$(leftovers $sids | sort -u)
  if [ -n "$left" ]; then
    echo "lab: leftover lab processes:" $left "- KILL" >&2
    for p in $left; do kill -KILL $p 2>/dev/null || true; done
    sleep 1; left=$(leftovers $sids | sort -u)
  fi
  [ -z "$left" ] || die "processes still running after down: $left"
  el "down: nothing of the lab is running"
}

status() {
  local n p rec up=0 total=0
  for n in $ALL_SERVICES; do
    total=$((total + 1))
    if p=$(svc_pid $n); then up=$((up + 1)); printf 'up    %-16s %s\n' $n $p
    elif rec=$(cat $RUN/$n.pid 2>/dev/null); then printf 'dead  %-16s %s\n' $n ${rec%% *}
    else printf 'down  %-16s -\n' $n; fi
  done
  if [ $up = $total ]; then echo "lab: running ($up/$total services) home=$LAB clouds=$LAB/clouds.yaml"; return 0
  elif [ $up = 0 ]; then echo "lab: stopped (home=$LAB)"; return 3
  else echo "lab: degraded ($up/$total services up) home=$LAB"; return 1; fi
}

# ---------------------------------------------------------------------------------------- up
PORTS="mariadb:$SLIPSTREAM_LAB_DB_PORT epmd:4369 rabbitmq:5672 rabbitmq:25672 keystone:5000 placement:8778
  glance-api:9292 neutron-server:9696 nova-api:8774 cinder-api:8776 heat-api:8004"
preflight() { # a port taken by someone else would make a service die, or worse, a wait succeed wrongly
  local sp
  for sp in $PORTS; do
    alive ${sp%%:*} && continue
    if (exec 3<>/dev/tcp/127.0.0.1/${sp#*:}) 2>/dev/null; then
      die "127.0.0.1:${sp#*:} (for ${sp%%:*}) is taken by a process this lab did not start: ss -ltnp 'sport = :${sp#*:}'"
    fi
  done
}
mysqlroot() { mysql --socket=$SOCK -uroot "$@"; }

start_infra() {
  mkdir -p $LAB/rabbitmq $LOGS/rabbitmq $LAB/mysqld
  chown rabbitmq:rabbitmq $LAB/rabbitmq $LOGS/rabbitmq; chown mysql:mysql $LAB/mysqld
  if [ ! -d $LAB/mysql/mysql ]; then
    rm -rf $LAB/mysql; mkdir -p $LAB/mysql; chown mysql:mysql $LAB/mysql
    timeout 300 mariadb-install-db --user=mysql --datadir=$LAB/mysql --auth-root-authentication-method=socket \
      --skip-test-db > $LOGS/mariadb-install.log 2>&1 || { tail -n 30 $LOGS/mariadb-install.log; die "mariadb-install-db failed"; }
  fi
  start mariadb /usr/sbin/mariadbd --no-defaults --user=mysql --datadir=$LAB/mysql --socket=$SOCK \
    --pid-file=$LAB/mysqld/mariadbd.pid --bind-address=127.0.0.1 --port=$SLIPSTREAM_LAB_DB_PORT \
    --skip-name-resolve --max-connections=500 --innodb-buffer-pool-size=128M \
    --innodb-flush-log-at-trx-commit=2 --innodb-doublewrite=0 --character-set-server=utf8mb4 \
    --collation-server=utf8mb4_general_ci --log-error=$LOGS/mariadb.err
  start epmd /usr/bin/epmd -address 127.0.0.1
  # rabbitmq as the rabbitmq user without su (`su -c` opens a new session that would escape our group);
  # node, listener and Erlang distribution on 127.0.0.1; +sbwt none: idle schedulers do not spin (2 cores)
  start rabbitmq HOME=/var/lib/rabbitmq RABBITMQ_NODENAME=rabbit@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    ERL_EPMD_ADDRESS=127.0.0.1 ERL_CRASH_DUMP=$LOGS/rabbitmq/erl_crash.dump \
    RABBITMQ_MNESIA_BASE=$LAB/rabbitmq RABBITMQ_LOG_BASE=$LOGS/rabbitmq \
    RABBITMQ_CONFIG_FILE=$E/rabbitmq/rabbitmq.conf RABBITMQ_ENABLED_PLUGINS_FILE=$E/rabbitmq/enabled_plugins \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1} +sbwt none +sbwtdcpu none +sbwtdio none" \
    setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups /usr/lib/rabbitmq/bin/rabbitmq-server
  until mysqladmin --socket=$SOCK ping >/dev/null 2>&1; do
    alive mariadb || { cat $LOGS/mariadb.err >> $LOGS/mariadb.log 2>/dev/null; fail_svc mariadb "exited at start"; }
    [ $SECONDS -lt $DEADLINE ] || fail_svc mariadb "no answer after ${TIMEOUT}s"
    sleep 0.2
  done
  el "mariadb ready"
}

db_init() {  # first start only (marker $STATE/db)
  local db
  mysqlroot -e "CREATE USER IF NOT EXISTS 'os'@'127.0.0.1' IDENTIFIED BY 'ospass'"
  for db in keystone glance placement nova_api nova nova_cell0 neutron cinder heat; do
    mysqlroot -e "CREATE DATABASE IF NOT EXISTS $db; GRANT ALL ON $db.* TO 'os'@'127.0.0.1'"
  done
  local K="keystone-manage --config-file $E/keystone/keystone.conf" N="$B/nova-manage --config-file $E/nova/nova.conf"
  local url=http://127.0.0.1:5000/v3/ jobs="" j left
  left=$(remaining)
  # One job per service, in parallel, each under `timeout` (which signals the job's whole process group).
  # (the *-manage tools may print an eventlet 'getcurrent' traceback at exit: harmless; results are checked below)
  job() { timeout $left bash -ec "$2" > $LOGS/init-$1.log 2>&1 & jobs="$jobs $!"; }
  job keystone "$K db_sync; $K fernet_setup --keystone-user root --keystone-group root
    $K credential_setup --keystone-user root --keystone-group root
    $K bootstrap --bootstrap-password adminpass --bootstrap-admin-url $url --bootstrap-internal-url $url \
       --bootstrap-public-url $url --bootstrap-region-id IU"
  job glance "$B/glance-manage --config-file $E/glance/glance-api.conf db_sync"
  job placement "placement-manage --config-file $E/placement/placement.conf db sync"
  job nova "$N api_db sync
    $N cell_v2 map_cell0 --database_connection mysql+pymysql://os:ospass@127.0.0.1:$SLIPSTREAM_LAB_DB_PORT/nova_cell0
    $N cell_v2 create_cell --name cell1; $N db sync"
  job neutron "$B/neutron-db-manage --config-file $E/neutron/neutron.conf --config-file $E/neutron/ml2_conf.ini upgrade head"
  job cinder "$B/cinder-manage --config-file $E/cinder/cinder.conf db sync"
  job heat "$B/heat-manage --config-file $E/heat/heat.conf db_sync"
  for j in $jobs; do wait $j || true; done   # only these PIDs (a bare `wait` would wait for the daemons)
  local q n bad=0
  for q in "keystone:endpoint" "glance:alembic_version" "placement:alembic_version" "nova_api:cell_mappings" \
           "nova:alembic_version" "neutron:alembic_version" "cinder:alembic_version" "heat:migrate_version"; do
    n=$(mysqlroot -N ${q%%:*} -e "SELECT count(*) FROM ${q#*:}" 2>/dev/null || echo 0)
    if [ "${n:-0}" -lt 1 ]; then
      bad=1; echo "lab: ERROR: database init failed for ${q%%:*}" >&2
      tail -n 30 $LOGS/init-${q%%_*}.log >&2 2>/dev/null || true
    fi
  done
  [ $bad = 0 ] || die "database initialisation failed (logs: $LOGS/init-*.log)"
  el "databases created and synced"
}

up() {
  [ "$(id -u)" = 0 ] || die "up needs root (services run as mysql/rabbitmq users)"
  [ -x $B/nova-api ] || install
  DEADLINE=$((SECONDS + TIMEOUT))
  mkdir -p $LOGS $RUN $STATE; chmod 755 $LAB
  preflight
  "$HERE/configure.sh"
  $PY "$HERE/seed.py" clouds               # clouds.yaml (admin, plus `lab` once seeded), mode 0600
  start_infra
  [ -f $STATE/db ] || { db_init; touch $STATE/db; }
  start keystone /usr/bin/uwsgi --plugin python3 --http11-socket 127.0.0.1:5000 \
    --wsgi-file /usr/bin/keystone-wsgi-public --master --processes 2 --threads 2 --lazy-apps --die-on-term \
    --need-app --env OS_KEYSTONE_CONFIG_FILES=$E/keystone/keystone.conf
  wait_port keystone 5000; el "keystone listening"
  # seed.py's steps are idempotent; each marker holds the hash of the seed.py that ran it, so an
  # edited seed.py (say, a new flavour) runs again on the next `up` (changed values need `reset`)
  local seedhash; seedhash=$(sha256sum < "$HERE/seed.py")
  if [ "$(cat $STATE/registered 2>/dev/null)" != "$seedhash" ]; then   # service users, catalog, heat domain
    timeout $(remaining) $PY "$HERE/seed.py" register || die "registering services in keystone failed"
    echo "$seedhash" > $STATE/registered; el "keystone: service users and catalog registered"
  fi
  # everything below needs its keystone service user (nova-conductor/scheduler die without it).
  # First what does not talk to rabbitmq (or copes with it late), while rabbitmq boots...
  start placement /usr/bin/uwsgi --plugin python3 --http11-socket 127.0.0.1:8778 \
    --wsgi-file /usr/bin/placement-api --master --processes 1 --threads 4 --lazy-apps --die-on-term \
    --need-app --env OS_PLACEMENT_CONFIG_DIR=$E/placement
  start glance-api $B/glance-api --config-file $E/glance/glance-api.conf
  start neutron-server PYTHONPATH=$LAB/pylib $B/neutron-server --config-file $E/neutron/neutron.conf \
    --config-file $E/neutron/ml2_conf.ini
  start nova-api $B/nova-api --config-file $E/nova/nova.conf
  start cinder-api $B/cinder-api --config-file $E/cinder/cinder.conf
  start heat-api $B/heat-api --config-file $E/heat/heat.conf
  # ...then the RPC services, once rabbitmq answers (saves their reconnect back-off)
  wait_port rabbitmq 5672; el "rabbitmq ready"
  start nova-conductor $B/nova-conductor --config-file $E/nova/nova.conf
  start nova-scheduler $B/nova-scheduler --config-file $E/nova/nova.conf
  start cinder-scheduler $B/cinder-scheduler --config-file $E/cinder/cinder.conf
  start cinder-volume PYTHONPATH=$LAB/pylib $B/cinder-volume --config-file $E/cinder/cinder.conf
  start heat-engine $B/heat-engine --config-file $E/heat/heat.conf
  wait_port placement 8778
  # needs placement. pylib/lab_nova_compute.py is nova-compute with the guest driver; $LAB/pylib also
  # links the repo's slipstream package (the guest runtime)
  start nova-compute PYTHONPATH=$LAB/pylib $PY $LAB/pylib/lab_nova_compute.py --config-file $E/nova/nova-compute.conf
  wait_port glance-api 9292; wait_port neutron-server 9696; wait_port nova-api 8774
  wait_port cinder-api 8776; wait_port heat-api 8004; el "all APIs listening"
  timeout $(($(remaining) + 30)) $PY "$HERE/wait_ready.py" $(remaining) || exit 1
  el "services ready"
  if [ "$(cat $STATE/seeded 2>/dev/null)" != "$seedhash" ]; then
    timeout $(remaining) $PY "$HERE/seed.py" populate || die "seeding failed"
    echo "$seedhash" > $STATE/seeded; el "seeded like Jetstream2"
  fi
  $PY "$HERE/seed.py" clouds
  el "READY: OS_CLIENT_CONFIG_FILE=$LAB/clouds.yaml, clouds: lab (app credential, project TRA160003), lab-admin"
}

smoke() {
  local py=${SMOKE_PY:-$REPO/.venv/bin/python}
  [ -x "$py" ] || py=$PY
  "$py" "$HERE/smoke.py"
}

mem() {
  local n p q rss pss cnt trss=0 tpss=0
  for n in $ALL_SERVICES; do
    p=$(svc_pid $n) || continue
    rss=0; pss=0; cnt=0
    for q in $(pgrep -g $p); do
      read -r r s < <(awk '/^Rss:/{r=$2} /^Pss:/{s=$2} END{print r+0, s+0}' /proc/$q/smaps_rollup 2>/dev/null || echo 0 0)
      rss=$((rss + r)); pss=$((pss + s)); cnt=$((cnt + 1))
    done
    trss=$((trss + rss)); tpss=$((tpss + pss))
    printf '%-16s procs=%-2d RSS=%5d MB  PSS=%5d MB\n' $n $cnt $((rss / 1024)) $((pss / 1024))
  done
  printf '%-16s          RSS=%5d MB  PSS=%5d MB\n' TOTAL $((trss / 1024)) $((tpss / 1024))
}

reset() {
  down
  rm -rf $LAB/mysql $LAB/mysqld $LAB/rabbitmq $LAB/data $E $LOGS $RUN $STATE $LAB/lock $LAB/pylib $LAB/clouds.yaml
  el "reset: state wiped under $LAB (packages kept in $PKG)"
}

mkdir -p $LAB $LOGS $RUN
case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  status) status ;;
  smoke) smoke ;;
  reset) reset ;;
  mem) mem ;;
  *) echo "usage: $0 install|up|down|status|smoke|reset|mem" >&2; exit 2 ;;
esac
