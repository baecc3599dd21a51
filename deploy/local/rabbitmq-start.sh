#!/bin/sh
# Creates RABBITMQ_DEFAULT_USER with RABBITMQ_DEFAULT_PASS on the node's first start
# (what the official image's entrypoint does), then runs the node in the foreground.
set -eu
: "${RABBITMQ_DEFAULT_USER:?}" "${RABBITMQ_DEFAULT_PASS:?}"
cat >/var/lib/rabbitmq/rabbitmq.conf <<CONF
listeners.tcp.default = 5672
default_user = ${RABBITMQ_DEFAULT_USER}
default_pass = ${RABBITMQ_DEFAULT_PASS}
default_user_tags.administrator = true
CONF
export RABBITMQ_CONFIG_FILE=/var/lib/rabbitmq/rabbitmq.conf
# Logs to standard output, for `podman logs`.
export RABBITMQ_LOGS=-
# The server script itself (Debian's /usr/sbin wrapper would neither pass SIGTERM on
# nor log to standard output).
exec /usr/lib/rabbitmq/bin/rabbitmq-server
