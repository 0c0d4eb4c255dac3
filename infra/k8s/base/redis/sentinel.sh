#!/bin/sh
# The sentinel beside each Redis: three of them (quorum 2) watch the primary, agree that it is
# down, promote a replica and tell clients (MAGNUS_REDIS_URL is a sentinel:// URL) where the
# primary now is.
#
# Sentinel rewrites its config file as it learns, so it is written to an emptyDir at each start,
# monitoring the primary the other sentinels report (or pod 0 on the very first start).
set -eu

ME="${POD_NAME}.magnus-redis-headless.${POD_NAMESPACE}.svc"

primary="$(timeout 5 redis-cli -h magnus-redis-sentinel -p 26379 \
  SENTINEL get-master-addr-by-name mymaster 2>/dev/null | head -n 1 || true)"
if [ -z "$primary" ]; then
  primary="magnus-redis-0.magnus-redis-headless.${POD_NAMESPACE}.svc"
fi

cat > /sentinel/sentinel.conf <<CONF
port 26379
# Pods keep their DNS names across restarts, not their IPs: sentinels and clients use names.
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip ${ME}
sentinel monitor mymaster ${primary} 6379 2
# The primary is down after 5 s without an answer; a failover may take up to a minute.
sentinel down-after-milliseconds mymaster 5000
sentinel failover-timeout mymaster 60000
sentinel parallel-syncs mymaster 1
CONF
echo "sentinel: monitoring $primary"
exec redis-sentinel /sentinel/sentinel.conf
