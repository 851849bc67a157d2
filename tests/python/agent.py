"""An agent on the official Python Kubernetes client, configured exactly as in
a pod (load_incluster_config). Prints one JSON line per step so the test can
judge what reached the agent:

    python agent.py SECRET NAMESPACE DEPLOYMENT

{"step": "get-secret", "data": {...}}
{"step": "list-secrets", "names": [...], "data": [...]}
{"step": "delete-deployment", "code": 403, "message": "..."}  (or code 200)
"""

import json
import sys

from kubernetes import client, config
from kubernetes.client.rest import ApiException


def main() -> int:
    secret, namespace, deployment = sys.argv[1:4]
    config.load_incluster_config()
    core = client.CoreV1Api()
    apps = client.AppsV1Api()
    got = core.read_namespaced_secret(secret, "default")
    print(json.dumps({"step": "get-secret", "data": got.data}), flush=True)
    listed = core.list_namespaced_secret("default")
    print(
        json.dumps(
            {
                "step": "list-secrets",
                "names": [s.metadata.name for s in listed.items],
                "data": [s.data or {} for s in listed.items],
            }
        ),
        flush=True,
    )
    try:
        apps.delete_namespaced_deployment(deployment, namespace)
        print(json.dumps({"step": "delete-deployment", "code": 200}), flush=True)
    except ApiException as e:
        message = json.loads(e.body).get("message", "") if e.body else ""
        print(
            json.dumps({"step": "delete-deployment", "code": e.status, "message": message}),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
