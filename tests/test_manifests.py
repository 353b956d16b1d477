"""manifests/ (kustomize) for Kubernetes and OpenShift, checked without a cluster.

Every overlay is rendered once with `kubectl kustomize` (skipped, naming how to install kubectl, without it), then:

* built-in objects are validated against Kubernetes 1.32's schemas by `kubernetes-validate` (strict: unknown
  fields fail, as with `kubectl apply --validate=strict`);
* custom resources (Gateway API, Envoy Gateway, Prometheus Operator, llm-d ModelService) against the
  openAPIV3Schema of their CRD in ../shared/schemas/crds, with `jsonschema`, unknown fields failing too (skipped,
  naming the directory, when ../shared/schemas is absent, as in a user's clone). CEL rules
  (x-kubernetes-validations) are not evaluated by jsonschema; the ones these manifests come near are re-checked
  by hand below;
* OpenShift Routes (no CRD schema available) by a hand-written check of their shape and target;
* cross-references: Services, ports, selectors, ConfigMap keys, ServiceAccounts, policy targets, monitors;
* the picker configurations with `extproc serve --check`, their DNS pools against the headless Services;
* the security context every container needs under OpenShift's restricted-v2 SCC;
* the sidecar: the initContainer's `extproc envoy-config` command run for real and its bootstrap, with the Envoy
  container's own arguments, accepted by `envoy --mode validate`; its exec health probes run for real against a
  real picker;
* the Grafana dashboard ConfigMaps against grafana/dashboards;
* TLS to the picker (manifests/tls with cert-manager, the OpenShift overlays with the service CA): the certificate
  each layout issues, mounts and names in server.tls, the BackendTLSPolicy, monitor and client certificate that
  trust it, cert-manager's and BackendTLSPolicy's shapes by hand (no CRD in ../shared/schemas; they were checked
  against cert-manager's and Gateway API v1.6.1's CRDs), and the TLS health probes run for real.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import cli, names
from extproc.config import load_config
from extproc.envoy.run import EnvoyNotFound, envoy_binary
from extproc.local.procs import Child, extproc_argv, free_port

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
DASHBOARDS = ROOT / "grafana" / "dashboards"
DASHBOARD_COPIES = MANIFESTS / "multi-model" / "dashboards"
SCHEMAS = ROOT.parent / "shared" / "schemas"
CRDS = SCHEMAS / "crds"
KUBERNETES_VERSION = "1.32"  # OpenShift 4.19's; kubernetes-validate ships schemas for it
NAMESPACE = "llm-d"
OVERLAYS = (
    "base",
    "sidecar",
    "multi-model",
    "modelservice",
    "openshift",
    "openshift-modelservice",
    "eg-weighted-split",
    "tls",
)
OPENSHIFT = ("openshift", "openshift-modelservice")
TLS_OVERLAYS = ("tls", *OPENSHIFT)  # the picker serves TLS (server.tls): cert-manager, OpenShift's service CA
# The renders that hold the vLLM headless Services, per overlay (base and sidecar are applied on top of these).
WITH_MODELS = {"base": "multi-model", "sidecar": "multi-model"}
# Envoy Gateway names the Service port of a Gateway listener "<protocol>-<port>" (internal/gatewayapi/helpers.go,
# irListenerPortName) and the Service itself after EnvoyProxy spec.provider.kubernetes.envoyService.name.
EG_OWNING_GATEWAY_LABEL = "gateway.envoyproxy.io/owning-gateway-name"

Obj = dict[str, Any]
# The CRD files are large (EnvoyProxy's is 1.4 MB): libyaml's loader reads them 30x faster than PyYAML's own.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ----- rendering ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def renders() -> dict[str, list[Obj]]:
    """Each overlay rendered once by `kubectl kustomize` (kustomize v5 is built into kubectl)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl is not on PATH: install kubectl 1.27 or newer (it embeds kustomize v5), "
            "https://kubernetes.io/docs/tasks/tools/, or use `oc` from OpenShift's CLI tools as `kubectl`"
        )

    def render(overlay: str) -> list[Obj]:
        done = subprocess.run(
            [kubectl, "kustomize", str(MANIFESTS / overlay)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"kubectl kustomize manifests/{overlay} failed:\n{done.stderr}"
        return [doc for doc in yaml.load_all(done.stdout, Loader=YAML_LOADER) if doc]

    with ThreadPoolExecutor(len(OVERLAYS)) as pool:
        return dict(zip(OVERLAYS, pool.map(render, OVERLAYS), strict=True))


def kind_of(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: list[Obj], kind: str, name: str) -> Obj | None:
    return next((o for o in kind_of(objs, kind) if o["metadata"]["name"] == name), None)


def pod_templates(objs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    """(owner name, pod template) for every Deployment, and for what each ModelService's operator would create."""
    for dep in kind_of(objs, "Deployment"):
        yield dep["metadata"]["name"], dep["spec"]["template"]
    for dep in modelservice_deployments(objs):
        yield dep["metadata"]["name"], dep["spec"]["template"]


def containers(template: Obj) -> list[Obj]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def picker_configs(objs: list[Obj]) -> list[tuple[str, str]]:
    """(Deployment/container, config text) for every container running `extproc serve` or `extproc envoy-config`."""
    found = []
    for owner, template in pod_templates(objs):
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for container in containers(template):
            command = [*container.get("command", []), *container.get("args", [])]
            if command[:1] != ["extproc"] or "--config" not in command:
                continue
            path = command[command.index("--config") + 1]
            mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
            cm = named(objs, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
            assert cm is not None
            found.append((f"{owner}/{container['name']}", cm["data"][Path(path).name]))
    return found


# ----- the llm-d ModelService operator's output, as far as these checks need it --------------------------------


def render_operator_template(text: str, ports: dict[str, int]) -> str:
    """The operator's Go templates, for the one function the base config uses: {{ "name" | getPort }}."""
    text = re.sub(r'"\{\{ "(\w+)" \| getPort \}\}"', lambda m: f'"{ports[m.group(1)]}"', text)
    text = re.sub(r'\{\{ "(\w+)" \| getPort \}\}', lambda m: str(ports[m.group(1)]), text)
    assert "{{" not in text, f"unrendered template left:\n{text}"
    return text


def modelservice_deployments(objs: list[Obj]) -> list[Obj]:
    """The decode Deployment the operator would create for each ModelService: the base config's decodeDeployment
    with the operator's name, labels, selector, and the ModelService's containers merged in (args prepended)."""
    out = []
    for msvc in kind_of(objs, "ModelService"):
        spec = msvc["spec"]
        base = named(objs, "ConfigMap", spec["baseConfigMapRef"]["name"])
        assert base is not None, f"ModelService {msvc['metadata']['name']}: base ConfigMap missing"
        ports = {p["name"]: p["port"] for p in spec["routing"]["ports"]}
        dep = yaml.safe_load(render_operator_template(base["data"]["decodeDeployment"], ports))
        # The pod labels of llm-d-model-service's getPodLabels (internal/controller/child_resources.go), with its
        # sanitizeName of spec.routing.modelName.
        model_label = re.sub(r"[^a-z0-9-]+", "-", spec["routing"]["modelName"].lower()).strip("-")
        labels = {"llm-d.ai/inferenceServing": "true", "llm-d.ai/model": model_label, "llm-d.ai/role": "decode"}
        dep["metadata"] = {"name": f"{msvc['metadata']['name']}-decode", "namespace": msvc["metadata"]["namespace"]}
        dep["spec"]["replicas"] = spec["decode"]["replicas"]
        dep["spec"]["selector"] = {"matchLabels": dict(labels)}
        template = dep["spec"]["template"]
        template.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
        for extra in spec["decode"]["containers"]:
            target = next(c for c in template["spec"]["containers"] if c["name"] == extra["name"])
            target["args"] = [*extra.get("args", []), *target.get("args", [])]
            if "resources" in extra:
                target["resources"] = extra["resources"]
        out.append(dep)
    return out


# ----- schemas -------------------------------------------------------------------------------------------------


def _structural(schema: Obj) -> Obj:
    """A CRD's OpenAPI v3 schema as JSON Schema: Kubernetes' extensions translated, unknown fields refused."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-") and k not in ("nullable",)}
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in out:
        out["properties"] = {k: _structural(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False  # the API server prunes (kubectl --validate=strict refuses) these
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(out["additionalProperties"])
    if "items" in out:
        out["items"] = _structural(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_structural(s) for s in out[key]]
    return out


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], Obj]:
    """(apiVersion, kind) -> JSON Schema, from ../shared/schemas/crds (Gateway API: the standard channel)."""
    if not CRDS.is_dir():
        pytest.skip(f"{CRDS} is absent (the CRD schemas of Gateway API, Envoy Gateway, Prometheus Operator, llm-d)")
    schemas: dict[tuple[str, str], Obj] = {}
    files = sorted(CRDS.rglob("*.yaml"), key=lambda p: "experimental" in p.parts)  # standard wins
    for path in files:
        crd = yaml.load(path.read_text(), Loader=YAML_LOADER)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            key = (f"{group}/{version['name']}", kind)
            if key not in schemas and version.get("served", True):
                schemas[key] = _structural(version["schema"]["openAPIV3Schema"])
    return schemas


def _validate_builtin(obj: Obj) -> bool:
    """Validate a built-in object; False when Kubernetes has no such kind (a custom resource)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}") from None
    return True


def _validate_crd(obj: Obj, schema: Obj) -> None:
    import jsonschema

    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, f"{obj['kind']}/{obj['metadata']['name']}:\n" + "\n".join(
        f"  {'.'.join(str(p) for p in e.path)}: {e.message}" for e in errors[:10]
    )


def check_route(route: Obj, objs: list[Obj]) -> None:
    """OpenShift Route (route.openshift.io/v1): no CRD schema is at hand, so its shape is checked here."""
    name = route["metadata"]["name"]
    spec = route["spec"]
    assert set(route) <= {"apiVersion", "kind", "metadata", "spec"}, name
    allowed = {"host", "path", "to", "alternateBackends", "port", "tls", "wildcardPolicy", "subdomain"}
    assert set(spec) <= allowed, f"Route {name}: unknown fields {set(spec) - allowed}"
    if "host" in spec:  # optional: OpenShift assigns <name>-<namespace>.<router domain>
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", spec["host"]), name
    to = spec["to"]
    assert to["kind"] == "Service" and to["name"], name
    assert 0 <= to.get("weight", 100) <= 256, name
    assert spec.get("tls", {}).get("termination") in {"edge", "passthrough", "reencrypt"}, name
    assert spec["tls"].get("insecureEdgeTerminationPolicy", "None") in {"None", "Allow", "Redirect"}, name
    assert spec.get("wildcardPolicy", "None") in {"None", "Subdomain"}, name
    # A name is looked up among the Service's port names (a number would be the pods' port): names only here.
    target_port = spec["port"]["targetPort"]
    assert isinstance(target_port, str), f"Route {name}: name the Service port, not {target_port!r}"
    service_ports = _service_ports(to["name"], objs)
    assert service_ports is not None, f"Route {name}: no Service {to['name']} in the render nor made by Envoy Gateway"
    assert target_port in service_ports, (
        f"Route {name}: port {target_port!r} not among {sorted(map(str, service_ports))}"
    )


CERT_MANAGER_USAGES = {  # cert-manager.io/v1 Certificate spec.usages, from its CRD
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement", "data encipherment",
    "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth", "client auth", "code signing",
    "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
    "microsoft sgc", "netscape sgc",
}  # fmt: skip
CERTIFICATE_FIELDS = {
    "additionalOutputFormats", "commonName", "dnsNames", "duration", "emailAddresses", "encodeUsagesInRequest",
    "ipAddresses", "isCA", "issuerRef", "keystores", "literalSubject", "nameConstraints", "otherNames", "privateKey",
    "renewBefore", "renewBeforePercentage", "revisionHistoryLimit", "secretName", "secretTemplate",
    "signatureAlgorithm", "subject", "uris", "usages",
}  # fmt: skip
ISSUER_TYPES = {"acme", "ca", "selfSigned", "vault", "venafi"}


def check_certificate(cert: Obj, objs: list[Obj]) -> None:
    """cert-manager.io/v1 Certificate: its CRD's required fields and enums, and an issuer in the render."""
    name, spec = cert["metadata"]["name"], cert["spec"]
    assert cert["apiVersion"] == "cert-manager.io/v1", name
    assert set(spec) <= CERTIFICATE_FIELDS, f"Certificate {name}: unknown fields {set(spec) - CERTIFICATE_FIELDS}"
    assert spec["secretName"] and spec["issuerRef"]["name"], name
    assert set(spec.get("usages", [])) <= CERT_MANAGER_USAGES, f"Certificate {name}: {spec['usages']}"
    key = spec.get("privateKey", {})
    assert set(key) <= {"algorithm", "encoding", "rotationPolicy", "size"}, name
    assert key.get("algorithm", "RSA") in {"RSA", "ECDSA", "Ed25519"}, name
    assert key.get("rotationPolicy", "Always") in {"Never", "Always"}, name
    for field in ("duration", "renewBefore"):
        assert field not in spec or re.fullmatch(r"(\d+h)?(\d+m)?(\d+s)?", spec[field]), f"Certificate {name}: {field}"
    ref = spec["issuerRef"]
    assert ref.get("group", "cert-manager.io") == "cert-manager.io" and ref.get("kind", "Issuer") == "Issuer", name
    assert named(objs, "Issuer", ref["name"]), f"Certificate {name}: no Issuer {ref['name']}"


def check_issuer(issuer: Obj, objs: list[Obj]) -> None:
    """cert-manager.io/v1 Issuer: exactly one issuer type; a CA issuer's Secret is a CA Certificate's."""
    name, spec = issuer["metadata"]["name"], issuer["spec"]
    assert issuer["apiVersion"] == "cert-manager.io/v1", name
    assert len(spec) == 1 and set(spec) <= ISSUER_TYPES, f"Issuer {name}: {sorted(spec)}"
    if "ca" in spec:
        assert set(spec["ca"]) <= {"crlDistributionPoints", "issuingCertificateURLs", "ocspServers", "secretName"}
        ca = [c for c in kind_of(objs, "Certificate") if c["spec"]["secretName"] == spec["ca"]["secretName"]]
        assert len(ca) == 1 and ca[0]["spec"].get("isCA") is True, f"Issuer {name}: no CA Certificate"


def check_backend_tls_policy(policy: Obj, objs: list[Obj]) -> None:
    """gateway.networking.k8s.io/v1 BackendTLSPolicy (standard channel since Gateway API v1.4): required fields,
    the CEL rule "either caCertificateRefs or wellKnownCACertificates", targets and references in the render."""
    name, spec = policy["metadata"]["name"], policy["spec"]
    assert policy["apiVersion"] == "gateway.networking.k8s.io/v1", name
    assert set(spec) <= {"options", "targetRefs", "validation"} and spec["targetRefs"], name
    validation = spec["validation"]
    assert set(validation) <= {"caCertificateRefs", "hostname", "subjectAltNames", "wellKnownCACertificates"}, name
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", validation["hostname"])
    assert bool(validation.get("caCertificateRefs")) != bool(validation.get("wellKnownCACertificates")), name
    for target in spec["targetRefs"]:
        assert target["group"] == "" and target["kind"] == "Service", name
        ports = _service_ports(target["name"], objs)
        assert ports is not None and target.get("sectionName", "") in ports | {""}, f"{name}: {target}"
    for ref in validation.get("caCertificateRefs", []):
        assert set(ref) == {"group", "kind", "name"} and ref["group"] == "", name
        if ref["kind"] == "ConfigMap":
            assert named(objs, "ConfigMap", ref["name"]), f"{name}: no ConfigMap {ref['name']}"
        else:
            assert ref["kind"] == "Secret" and secret_issuer(objs, ref["name"]), f"{name}: nothing issues {ref}"


HAND_CHECKED = {"Certificate": check_certificate, "Issuer": check_issuer, "BackendTLSPolicy": check_backend_tls_policy}


def backend_tls_policy(objs: list[Obj], service: str, port_name: str) -> Obj | None:
    """The BackendTLSPolicy for a Service port, if any."""
    for policy in kind_of(objs, "BackendTLSPolicy"):
        for target in policy["spec"]["targetRefs"]:
            if target["name"] == service and target.get("sectionName") in (None, port_name):
                return policy
    return None


def secret_issuer(objs: list[Obj], secret: str) -> Obj | None:
    """The cert-manager Certificate that writes ``secret``."""
    return next((c for c in kind_of(objs, "Certificate") if c["spec"]["secretName"] == secret), None)


def _service_ports(name: str, objs: list[Obj]) -> set[str | int] | None:
    """Names and numbers of a Service's ports: one in the render, or the one Envoy Gateway makes for a Gateway."""
    service = named(objs, "Service", name)
    if service is not None:
        return {p.get("name") for p in service["spec"]["ports"]} | {p["port"] for p in service["spec"]["ports"]}
    for gateway in kind_of(objs, "Gateway"):
        ref = gateway["spec"].get("infrastructure", {}).get("parametersRef")
        proxy = named(objs, "EnvoyProxy", ref["name"]) if ref else None
        kube = (proxy or {}).get("spec", {}).get("provider", {}).get("kubernetes", {})
        if kube.get("envoyService", {}).get("name") == name:
            listeners = gateway["spec"]["listeners"]
            return {f"{x['protocol'].lower()}-{x['port']}" for x in listeners} | {x["port"] for x in listeners}
    return None


# ----- tests ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_into_the_namespace(renders: dict[str, list[Obj]], overlay: str) -> None:
    objs = renders[overlay]
    assert objs, f"manifests/{overlay} rendered nothing"
    ids = [(o["apiVersion"].split("/")[0], o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(ids) == len(set(ids)), f"duplicate objects in manifests/{overlay}"
    for obj in objs:
        assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_validate_against_kubernetes(renders: dict[str, list[Obj]], overlay: str) -> None:
    objs = renders[overlay]
    builtin = [o for o in objs if _validate_builtin(o)]
    assert {o["kind"] for o in builtin} >= {"Deployment", "Service", "ConfigMap"}
    for dep in modelservice_deployments(objs):  # what the ModelService operator will create
        assert _validate_builtin(dep)
    for route in kind_of(objs, "Route"):  # OpenShift's: no schema at hand, a hand-written check
        assert route["apiVersion"] == "route.openshift.io/v1"
        check_route(route, objs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_validate_against_their_crds(
    renders: dict[str, list[Obj]], crd_schemas: dict[tuple[str, str], Obj], overlay: str
) -> None:
    objs = renders[overlay]
    for obj in objs:
        key = (obj["apiVersion"], obj["kind"])
        if key in crd_schemas:
            _validate_crd(obj, crd_schemas[key])
        elif obj["kind"] in HAND_CHECKED:  # no CRD schema at hand: their shape by hand
            HAND_CHECKED[obj["kind"]](obj, objs)
        else:  # every other object is a built-in one, or a Route (checked above)
            assert obj["kind"] == "Route" or _validate_builtin(obj), f"no schema for {key}"


def test_schema_checks_catch_mistakes(crd_schemas: dict[tuple[str, str], Obj], renders: dict[str, list[Obj]]) -> None:
    """The validators refuse an unknown field and a wrong type, built-in and custom alike."""
    objs = renders["multi-model"]
    deployment = copy.deepcopy(named(objs, "Deployment", "extproc-router"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # misspelt
    with pytest.raises(AssertionError, match="readinesProbe"):
        _validate_builtin(deployment)
    assert not _validate_builtin(named(objs, "HTTPRoute", "llm-models"))  # a custom resource: not built in
    policy = copy.deepcopy(named(objs, "EnvoyExtensionPolicy", "extproc-router"))
    policy["spec"]["extProc"][0]["processingMode"]["request"]["body"] = "Buffer"  # not in the enum
    with pytest.raises(AssertionError, match="Buffer"):
        _validate_crd(policy, crd_schemas[(policy["apiVersion"], policy["kind"])])
    btp = copy.deepcopy(named(objs, "BackendTrafficPolicy", "extproc-endpoint-override"))
    btp["spec"]["loadBalancer"]["endpointOverride"]["extractFrom"][0]["metadata"] = {"key": "envoy.lb"}
    with pytest.raises(AssertionError, match="metadata"):
        _validate_crd(btp, crd_schemas[(btp["apiVersion"], btp["kind"])])
    btp = copy.deepcopy(named(objs, "BackendTrafficPolicy", "extproc-endpoint-override"))
    btp["spec"]["retry"]["retryOn"]["triggers"] = ["connect_failure"]  # Envoy spells it connect-failure
    with pytest.raises(AssertionError, match="connect_failure"):
        _validate_crd(btp, crd_schemas[(btp["apiVersion"], btp["kind"])])


def test_cel_rules_these_manifests_come_near(renders: dict[str, list[Obj]]) -> None:
    """CEL rules of the CRDs (jsonschema does not run them), re-checked by hand where these manifests use them."""
    for overlay, objs in renders.items():
        for route in kind_of(objs, "HTTPRoute"):
            for rule in route["spec"]["rules"]:
                # "When using URLRewrite filter with path.replacePrefixMatch, exactly one PathPrefix match must be
                # specified"
                rewrites = [
                    f
                    for f in rule.get("filters", [])
                    if f["type"] == "URLRewrite" and f["urlRewrite"].get("path", {}).get("type") == "ReplacePrefixMatch"
                ]
                if rewrites:
                    matches = rule.get("matches", [])
                    assert len(matches) == 1 and matches[0]["path"]["type"] == "PathPrefix", (overlay, rule["name"])
                for ref in rule.get("backendRefs", []):  # "Must have port for Service reference"
                    assert ref.get("kind", "Service") != "Service" or "port" in ref, (overlay, rule["name"])
        for policy in [*kind_of(objs, "EnvoyExtensionPolicy"), *kind_of(objs, "BackendTrafficPolicy")]:
            # "either targetRef or targetRefs must be used"; targets in gateway.networking.k8s.io
            assert "targetRefs" in policy["spec"] and "targetRef" not in policy["spec"]
            assert all(t["group"] == "gateway.networking.k8s.io" for t in policy["spec"]["targetRefs"])
        for policy in kind_of(objs, "EnvoyExtensionPolicy"):
            for ext in policy["spec"]["extProc"]:
                assert "backendRef" not in ext  # "BackendRefs must be used, backendRef is not supported."
                assert all(r.get("kind", "Service") == "Service" and "port" in r for r in ext["backendRefs"])
                assert not any(n.startswith("envoy.filters.http") for n in ext["metadata"]["writableNamespaces"])
        for btp in kind_of(objs, "BackendTrafficPolicy"):
            lb = btp["spec"]["loadBalancer"]
            assert lb["type"] != "DynamicModule" and "consistentHash" not in lb  # endpointOverride allowed with it
            budget = btp["spec"].get("circuitBreaker", {}).get("retryBudget")  # "numerator <= denominator"
            assert budget is None or budget["percent"]["numerator"] <= budget["percent"].get("denominator", 100)


@pytest.mark.parametrize("overlay", OPENSHIFT)
def test_openshift_overlays_expose_both_gateways(renders: dict[str, list[Obj]], overlay: str) -> None:
    """Routes to Envoy Gateway's Service (the seed's host) and to the sidecar gateway, edge TLS, long timeout."""
    routes = {r["metadata"]["name"]: r for r in kind_of(renders[overlay], "Route")}
    assert sorted(routes) == ["extproc-gateway", "llm-d-inference-gateway"]
    for route in routes.values():
        assert route["spec"]["tls"]["termination"] == "edge" and "host" not in route["spec"]
        assert route["metadata"]["annotations"]["haproxy.router.openshift.io/timeout"] == "300s"
    proxy = kind_of(renders[overlay], "EnvoyProxy")[0]["spec"]["provider"]["kubernetes"]
    assert proxy["envoyService"] == {"name": "llm-d-inference-gateway", "type": "ClusterIP"}


def test_openshift_route_check_refuses_a_wrong_target(renders: dict[str, list[Obj]]) -> None:
    objs = renders["openshift"]
    route = copy.deepcopy(named(objs, "Route", "extproc-gateway"))
    route["spec"]["port"]["targetPort"] = "admin"
    with pytest.raises(AssertionError, match="admin"):
        check_route(route, objs)
    route = copy.deepcopy(named(objs, "Route", "llm-d-inference-gateway"))
    route["spec"]["to"]["name"] = "envoy-llm-d-llm-d-inference-gateway"
    with pytest.raises(AssertionError, match="no Service"):
        check_route(route, objs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_exactly_their_deployment(renders: dict[str, list[Obj]], overlay: str) -> None:
    objs = renders[overlay]
    templates = list(pod_templates(objs))
    intended = {  # Service -> its Deployment (plain, or the ModelService operator's <name>-decode)
        "extproc-router": {"extproc-router"},
        "extproc-redis": {"extproc-redis"},
        "extproc-gateway": {"extproc-gateway"},
        "vllm-llama-3-2-1b": {"vllm-llama-3-2-1b", "llama-3-2-1b-decode"},
        "vllm-llama-3-2-3b": {"vllm-llama-3-2-3b", "llama-3-2-3b-decode"},
    }
    for service in kind_of(objs, "Service"):
        name = service["metadata"]["name"]
        selected = [
            (owner, t) for owner, t in templates if selects(service["spec"]["selector"], t["metadata"]["labels"])
        ]
        if not selected and overlay in WITH_MODELS and name.startswith("vllm-"):
            continue  # applied on top of manifests/multi-model, whose Deployments these are
        assert len(selected) == 1, f"Service {name} selects {[o for o, _ in selected]} in manifests/{overlay}"
        owner, template = selected[0]
        assert owner in intended[name], f"Service {name} selects {owner}"
        ports = {p[key] for c in containers(template) for p in c.get("ports", []) for key in ("name", "containerPort")}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {name} port {port['name']}: no such container port"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_references_resolve(renders: dict[str, list[Obj]], overlay: str) -> None:
    """ServiceAccounts, ConfigMaps and their keys, volumes: everything a pod template names exists."""
    objs = renders[overlay]
    for owner, template in pod_templates(objs):
        spec = template["spec"]
        if "serviceAccountName" in spec:
            assert named(objs, "ServiceAccount", spec["serviceAccountName"]), owner
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            if "configMap" in volume:
                cm = named(objs, "ConfigMap", volume["configMap"]["name"])
                assert cm is not None, f"{owner}: ConfigMap {volume['configMap']['name']} missing"
                for item in volume["configMap"].get("items", []):
                    assert item["key"] in cm["data"], f"{owner}: ConfigMap {cm['metadata']['name']} has no {item}"
        for container in containers(template):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{owner}/{container['name']}: no volume {mount['name']}"
                if "subPath" in mount and "configMap" in volumes[mount["name"]]:
                    cm = named(objs, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
                    assert cm is not None and mount["subPath"] in cm["data"], owner
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:  # Secrets are the user's to create (hf-token): such a reference must be optional
                    assert ref.get("optional") is True, f"{owner}: {env['name']} needs Secret {ref['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_api_references_resolve(renders: dict[str, list[Obj]], overlay: str) -> None:
    objs = renders[overlay]
    for route in kind_of(objs, "HTTPRoute"):
        for parent in route["spec"]["parentRefs"]:
            gateway = named(objs, "Gateway", parent["name"])
            assert gateway is not None, f"HTTPRoute {route['metadata']['name']}: no Gateway {parent['name']}"
            assert parent["sectionName"] in {x["name"] for x in gateway["spec"]["listeners"]}
        for rule in route["spec"]["rules"]:
            for ref in rule["backendRefs"]:
                ports = _service_ports(ref["name"], objs)
                assert ports is not None and ref["port"] in ports, f"HTTPRoute {route['metadata']['name']}: {ref}"
    for gateway in kind_of(objs, "Gateway"):
        ref = gateway["spec"]["infrastructure"]["parametersRef"]
        assert named(objs, ref["kind"], ref["name"]), f"Gateway {gateway['metadata']['name']}: no {ref}"
    for policy in [*kind_of(objs, "EnvoyExtensionPolicy"), *kind_of(objs, "BackendTrafficPolicy")]:
        for target in policy["spec"]["targetRefs"]:
            assert named(objs, target["kind"], target["name"]), f"{policy['kind']}: no {target}"
    for policy in kind_of(objs, "EnvoyExtensionPolicy"):
        for ext in policy["spec"]["extProc"]:
            for ref in ext["backendRefs"]:
                service = named(objs, "Service", ref["name"])
                assert service is not None and ref["port"] in {p["port"] for p in service["spec"]["ports"]}
                grpc = next(p for p in service["spec"]["ports"] if p["port"] == ref["port"])
                if backend_tls_policy(objs, ref["name"], grpc["name"]) is None:
                    assert grpc.get("appProtocol") == "kubernetes.io/h2c"
                else:  # TLS: not h2c, which means cleartext HTTP/2 (Envoy Gateway speaks gRPC to an ext_proc anyway)
                    assert "appProtocol" not in grpc


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitors_find_their_targets(renders: dict[str, list[Obj]], overlay: str) -> None:
    objs = renders[overlay]
    for monitor in kind_of(objs, "ServiceMonitor"):
        services = [
            s
            for s in kind_of(objs, "Service")
            if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert services, f"ServiceMonitor {monitor['metadata']['name']} selects no Service"
        for endpoint in monitor["spec"]["endpoints"]:
            for service in services:
                assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, monitor["metadata"]["name"]
    for monitor in kind_of(objs, "PodMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        if EG_OWNING_GATEWAY_LABEL in selector:  # Envoy Gateway's own proxy pods, named after their Gateway
            assert named(objs, "Gateway", selector[EG_OWNING_GATEWAY_LABEL]), monitor["metadata"]["name"]
            assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
            continue
        templates = [t for _, t in pod_templates(objs) if selects(selector, t["metadata"]["labels"])]
        assert templates, f"PodMonitor {monitor['metadata']['name']} selects no pod"
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for template in templates:
                ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
                assert endpoint["port"] in ports, monitor["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_pass_restricted_v2(renders: dict[str, list[Obj]], overlay: str) -> None:
    """OpenShift's restricted-v2 SCC: non-root with no fixed UID/fsGroup, no escalation, no capabilities."""
    objs = renders[overlay]
    for owner, template in pod_templates(objs):
        pod = template["spec"].get("securityContext", {})
        assert "runAsUser" not in pod and "fsGroup" not in pod and "runAsGroup" not in pod, owner
        assert pod.get("runAsNonRoot") is True and pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", owner
        for container in containers(template):
            where = f"{owner}/{container['name']}"
            sc = container.get("securityContext", {})
            assert sc.get("runAsNonRoot") is True, where
            assert "runAsUser" not in sc and "runAsGroup" not in sc and not sc.get("privileged"), where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities") == {"drop": ["ALL"]}, where
            assert "resources" in container and container["resources"]["limits"], where
    for proxy in kind_of(objs, "EnvoyProxy"):  # Envoy Gateway's proxies: its default UID 65532 is refused by the SCC
        sc = proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"].get("container", {}).get("securityContext")
        if overlay in OPENSHIFT:
            assert sc is not None and "runAsUser" not in sc and sc["allowPrivilegeEscalation"] is False
            assert sc["runAsNonRoot"] is True and sc["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_picker_configs_pass_check_and_match_the_model_services(
    renders: dict[str, list[Obj]], overlay: str, tmp_path: Path
) -> None:
    objs = renders[overlay]
    models = renders[WITH_MODELS.get(overlay, overlay)]
    configs = picker_configs(objs)
    assert configs, f"no picker in manifests/{overlay}"
    for i, (where, text) in enumerate(configs):
        path = tmp_path / f"config-{i}.yaml"
        path.write_text(text)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = cli.main(["serve", "--config", str(path), "--check"])
        assert status == 0, f"{where}: `extproc serve --config FILE --check` failed:\n{out.getvalue()}"
        config = load_config(path)
        for pool in config.pools:
            dns = pool.endpoints.dns
            assert dns is not None, f"{where}: pool {pool.name} should discover pods through DNS"
            match = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local", dns.name)
            assert match and match.group(2) == NAMESPACE, f"{where}: {dns.name}"
            service = named(models, "Service", match.group(1))
            assert service is not None, f"{where}: pool {pool.name}: no Service {match.group(1)}"
            assert service["spec"].get("clusterIP") == "None", f"{match.group(1)} must be headless"
            assert dns.port in {p["port"] for p in service["spec"]["ports"]}
            # The pods behind it serve the pool's model under the name the picker expects.
            owners = [
                (o, t)
                for o, t in pod_templates(models)
                if selects(service["spec"]["selector"], t["metadata"]["labels"])
            ]
            assert len(owners) == 1, f"{where}: Service {match.group(1)} selects {[o for o, _ in owners]}"
            owner, template = owners[0]
            args = template["spec"]["containers"][0]["args"]
            served = args[args.index("--served-model-name") + 1]
            if served == "{{ .ModelName }}":  # ModelService: the operator substitutes spec.routing.modelName
                msvc = named(models, "ModelService", owner.removesuffix("-decode"))
                served = msvc["spec"]["routing"]["modelName"]
            assert served == pool.served_name
            assert args[args.index("--port") + 1] == str(dns.port)


def test_vllm_servers_as_the_demo_needs_them(renders: dict[str, list[Obj]]) -> None:
    for overlay in ("multi-model", "modelservice"):
        servers = {o: t for o, t in pod_templates(renders[overlay]) if t["spec"]["containers"][0]["name"] == "vllm"}
        gpus = {}
        for owner, template in servers.items():
            vllm = template["spec"]["containers"][0]
            args = vllm["args"]
            assert "--enable-prefix-caching" in args, owner
            assert vllm["readinessProbe"]["httpGet"]["path"] == "/health", owner
            gpus[owner] = int(vllm["resources"]["limits"]["nvidia.com/gpu"])
            tp = int(args[args.index("--tensor-parallel-size") + 1]) if "--tensor-parallel-size" in args else 1
            assert tp == gpus[owner], owner
        assert sorted(gpus.values()) == [1, 2], (overlay, gpus)


def test_endpoint_picker_protocol_names_match_the_code(renders: dict[str, list[Obj]]) -> None:
    """The Envoy Gateway policies and routes use the names the picker writes and reads (extproc/names.py)."""
    objs = renders["multi-model"]
    btp = named(objs, "BackendTrafficPolicy", "extproc-endpoint-override")
    assert btp["spec"]["loadBalancer"]["endpointOverride"]["extractFrom"] == [{"header": names.DESTINATION_KEY}]
    # Envoy Gateway retries as the project's own Envoy does (the picker config's gateway section, defaults here).
    gateway = next(load_config_text(t) for w, t in picker_configs(objs) if w.startswith("extproc-router/")).gateway
    assert btp["spec"]["retry"]["numRetries"] == gateway.retries
    assert btp["spec"]["retry"]["retryOn"] == {"triggers": gateway.retry_on}
    assert btp["spec"]["circuitBreaker"]["retryBudget"] == {
        "percent": {"numerator": gateway.retry_budget_percent},
        "minRetryConcurrency": gateway.retry_budget_min_concurrency,
    }
    ext = named(objs, "EnvoyExtensionPolicy", "extproc-router")["spec"]["extProc"][0]
    assert names.LB_NAMESPACE in ext["metadata"]["writableNamespaces"]
    assert ext["processingMode"]["request"]["body"] == "Buffered" and "response" not in ext["processingMode"]
    assert names.ROUTE_ATTRIBUTE in ext["processingMode"]["request"]["attributes"]
    assert ext["failOpen"] is True
    config = next(load_config_text(t) for w, t in picker_configs(objs) if w.startswith("extproc-router/"))
    # Twice the picker's body limit, so the picker's JSON 413 answers oversized bodies (Envoy Gateway's is text).
    assert _quantity(btp["spec"]["requestBuffer"]["limit"]) == config.limits.envoy_buffer_bytes(json_errors=False)
    # Model routing: one rule per pool matching the header the picker sets, to that pool's headless Service.
    route = named(objs, "HTTPRoute", "llm-models")
    for pool in config.pools:
        service = pool.endpoints.dns.name.split(".")[0]
        by_model = [
            r
            for r in route["spec"]["rules"]
            if r["matches"][0]["path"]["value"] == "/v1"
            and r["matches"][0].get("headers") == [{"name": names.POOL_HEADER, "value": pool.name}]
        ]
        assert [r["backendRefs"][0]["name"] for r in by_model] == [service]
        by_path = [
            r
            for r in route["spec"]["rules"]
            if r["matches"][0] == {"path": {"type": "PathPrefix", "value": f"/v1/{pool.name}"}}
        ]
        assert [r["backendRefs"][0]["name"] for r in by_path] == [service]
    # /v1/ab-test goes to the sidecar gateway, whose Envoy has the split route /v1/ab-test/.
    ab = named(objs, "HTTPRoute", "ab-test")["spec"]["rules"][0]
    sidecar = next(load_config_text(t) for w, t in picker_configs(objs) if w.startswith("extproc-gateway/extproc"))
    assert ab["matches"][0]["path"]["value"] == f"/v1/{sidecar.splits[0].name}"
    assert ab["backendRefs"] == [{"name": "extproc-gateway", "port": 8080}] and "filters" not in ab


def load_config_text(text: str) -> Any:
    from extproc.config import parse_config

    return parse_config(yaml.safe_load(text))


def _quantity(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", value).groups()
    return int(number) * {None: 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}[unit]


def test_sidecar_bootstrap_is_generated_and_accepted_by_envoy(renders: dict[str, list[Obj]], tmp_path: Path) -> None:
    """The initContainer's own command, run here with its paths mapped to a temporary directory; then Envoy
    validates the bootstrap it wrote with the Envoy container's own arguments."""
    try:
        envoy = envoy_binary()
    except EnvoyNotFound as exc:
        pytest.skip(str(exc))
    objs = renders["sidecar"]
    template = named(objs, "Deployment", "extproc-gateway")["spec"]["template"]
    init = next(c for c in template["spec"]["initContainers"] if c["name"] == "envoy-config")
    proxy = next(c for c in template["spec"]["containers"] if c["name"] == "envoy")
    picker = next(c for c in template["spec"]["containers"] if c["name"] == "extproc")
    command = [*init["command"], *init.get("args", [])]
    assert command[:2] == ["extproc", "envoy-config"]
    output = command[command.index("-o") + 1]
    # Envoy reads what the initContainer writes: the same volume at the same path, and eds_dir shared with the picker.
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in (init, proxy, picker)}
    assert proxy["args"][proxy["args"].index("-c") + 1] == output
    shared = next(n for n, p in mounts["envoy-config"].items() if output.startswith(p + "/"))
    assert mounts["envoy"][shared] == mounts["envoy-config"][shared] == mounts["extproc"][shared]
    assert "emptyDir" in next(v for v in template["spec"]["volumes"] if v["name"] == shared)
    text = dict(picker_configs(objs))["extproc-gateway/envoy-config"]
    config = load_config_text(text)
    assert config.server.eds_dir is not None and config.server.eds_dir.startswith(mounts["extproc"][shared] + "/")
    assert config.server.listen.startswith("127.0.0.1:")  # the ext_proc stays inside the Pod
    assert dict(picker_configs(objs))["extproc-gateway/extproc"] == text

    # Run it: container paths -> tmp_path (the config, the output, and eds_dir through --eds-dir).
    config_path = tmp_path / "config.yaml"
    config_path.write_text(text)
    bootstrap = tmp_path / "envoy.yaml"
    argv = [*command[2:], "--eds-dir", str(tmp_path / "eds")]
    argv[argv.index("--config") + 1] = str(config_path)
    argv[argv.index("-o") + 1] = str(bootstrap)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = cli.main(["envoy-config", *argv])
    assert status == 0, out.getvalue()
    generated = yaml.safe_load(bootstrap.read_text())
    listener = generated["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert (listener["address"], listener["port_value"]) == ("0.0.0.0", 8080)
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports["http"] == 8080 and generated["admin"]["address"]["socket_address"]["port_value"] == ports["admin"]
    assert sorted(p.name for p in (tmp_path / "eds").iterdir()) == [f"pool-{p.name}.json" for p in config.pools]

    args = [str(bootstrap) if a == output else a for a in proxy["args"]]
    done = subprocess.run([envoy, "--mode", "validate", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"envoy rejected the bootstrap:\n{done.stdout}{done.stderr}"
    # The image runs the Envoy these checks ran.
    version = re.search(
        r"version: \w+/(\d+\.\d+)\.", subprocess.run([envoy, "--version"], capture_output=True, text=True).stdout
    )
    assert version and f"v{version.group(1)}." in proxy["image"], f"{proxy['image']} vs local Envoy {version}"


def test_sidecar_picker_probes_work_against_a_real_picker(renders: dict[str, list[Obj]], tmp_path: Path) -> None:
    """The sidecar picker's exec probes (it listens on 127.0.0.1, out of the kubelet's reach), run for real."""
    template = named(renders["sidecar"], "Deployment", "extproc-gateway")["spec"]["template"]
    picker = next(c for c in template["spec"]["containers"] if c["name"] == "extproc")
    probes = {kind: picker[kind]["exec"]["command"] for kind in ("readinessProbe", "livenessProbe")}
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"listen": f"127.0.0.1:{port}", "metrics_listen": f"127.0.0.1:{free_port()}"},
                "pools": [{"name": "a", "models": ["m"], "endpoints": {"static": ["127.0.0.1:9"]}}],
            }
        )
    )

    def run(command: list[str], address: str) -> int:
        assert command[0] == "python3" and "127.0.0.1:9002" in command[2]
        argv = [sys.executable, command[1], command[2].replace("127.0.0.1:9002", address), *command[3:]]
        return subprocess.run(argv, capture_output=True, timeout=30).returncode

    closed = f"127.0.0.1:{free_port()}"
    assert run(probes["readinessProbe"], closed) != 0  # nothing listening: the probe fails
    child = Child("extproc", extproc_argv("serve", "--config", str(config)), tmp_path / "logs")
    try:
        deadline = time.monotonic() + 20
        while run(probes["readinessProbe"], f"127.0.0.1:{port}") != 0:
            assert child.alive() and time.monotonic() < deadline, child.log_tail()
            time.sleep(0.2)
        assert run(probes["livenessProbe"], f"127.0.0.1:{port}") == 0
    finally:
        child.stop()


def test_dashboard_configmaps_are_the_repository_dashboards(renders: dict[str, list[Obj]]) -> None:
    originals = {p.name: p.read_text() for p in sorted(DASHBOARDS.glob("*.json"))}
    copies = {p.name: p.read_text() for p in sorted(DASHBOARD_COPIES.glob("*.json"))}
    refresh = "refresh them: cp grafana/dashboards/*.json manifests/multi-model/dashboards/"
    assert sorted(copies) == sorted(originals), f"manifests/multi-model/dashboards differs in files; {refresh}"
    for name, text in originals.items():
        assert copies[name] == text, f"manifests/multi-model/dashboards/{name} is out of date; {refresh}"
    for overlay in ("multi-model", "modelservice", *OPENSHIFT):
        maps = [
            c
            for c in kind_of(renders[overlay], "ConfigMap")
            if c["metadata"].get("labels", {}).get("grafana_dashboard")
        ]
        assert all(c["metadata"]["labels"]["grafana_dashboard"] == "1" for c in maps)
        data = {key: value for c in maps for key, value in c["data"].items()}
        assert data == originals, overlay
        for text in data.values():
            json.loads(text)


# ----- TLS to the picker ----------------------------------------------------------------------------------------


def _picker_container(objs: list[Obj]) -> tuple[Obj, Obj]:
    template = named(objs, "Deployment", "extproc-router")["spec"]["template"]
    return template, next(c for c in template["spec"]["containers"] if c["name"] == "extproc")


def _mounted_volume(template: Obj, container: Obj, path: str) -> Obj:
    """The volume a file path of the container lies on."""
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    return next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])


@pytest.mark.parametrize("overlay", TLS_OVERLAYS)
def test_tls_overlays_wire_the_certificate_end_to_end(renders: dict[str, list[Obj]], overlay: str) -> None:
    """The picker serves the certificate its layout issues; Envoy Gateway, Prometheus and the probes trust it for
    the same name; with mutual TLS each of them presents a client certificate from the same CA."""
    objs = renders[overlay]
    configs = dict(picker_configs(objs))
    tls_config = load_config_text(configs["extproc-router/extproc"])
    tls = tls_config.server.tls
    assert tls is not None, f"manifests/{overlay}: the picker has no server.tls"
    # Nothing else differs from the plaintext picker's configuration.
    plain = load_config_text(dict(picker_configs(renders["multi-model"]))["extproc-router/extproc"])
    assert tls_config.model_copy(update={"server": tls_config.server.model_copy(update={"tls": None})}) == plain
    template, picker = _picker_container(objs)
    secret = _mounted_volume(template, picker, tls.cert_file)["secret"]["secretName"]
    assert _mounted_volume(template, picker, tls.key_file)["secret"]["secretName"] == secret
    service = named(objs, "Service", "extproc-router")
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    policy = backend_tls_policy(objs, "extproc-router", "grpc")
    assert policy is not None and "appProtocol" not in grpc_port
    hostname = policy["spec"]["validation"]["hostname"]
    issued = secret_issuer(objs, secret)
    if issued is not None:  # cert-manager
        assert hostname in issued["spec"]["dnsNames"] and "server auth" in issued["spec"]["usages"]
        issuer = issued["spec"]["issuerRef"]["name"]
    else:  # OpenShift's service CA issues <service>.<namespace>.svc for the annotated Service
        assert service["metadata"]["annotations"]["service.beta.openshift.io/serving-cert-secret-name"] == secret
        assert hostname == f"extproc-router.{NAMESPACE}.svc"
        issuer = None
    for ref in policy["spec"]["validation"]["caCertificateRefs"]:  # the CA Envoy Gateway trusts signs the picker's
        if ref["kind"] == "Secret":
            assert secret_issuer(objs, ref["name"])["spec"]["issuerRef"]["name"] == issuer
        else:
            cm = named(objs, "ConfigMap", ref["name"])
            assert (
                issuer is None and cm["metadata"]["annotations"]["service.beta.openshift.io/inject-cabundle"] == "true"
            )
    monitor = next(e for e in named(objs, "ServiceMonitor", "extproc-router")["spec"]["endpoints"])
    assert monitor["scheme"] == "https" and monitor["tlsConfig"]["serverName"] == hostname
    if tls.client_ca_file is not None:  # mutual TLS: every client has a certificate from the picker's CA
        assert _mounted_volume(template, picker, tls.client_ca_file)["secret"]["secretName"] == secret
        proxy = kind_of(objs, "EnvoyProxy")[0]["spec"]["backendTLS"]["clientCertificateRef"]
        client = secret_issuer(objs, proxy["name"])
        assert client["spec"]["issuerRef"]["name"] == issuer and "client auth" in client["spec"]["usages"]
        assert monitor["tlsConfig"]["cert"]["secret"]["name"] == monitor["tlsConfig"]["keySecret"]["name"]
        assert secret_issuer(objs, monitor["tlsConfig"]["keySecret"]["name"])["spec"]["issuerRef"]["name"] == issuer
        assert "client auth" in issued["spec"]["usages"]  # the probes present the pod's own certificate
    for kind in ("readinessProbe", "livenessProbe"):  # over TLS, for the same name, files from the pod's volumes
        command = picker[kind]["exec"]["command"]
        assert command[:5] == ["python3", "-m", "extproc.tls", f"127.0.0.1:{grpc_port['port']}", kind[:-5]]
        assert command[command.index("--server-name") + 1] == hostname
        for option in ("--ca", "--cert", "--key"):
            if option in command:
                _mounted_volume(template, picker, command[command.index(option) + 1])
        assert ("--cert" in command) == (tls.client_ca_file is not None)


def test_tls_hand_checks_catch_mistakes(renders: dict[str, list[Obj]]) -> None:
    objs = renders["tls"]
    policy = copy.deepcopy(named(objs, "BackendTLSPolicy", "extproc-router"))
    policy["spec"]["validation"]["wellKnownCACertificates"] = "System"  # CEL: not with caCertificateRefs
    with pytest.raises(AssertionError):
        check_backend_tls_policy(policy, objs)
    policy = copy.deepcopy(named(objs, "BackendTLSPolicy", "extproc-router"))
    policy["spec"]["targetRefs"][0]["sectionName"] = "grcp"
    with pytest.raises(AssertionError, match="grcp"):
        check_backend_tls_policy(policy, objs)
    cert = copy.deepcopy(named(objs, "Certificate", "extproc-router-tls"))
    cert["spec"]["usages"].append("server-auth")
    with pytest.raises(AssertionError, match="server-auth"):
        check_certificate(cert, objs)
    cert = copy.deepcopy(named(objs, "Certificate", "extproc-router-tls"))
    cert["spec"]["dnsName"] = cert["spec"].pop("dnsNames")
    with pytest.raises(AssertionError, match="dnsName"):
        check_certificate(cert, objs)


@pytest.mark.parametrize("overlay", TLS_OVERLAYS)
def test_tls_picker_probes_work_against_a_real_picker(
    renders: dict[str, list[Obj]], overlay: str, tmp_path: Path
) -> None:
    """The TLS overlays' exec probes and server.tls, run for real: the container's files are laid out under a
    temporary root (a certificate for the policy's hostname, server and client auth like cert-manager's)."""
    from extproc.local.certs import issue, make_ca

    objs = renders[overlay]
    _, picker = _picker_container(objs)
    tls = load_config_text(dict(picker_configs(objs))["extproc-router/extproc"]).server.tls
    hostname = backend_tls_policy(objs, "extproc-router", "grpc")["spec"]["validation"]["hostname"]
    root = tmp_path / "root"
    ca = make_ca(tmp_path / "ca")
    cert, key = root / tls.cert_file.lstrip("/"), root / tls.key_file.lstrip("/")
    cert.parent.mkdir(parents=True)
    issue(ca, cert, key, hostname, [hostname], "serverAuth,clientAuth")
    probes = {kind: picker[kind]["exec"]["command"] for kind in ("readinessProbe", "livenessProbe")}
    for command in probes.values():  # the CA files the probes (and client_ca_file) read, wherever they are mounted
        for path in [command[command.index("--ca") + 1], tls.client_ca_file]:
            if path and not (root / path.lstrip("/")).exists():
                (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ca.ca, root / path.lstrip("/"))
    port = free_port()
    server_tls = {k: str(root / v.lstrip("/")) for k, v in tls.model_dump(exclude_none=True).items()}
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {
                    "listen": f"127.0.0.1:{port}",
                    "metrics_listen": f"127.0.0.1:{free_port()}",
                    "tls": server_tls,
                },
                "pools": [{"name": "a", "models": ["m"], "endpoints": {"static": ["127.0.0.1:9"]}}],
            }
        )
    )

    def run(command: list[str]) -> int:
        argv = [sys.executable, *command[1:]]
        argv[3] = f"127.0.0.1:{port}"
        argv = [str(root / a.lstrip("/")) if a.startswith("/var/") else a for a in argv]
        return subprocess.run(argv, capture_output=True, timeout=30).returncode

    assert run(probes["readinessProbe"]) != 0  # nothing listening yet
    child = Child("extproc", extproc_argv("serve", "--config", str(config)), tmp_path / "logs")
    try:
        deadline = time.monotonic() + 20
        while run(probes["readinessProbe"]) != 0:
            assert child.alive() and time.monotonic() < deadline, child.log_tail()
            time.sleep(0.2)
        assert run(probes["livenessProbe"]) == 0
    finally:
        child.stop()
