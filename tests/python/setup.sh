#!/bin/sh
# Installs the Python Kubernetes client the end-to-end tests run as a second
# real client library (idempotent: checks first, installs only when missing).
#
#   tests/python/setup.sh     print the venv's python once it has the client
#
# The client lives in a project-local virtualenv, target/py-client (override
# with CHAPERONE_PY_CLIENT_VENV), beside the manifest validators' target/py;
# only the first run needs PyPI.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$(dirname "$here")")
venv=${CHAPERONE_PY_CLIENT_VENV:-$root/target/py-client}
# Pinned so CI and laptops run the same client; bump deliberately.
requirement="kubernetes==37.0.2"
version=${requirement#*==}

if [ -x "$venv/bin/python" ] &&
    [ "$("$venv/bin/python" -c 'import kubernetes; print(kubernetes.__version__)' 2>/dev/null)" = "$version" ]; then
    echo "    ok: the Python kubernetes client $version in $venv (already installed)" >&2
else
    command -v python3 >/dev/null 2>&1 || {
        echo "error: python3 is needed for the Python client test (Debian: apt-get install python3 python3-venv)" >&2
        exit 1
    }
    echo "    installing the Python kubernetes client ($requirement) into $venv" >&2
    python3 -m venv "$venv" || {
        echo "error: cannot create a virtualenv at $venv (Debian: apt-get install python3-venv)" >&2
        exit 1
    }
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$requirement"
fi
echo "$venv/bin/python"
