"""List, then watch from the list's resourceVersion, with the official Python
Kubernetes client configured exactly as in a pod (load_incluster_config).

    python list_watch.py NAME

Prints `item NAME` per listed object and `listed N RV` after the list, one `event TYPE NAME` line per watch
event, and exits 0 once an event for NAME arrives (1 if the watch ends first).
"""

import sys

from kubernetes import client, config, watch

SA = "/var/run/secrets/kubernetes.io/serviceaccount"


def main() -> int:
    wanted = sys.argv[1]
    config.load_incluster_config()
    with open(f"{SA}/namespace") as f:
        namespace = f.read().strip()
    core = client.CoreV1Api()
    listed = core.list_namespaced_config_map(namespace)
    rv = listed.metadata.resource_version
    for item in listed.items:
        print(f"item {item.metadata.name}", flush=True)
    print(f"listed {len(listed.items)} {rv}", flush=True)
    stream = watch.Watch().stream(
        core.list_namespaced_config_map,
        namespace,
        resource_version=rv,
        timeout_seconds=30,
    )
    for event in stream:
        name = event["object"].metadata.name
        print(f"event {event['type']} {name}", flush=True)
        if name == wanted:
            return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
