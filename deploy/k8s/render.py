"""Render a kustomization of this tree without kubectl: ``python deploy/k8s/render.py overlays/production``.

The subset of kustomize the Nichiiki kustomizations use, and nothing more (anything else is refused, so
the kustomizations cannot drift into features this renderer would silently ignore): ``resources`` (files
and directories with their own kustomization), ``patches`` (strategic merge or JSON 6902, inline or by
``path``, with an optional ``target``), ``images`` and ``labels`` (without selectors). The tests render
every kustomization with it; ``kubectl kustomize`` gives the same objects on a real cluster.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

HERE = Path(__file__).resolve().parent
SUPPORTED = {"apiVersion", "kind", "resources", "patches", "images", "labels"}


class KustomizeError(ValueError):
    pass


def load_documents(path: Path) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def identity(resource: Resource) -> tuple[str, str, str, str]:
    meta = resource.get("metadata", {})
    return resource["apiVersion"], resource["kind"], meta.get("namespace", ""), meta["name"]


def build(directory: Path) -> list[Resource]:
    """The objects the kustomization in ``directory`` produces, in order."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{directory}: fields this renderer does not implement: {sorted(unknown)}")
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        resources += build(path) if path.is_dir() else load_documents(path)
    seen: set[tuple[str, str, str, str]] = set()
    for resource in resources:
        if identity(resource) in seen:
            raise KustomizeError(f"{directory}: {identity(resource)} appears twice")
        seen.add(identity(resource))
    for patch in kustomization.get("patches", []):
        resources = apply_patch(directory, resources, patch)
    for image in kustomization.get("images", []):
        for resource in resources:
            set_image(resource, image)
    for label in kustomization.get("labels", []):
        if label.get("includeSelectors"):
            raise KustomizeError(f"{directory}: labels with includeSelectors would change immutable selectors")
        for resource in resources:
            resource.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
            template = resource.get("spec", {}).get("template")
            if label.get("includeTemplates") and isinstance(template, dict):
                template.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    return resources


# --- patches --------------------------------------------------------------------------------------------


def _matches(resource: Resource, target: dict[str, Any]) -> bool:
    group, _, version = resource["apiVersion"].rpartition("/")
    meta = resource.get("metadata", {})
    wanted = {
        "group": group, "version": version, "kind": resource["kind"], "name": meta.get("name"),
        "namespace": meta.get("namespace"),
    }
    unknown = set(target) - set(wanted)
    if unknown:
        raise KustomizeError(f"patch target fields this renderer does not implement: {sorted(unknown)}")
    return all(wanted[key] == value for key, value in target.items())


def apply_patch(directory: Path, resources: list[Resource], entry: dict[str, Any]) -> list[Resource]:
    text = (directory / entry["path"]).read_text(encoding="utf-8") if "path" in entry else entry["patch"]
    body = yaml.safe_load(text)
    target = entry.get("target")
    if isinstance(body, list):  # JSON 6902: a target is required
        if target is None:
            raise KustomizeError(f"{directory}: a JSON 6902 patch needs a target")
        chosen = [r for r in resources if _matches(r, target)]
        if not chosen:
            raise KustomizeError(f"{directory}: the patch target {target} matches nothing")
        for resource in chosen:
            for operation in body:
                json6902(resource, operation)
        return resources
    if target is None:  # a strategic merge patch names its object
        target = {"kind": body["kind"], "name": body["metadata"]["name"]}
        if "namespace" in body["metadata"]:
            target["namespace"] = body["metadata"]["namespace"]
    chosen_ids = {id(r) for r in resources if _matches(r, target)}
    if not chosen_ids:
        raise KustomizeError(f"{directory}: the patch target {target} matches nothing")
    if body.get("$patch") == "delete":
        return [r for r in resources if id(r) not in chosen_ids]
    out = []
    for resource in resources:
        if id(resource) in chosen_ids:
            patch = copy.deepcopy(body)
            patch.pop("metadata", None)  # the name and namespace only select the object
            resource = strategic_merge(resource, patch)
        out.append(resource)
    return out


def strategic_merge(base: Any, patch: Any) -> Any:
    """Maps merge key by key (``null`` removes a key); lists of named maps (containers, env, volumes,
    ports...) merge by ``name``; any other list is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        merged_list = [copy.deepcopy(item) for item in base]
        index = {item["name"]: i for i, item in enumerate(merged_list)}
        for item in patch:
            if item.get("$patch") == "delete":
                merged_list = [m for m in merged_list if m["name"] != item["name"]]
                index = {m["name"]: i for i, m in enumerate(merged_list)}
            elif item["name"] in index:
                merged_list[index[item["name"]]] = strategic_merge(merged_list[index[item["name"]]], item)
            else:
                merged_list.append(copy.deepcopy(item))
                index[item["name"]] = len(merged_list) - 1
        return merged_list
    return copy.deepcopy(patch)


def _named(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(item, dict) and "name" in item for item in items)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def json6902(resource: Resource, operation: dict[str, Any]) -> None:
    op, parts = operation["op"], _pointer(operation["path"])
    if op not in ("add", "replace", "remove"):
        raise KustomizeError(f"JSON 6902 operation {op!r} is not implemented")
    parent: Any = resource
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if isinstance(parent, list):
        position = len(parent) if last == "-" else int(last)
        if op == "add":
            parent.insert(position, copy.deepcopy(operation["value"]))
        elif op == "replace":
            parent[position] = copy.deepcopy(operation["value"])
        else:
            del parent[position]
        return
    if op != "add" and last not in parent:
        raise KustomizeError(f"JSON 6902 {op} of {operation['path']}: no such member")
    if op == "remove":
        del parent[last]
    else:
        parent[last] = copy.deepcopy(operation["value"])


# --- images ---------------------------------------------------------------------------------------------


def _split_image(image: str) -> tuple[str, str]:
    """``name`` and what follows it (``:tag``, ``@digest`` or nothing)."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def set_image(resource: Resource, rule: dict[str, Any]) -> None:
    spec = resource.get("spec", {})
    pod = spec.get("template", {}).get("spec") or spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get(
        "spec"
    )
    if not isinstance(pod, dict):
        return
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        name, suffix = _split_image(container["image"])
        if name != rule["name"]:
            continue
        if "digest" in rule:
            suffix = "@" + rule["digest"]
        elif "newTag" in rule:
            suffix = ":" + str(rule["newTag"])
        container["image"] = rule.get("newName", name) + suffix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("kustomization", help="a directory under deploy/k8s, e.g. overlays/production")
    args = parser.parse_args(argv)
    documents = build((HERE / args.kustomization).resolve())
    sys.stdout.write(yaml.safe_dump_all(documents, sort_keys=False))  # the rendered manifest is the output
    return 0


if __name__ == "__main__":
    sys.exit(main())
