#!/bin/sh
# Validates chaperone's manifests with real validators.
#
#   deploy/validate.sh setup          install the validators (idempotent)
#   deploy/validate.sh manifests      every manifest under deploy/ and every
#                                     rendered kustomization, against the
#                                     Kubernetes schemas (kubernetes-validate,
#                                     strict) and chaperone's CRD schemas
#   deploy/validate.sh files FILE...  the objects in FILEs (Kubernetes kinds
#                                     and chaperone's custom resources), one
#                                     line per object, exit 1 if any is
#                                     rejected
#   deploy/validate.sh                setup, then manifests
#
# The validators live in a project-local virtualenv, target/py (override
# with CHAPERONE_PY_VENV); only the first run needs PyPI. Kubernetes
# versions checked: CHAPERONE_K8S_VERSIONS (default "1.28 1.31 1.34 1.37";
# kubernetes-validate 1.37 carries the schemas of 1.25 to 1.37, offline).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
venv=${CHAPERONE_PY_VENV:-$root/target/py}
# Pinned so CI and laptops validate alike; bump deliberately.
requirements="kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.3"

setup() {
    if [ -x "$venv/bin/python" ] &&
        "$venv/bin/python" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
        echo "    ok: kubernetes-validate in $venv (already installed)" >&2
        return 0
    fi
    command -v python3 >/dev/null 2>&1 || {
        echo "error: python3 is needed to validate manifests (Debian: apt-get install python3 python3-venv)" >&2
        exit 1
    }
    echo "    installing kubernetes-validate into $venv" >&2
    python3 -m venv "$venv" || {
        echo "error: cannot create a virtualenv at $venv (Debian: apt-get install python3-venv)" >&2
        exit 1
    }
    # shellcheck disable=SC2086
    "$venv/bin/pip" install --quiet --disable-pip-version-check $requirements
}

run() {
    command -v kubectl >/dev/null 2>&1 || {
        echo "error: kubectl is needed to render the kustomizations (it carries kustomize)" >&2
        exit 1
    }
    exec "$venv/bin/python" "$here/validate.py" "$@"
}

case "${1:-all}" in
    setup) setup ;;
    manifests) setup && run manifests "$here" ;;
    files) shift && setup && run files "$here" "$@" ;;
    all) setup && run manifests "$here" ;;
    *)
        echo "usage: $0 [setup|manifests|files FILE...]" >&2
        exit 2
        ;;
esac
