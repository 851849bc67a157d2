"""Validates chaperone's manifests; run through deploy/validate.sh.

manifests DEPLOY_DIR
    Every YAML file under DEPLOY_DIR (except kustomization files and the
    patches they name) and the rendered output of every kustomization
    (`kubectl kustomize`) is validated object by object:
    - Kubernetes kinds against the Kubernetes JSON schemas of each version in
      CHAPERONE_K8S_VERSIONS with kubernetes-validate, strict (unknown fields
      are errors). A kind without a schema is an error, not a warning.
    - chaperone.dev kinds against the openAPIV3Schema of the CRD in
      DEPLOY_DIR/base/crds, as the API server would with strict field
      validation (unknown fields are errors).
    - Each CRD's schema must be structural (what the API server requires).

files DEPLOY_DIR FILE...
    The objects in FILEs, validated as above, one line per object: `accepted FILE KIND/NAME` or `rejected FILE KIND/NAME: why`.
"""

import copy
import os
import re
import subprocess
import sys

import jsonschema
import kubernetes_validate.utils as kv
import yaml

GROUP = "chaperone.dev"
VERSIONS = os.environ.get("CHAPERONE_K8S_VERSIONS", "1.28 1.31 1.34 1.37").split()

RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)


def documents(text, source):
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise SystemExit(f"FAIL {source}: not YAML: {e}")


def name_of(obj):
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', '?')}/{meta.get('name', '?')}"


# === CRD schemas ===


def crd_schemas(deploy_dir):
    """{(apiVersion, kind): (schema, crd_name)} for chaperone's CRDs."""
    schemas = {}
    crd_dir = os.path.join(deploy_dir, "base", "crds")
    for file in sorted(os.listdir(crd_dir)):
        path = os.path.join(crd_dir, file)
        with open(path) as f:
            for crd in documents(f.read(), path):
                spec = crd["spec"]
                for version in spec["versions"]:
                    if not version.get("served"):
                        continue
                    key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                    schemas[key] = (version["schema"]["openAPIV3Schema"], crd["metadata"]["name"])
    return schemas


def structural_errors(schema, path="openAPIV3Schema", root=True):
    """The API server's structural-schema rules that matter for hand-written CRDs."""
    errors = []
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
    int_or_string = schema.get("x-kubernetes-int-or-string") is True
    for banned in ("$ref", "definitions", "id", "$schema"):
        if banned in schema:
            errors.append(f"{path}: `{banned}` is not allowed in a structural schema")
    if "type" not in schema and not (preserve or int_or_string):
        errors.append(f"{path}: every node needs a `type`")
    if "properties" in schema and isinstance(schema.get("additionalProperties"), dict):
        errors.append(f"{path}: `properties` and `additionalProperties` are mutually exclusive")
    for key, sub in (schema.get("properties") or {}).items():
        if root and key == "metadata" and set(sub) - {"type", "properties"}:
            errors.append(f"{path}.properties.metadata: only `type` is allowed at the root metadata")
        errors += structural_errors(sub, f"{path}.properties.{key}", root=False)
    if isinstance(schema.get("items"), dict):
        errors += structural_errors(schema["items"], f"{path}.items", root=False)
    if isinstance(schema.get("additionalProperties"), dict):
        errors += structural_errors(schema["additionalProperties"], f"{path}.additionalProperties", root=False)
    return errors


def strict(schema):
    """The schema as strict field validation applies it: an object node with
    declared properties accepts no other fields, unless it preserves them."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if (
            "properties" in node
            and "additionalProperties" not in node
            and node.get("x-kubernetes-preserve-unknown-fields") is not True
        ):
            node["additionalProperties"] = False
        for sub in (node.get("properties") or {}).values():
            walk(sub)
        walk(node.get("items"))
        walk(node.get("additionalProperties"))

    walk(schema)
    return schema


FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("date-time")
def _date_time(value):
    return not isinstance(value, str) or bool(RFC3339.match(value))


def cr_errors(obj, schemas):
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in schemas:
        known = ", ".join(f"{v} {k}" for v, k in sorted(schemas))
        return [f"no CRD serves apiVersion {key[0]} kind {key[1]} (known: {known})"]
    errors = []
    if not (obj.get("metadata") or {}).get("name"):
        errors.append("metadata.name: required")
    schema, _ = schemas[key]
    validator = jsonschema.Draft7Validator(strict(schema), format_checker=FORMATS)
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        where = "".join(
            f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path
        ).lstrip(".") or "(root)"
        errors.append(f"{where}: {error.message}")
    return errors


# === Kubernetes kinds ===


def k8s_errors(obj):
    errors = []
    for version in VERSIONS:
        try:
            kv.validate(obj, f"{version}.0", strict=True)
        except kv.SchemaNotFoundError:
            errors.append(
                f"Kubernetes {version} has no schema for {obj.get('apiVersion')} {obj.get('kind')}"
            )
        except (kv.ValidationError, jsonschema.ValidationError) as e:
            # kubernetes-validate wraps the jsonschema error in some versions.
            cause = getattr(e, "caught", e)
            where = ".".join(str(p) for p in cause.absolute_path) or "(root)"
            errors.append(f"Kubernetes {version}: {where}: {cause.message}")
        except kv.InvalidSchemaError as e:
            errors.append(f"Kubernetes {version}: invalid schema: {e}")
    return errors


def object_errors(obj, schemas):
    if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
        return ["not a Kubernetes object (no apiVersion/kind)"]
    if str(obj["apiVersion"]).split("/")[0] == GROUP:
        return cr_errors(obj, schemas)
    return k8s_errors(obj)


# === the two commands ===


def kustomizations(deploy_dir):
    found = []
    for dirpath, _, files in os.walk(deploy_dir):
        if "kustomization.yaml" in files and not for_older_kubernetes(dirpath):
            found.append(dirpath)
    return sorted(found)


def for_older_kubernetes(path):
    """Overlays for a Kubernetes older than the schemas here (overlays/k8s-1.20)
    use API versions those schemas no longer have; the real API server of
    that version checks them (tests/tests/deploy_real_api.rs, server-side
    dry run)."""
    return f"{os.sep}overlays{os.sep}k8s-" in path


def patch_files(kustomization_dir):
    with open(os.path.join(kustomization_dir, "kustomization.yaml")) as f:
        k = yaml.safe_load(f) or {}
    paths = [p["path"] for p in k.get("patches", []) if isinstance(p, dict) and "path" in p]
    paths += k.get("patchesStrategicMerge", [])
    return {os.path.normpath(os.path.join(kustomization_dir, p)) for p in paths}


def manifests(deploy_dir):
    deploy_dir = os.path.abspath(deploy_dir)
    schemas = crd_schemas(deploy_dir)
    failures = 0
    checked = 0

    def report(source, obj, errors):
        nonlocal failures, checked
        checked += 1
        if errors:
            failures += 1
            for error in errors:
                print(f"FAIL {source}: {name_of(obj)}: {error}")
        else:
            print(f"ok   {source}: {name_of(obj)}")

    crd_dir = os.path.join(deploy_dir, "base", "crds")
    for file in sorted(os.listdir(crd_dir)):
        path = os.path.join(crd_dir, file)
        with open(path) as f:
            for crd in documents(f.read(), path):
                for version in crd["spec"]["versions"]:
                    errors = structural_errors(version["schema"]["openAPIV3Schema"])
                    for error in errors:
                        print(f"FAIL {os.path.relpath(path, deploy_dir)}: not structural: {error}")
                    failures += bool(errors)

    dirs = kustomizations(deploy_dir)
    patches = set().union(*(patch_files(d) for d in dirs)) if dirs else set()
    for dirpath, _, files in sorted(os.walk(deploy_dir)):
        if for_older_kubernetes(dirpath + os.sep):
            if os.path.basename(os.path.dirname(dirpath)) == "overlays":
                print(f"skip {os.path.relpath(dirpath, deploy_dir)}: for an older Kubernetes, "
                      "checked by that version's real API server (tests/tests/deploy_real_api.rs)")
            continue
        for file in sorted(files):
            path = os.path.normpath(os.path.join(dirpath, file))
            if not file.endswith((".yaml", ".yml")) or file == "kustomization.yaml" or path in patches:
                continue
            with open(path) as f:
                for obj in documents(f.read(), path):
                    report(os.path.relpath(path, deploy_dir), obj, object_errors(obj, schemas))

    for directory in dirs:
        label = "kustomize " + (os.path.relpath(directory, deploy_dir) if directory != deploy_dir else ".")
        rendered = subprocess.run(
            ["kubectl", "kustomize", directory], capture_output=True, text=True
        )
        if rendered.returncode != 0:
            print(f"FAIL {label}: does not render: {rendered.stderr.strip()}")
            failures += 1
            continue
        for obj in documents(rendered.stdout, label):
            report(label, obj, object_errors(obj, schemas))

    versions = ", ".join(VERSIONS)
    print(f"{checked} objects checked against Kubernetes {versions} and chaperone's CRDs: "
          f"{failures} failed")
    return 1 if failures else 0


def files_command(deploy_dir, files):
    schemas = crd_schemas(os.path.abspath(deploy_dir))
    rejected = 0
    for path in files:
        with open(path) as f:
            for obj in documents(f.read(), path):
                errors = object_errors(obj, schemas)
                if errors:
                    rejected += 1
                    print(f"rejected {path} {name_of(obj)}: " + "; ".join(errors))
                else:
                    print(f"accepted {path} {name_of(obj)}")
    return 1 if rejected else 0


def main(argv):
    if len(argv) >= 2 and argv[0] == "manifests":
        return manifests(argv[1])
    if len(argv) >= 3 and argv[0] == "files":
        return files_command(argv[1], argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
