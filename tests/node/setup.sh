#!/bin/sh
# Installs the Node.js clients the end-to-end tests run as agents
# (idempotent: checks first, installs only when missing or changed).
#
#   tests/node/setup.sh     print the install directory once it is ready
#
# The clients live in target/node-clients (override with
# CHAPERONE_NODE_CLIENTS), installed with `npm ci` from this folder's
# package.json and package-lock.json; only the first run needs the npm
# registry.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$(dirname "$here")")
dir=${CHAPERONE_NODE_CLIENTS:-$root/target/node-clients}

command -v npm >/dev/null 2>&1 || {
    echo "error: npm is needed for the Node.js client tests (Debian: apt-get install nodejs npm)" >&2
    exit 1
}
if [ -f "$dir/package-lock.json" ] && cmp -s "$here/package-lock.json" "$dir/package-lock.json" &&
    [ -d "$dir/node_modules/@kubernetes/client-node" ] &&
    [ -x "$dir/node_modules/kubernetes-mcp-server-linux-amd64/bin/kubernetes-mcp-server-linux-amd64" ]; then
    echo "    ok: @kubernetes/client-node and kubernetes-mcp-server in $dir (already installed)" >&2
else
    echo "    installing @kubernetes/client-node and kubernetes-mcp-server (npm ci) into $dir" >&2
    mkdir -p "$dir"
    cp "$here/package.json" "$here/package-lock.json" "$dir/"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
fi
echo "$dir"
