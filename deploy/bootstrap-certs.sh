#!/bin/sh
# The certificates chaperone needs, created once and kept (deploy/README.md,
# "Certificates and the CA").
#
#   deploy/bootstrap-certs.sh [NAMESPACE...]
#       against the current kubectl context, after `kubectl apply -k deploy/`:
#       - Secret chaperone-system/chaperone-ca: the chaperone CA; created if
#         missing, never replaced
#       - Secret chaperone-system/chaperone-webhook-tls: the webhook's serving
#         certificate, signed by that CA (re-issued on every run; the webhook
#         reloads it without a restart)
#       - the caBundle of the three webhooks in MutatingWebhookConfiguration chaperone
#       - Secret chaperone-system/chaperone-attestation-key: the ed25519 key
#         with which the webhook signs approval decisions (mounted only into
#         the webhook); created if missing, never replaced
#       - ConfigMap chaperone-system/chaperone-attestation-public: its public
#         key, for the node agents (--approval-verify-key)
#       - ConfigMap NAMESPACE/chaperone-ca-bundle (key ca.crt: the namespace's
#         kube-root-ca.crt + the chaperone CA; key chaperone-ca.crt: the
#         chaperone CA alone, which the chaperone-gate init container trusts)
#         for each agent NAMESPACE
#
#   deploy/bootstrap-certs.sh --out DIR --cluster-ca FILE [NAMESPACE...]
#       the same objects as files, touching no cluster: DIR/manifests.yaml
#       (Secrets, ConfigMaps), DIR/cabundle-patch.yaml (a JSON patch for the
#       MutatingWebhookConfiguration, for a kustomize overlay), and the PEM
#       files. A CA already in DIR (ca.crt, ca.key) is kept.
#
# Needs openssl and kubectl.
set -eu

system_ns=chaperone-system
service=chaperone-webhook
out=""
cluster_ca=""
days_ca=3650
days_leaf=365

usage() {
    echo "usage: $0 [--out DIR --cluster-ca FILE] [NAMESPACE...]" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
        --cluster-ca) [ $# -ge 2 ] || usage; cluster_ca=$2; shift 2 ;;
        -h | --help) usage ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done

for tool in openssl kubectl; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "error: $tool is needed" >&2
        exit 1
    }
done
if [ -n "$out" ] && [ $# -gt 0 ] && [ -z "$cluster_ca" ]; then
    echo "error: --out with namespaces needs --cluster-ca FILE (the cluster CA, as in kube-root-ca.crt)" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -n "$out" ]; then
    mkdir -p "$out"
    : >"$out/manifests.yaml"
fi

say() { echo "==> $*" >&2; }

# Applies a manifest from stdin, or appends it to DIR/manifests.yaml.
emit() {
    if [ -n "$out" ]; then
        { echo "---"; cat; } >>"$out/manifests.yaml"
    else
        kubectl apply -f - >&2
    fi
}

b64() { base64 <"$1" | tr -d '\n'; }

# === the CA ===

if [ -n "$out" ] && [ -s "$out/ca.crt" ] && [ -s "$out/ca.key" ]; then
    say "keeping the chaperone CA in $out"
    cp "$out/ca.crt" "$work/ca.crt"
    cp "$out/ca.key" "$work/ca.key"
elif [ -z "$out" ] && kubectl -n "$system_ns" get secret chaperone-ca >/dev/null 2>&1; then
    say "keeping the chaperone CA (Secret $system_ns/chaperone-ca)"
    kubectl -n "$system_ns" get secret chaperone-ca -o 'jsonpath={.data.tls\.crt}' | base64 -d >"$work/ca.crt"
    kubectl -n "$system_ns" get secret chaperone-ca -o 'jsonpath={.data.tls\.key}' | base64 -d >"$work/ca.key"
else
    say "creating the chaperone CA"
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$work/ca.key" -out "$work/ca.crt" -days "$days_ca" \
        -subj "/O=chaperone/CN=chaperone CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
if [ -z "$out" ]; then
    kubectl get namespace "$system_ns" >/dev/null 2>&1 || {
        echo "error: namespace $system_ns does not exist: run \`kubectl apply -k deploy/\` first" >&2
        exit 1
    }
fi
kubectl create secret tls chaperone-ca -n "$system_ns" \
    --cert="$work/ca.crt" --key="$work/ca.key" --dry-run=client -o yaml | emit

# === the webhook's serving certificate ===

say "issuing the webhook's serving certificate"
cat >"$work/leaf.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:$service.$system_ns.svc,DNS:$service.$system_ns.svc.cluster.local
EOF
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$work/tls.key" -out "$work/tls.csr" \
    -subj "/O=chaperone/CN=$service.$system_ns.svc" 2>/dev/null
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
    -CAcreateserial -days "$days_leaf" -extfile "$work/leaf.ext" -out "$work/tls.crt" 2>/dev/null
kubectl create secret generic chaperone-webhook-tls -n "$system_ns" --type=kubernetes.io/tls \
    --from-file=tls.crt="$work/tls.crt" --from-file=tls.key="$work/tls.key" \
    --from-file=ca.crt="$work/ca.crt" --dry-run=client -o yaml | emit

# === the key that attests approval decisions ===
# Only the webhook holds the private key: a decision the nodes act on names
# who the API server authenticated, and nobody else can sign one.

if [ -n "$out" ] && [ -s "$out/attestation.key" ]; then
    say "keeping the attestation key in $out"
    cp "$out/attestation.key" "$work/attestation.key"
elif [ -z "$out" ] && kubectl -n "$system_ns" get secret chaperone-attestation-key >/dev/null 2>&1; then
    say "keeping the attestation key (Secret $system_ns/chaperone-attestation-key)"
    kubectl -n "$system_ns" get secret chaperone-attestation-key -o 'jsonpath={.data.ed25519\.key}' | base64 -d >"$work/attestation.key"
else
    say "creating the attestation key"
    openssl genpkey -algorithm ed25519 -out "$work/attestation.key" 2>/dev/null
fi
openssl pkey -in "$work/attestation.key" -pubout -out "$work/attestation.pub" 2>/dev/null
kubectl create secret generic chaperone-attestation-key -n "$system_ns" \
    --from-file=ed25519.key="$work/attestation.key" --dry-run=client -o yaml | emit
kubectl create configmap chaperone-attestation-public -n "$system_ns" \
    --from-file=ed25519.pub="$work/attestation.pub" --dry-run=client -o yaml | emit

# === the webhooks' caBundle ===

bundle=$(b64 "$work/ca.crt")
patch="[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$bundle\"},\
{\"op\":\"add\",\"path\":\"/webhooks/1/clientConfig/caBundle\",\"value\":\"$bundle\"},\
{\"op\":\"add\",\"path\":\"/webhooks/2/clientConfig/caBundle\",\"value\":\"$bundle\"}]"
if [ -n "$out" ]; then
    printf '%s\n' "$patch" >"$out/cabundle-patch.yaml"
else
    say "setting the caBundle of MutatingWebhookConfiguration chaperone"
    kubectl patch mutatingwebhookconfiguration chaperone --type=json -p "$patch" >&2
fi

# === per agent namespace: cluster CA + chaperone CA ===

for ns in "$@"; do
    say "publishing the CA bundle in namespace $ns"
    if [ -n "$cluster_ca" ]; then
        cp "$cluster_ca" "$work/cluster-ca.crt"
    else
        kubectl -n "$ns" get configmap kube-root-ca.crt -o 'jsonpath={.data.ca\.crt}' >"$work/cluster-ca.crt" || {
            echo "error: cannot read $ns/kube-root-ca.crt (does namespace $ns exist?)" >&2
            exit 1
        }
    fi
    { cat "$work/cluster-ca.crt"; echo; cat "$work/ca.crt"; } | sed '/^$/d' >"$work/bundle.crt"
    kubectl create configmap chaperone-ca-bundle -n "$ns" \
        --from-file=ca.crt="$work/bundle.crt" --from-file=chaperone-ca.crt="$work/ca.crt" \
        --dry-run=client -o yaml | emit
done

if [ -n "$out" ]; then
    cp "$work/ca.crt" "$work/ca.key" "$work/tls.crt" "$work/tls.key" \
        "$work/attestation.key" "$work/attestation.pub" "$out/"
    chmod 600 "$out/ca.key" "$out/tls.key" "$out/attestation.key"
    say "wrote $out/manifests.yaml, $out/cabundle-patch.yaml and the PEM files"
fi
