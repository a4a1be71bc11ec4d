#!/bin/sh
# The official Envoy image's entrypoint, in short: flags alone run envoy; as root, run as the envoy
# user unless ENVOY_UID is 0 (an Envoy with original_src needs root's NET_ADMIN).
set -e
if [ "${1#-}" != "$1" ]; then
  set -- envoy "$@"
fi
if [ "$(id -u)" = 0 ] && [ "${ENVOY_UID:-101}" != 0 ]; then
  chown envoy:envoy /dev/stdout /dev/stderr 2>/dev/null || true
  exec setpriv --reuid=envoy --regid=envoy --init-groups "$@"
fi
exec "$@"
