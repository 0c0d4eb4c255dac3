#!/bin/sh
# One Redis of the magnus-redis StatefulSet: the primary or a replica of it.
#
# Who is primary is Sentinel's to say. A pod (re)starting asks the sentinels first, so a Redis
# that was primary before a failover comes back as a replica of the new primary instead of a
# second primary with stale data. Only when no sentinel answers (the very first start, or every
# pod restarted at once) does pod 0 start as primary and the others as its replicas.
set -eu

ME="${POD_NAME}.magnus-redis-headless.${POD_NAMESPACE}.svc"
ORDINAL="${POD_NAME##*-}"

primary=""
# The Service lists only ready pods, so this pod's own sentinel (not ready yet) never answers.
primary="$(timeout 5 redis-cli -h magnus-redis-sentinel -p 26379 \
  SENTINEL get-master-addr-by-name mymaster 2>/dev/null | head -n 1 || true)"
if [ -z "$primary" ]; then
  if [ "$ORDINAL" = "0" ]; then
    primary="$ME"
  else
    primary="magnus-redis-0.magnus-redis-headless.${POD_NAMESPACE}.svc"
  fi
fi

# Append-only file fsynced every second, as in docker-compose.yml and the local launcher.
# The pod announces its DNS name (stable across restarts, unlike its IP) to the primary, which
# Sentinel then hands to clients.
set -- --port 6379 --dir /data --appendonly yes --appendfsync everysec --save "" \
  --replica-announce-ip "$ME"
if [ "$primary" = "$ME" ]; then
  echo "redis: starting as primary ($ME)"
  exec redis-server "$@"
fi
echo "redis: starting as replica of $primary"
exec redis-server "$@" --replicaof "$primary" 6379
