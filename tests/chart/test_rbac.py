"""The chart grants exactly the API calls the operator and the trainer make, and no more.

The calls are derived from the code, not listed by hand:

- explicit calls: every `kubernetes` client method the code calls (operator/kube.py wraps
  them; trainer/ calls them directly), each mapped to its verb and resource, with the
  group and plural arguments of custom-object calls resolved at each call site (a
  constant, a module global or a class attribute of the launcher classes);
- kopf's own calls, from the real handler registry `build_registry` returns: list and
  watch of every resource a handler is registered for, patch of those whose changes it
  handles (kopf keeps its progress and diff-base in annotations), and create of core
  Events when the code posts events with kopf.info/warn/event/exception. Only when the
  operator leaves kopf's cluster scanning on, list and watch of CRDs and namespaces,
  which kopf goes on without (see kopf_optional_calls) and the chart does not grant.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

Call = tuple[str, str, str]  # (verb, API group, resource or resource/subresource)

_VERBS = {"read": "get", "get": "get", "list": "list", "create": "create", "patch": "patch",
          "replace": "update", "delete": "delete"}
# Custom-object methods: positions of the group and plural arguments.
_CUSTOM_ARGS = (0, 3)
_DISCOVERY = {"get_api_resources", "get_api_group", "get_api_versions", "get_code"}


@functools.cache
def _api_methods() -> frozenset[str]:
    """Method names of the kubernetes client API classes that operator/ or trainer/ use."""
    import kubernetes.client

    used = set()
    for folder in ("operator", "trainer"):
        for path in (ROOT / folder).glob("*.py"):
            tree = ast.parse(path.read_text())
            used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                     and n.attr.endswith("Api") and n.attr[0].isupper()}
            used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                     and (n.module or "").startswith("kubernetes") for a in n.names
                     if a.name.endswith("Api")}
    return frozenset(
        name for cls in used for name in vars(getattr(kubernetes.client, cls))
        if not name.startswith("_") and not name.endswith("_with_http_info")
    )


def _client_call(method: str) -> tuple[str, str | None, bool] | None:
    """(verb, core resource or None for a custom object, is a status call) of a client method.

    `read_namespaced_config_map` -> ("get", "configmaps", False);
    `patch_namespaced_custom_object_status` -> ("patch", None, True).
    """
    if method in _DISCOVERY or method not in _api_methods():
        return None
    verb, _, rest = method.partition("_")
    if verb not in _VERBS:
        return None
    rest = rest.removeprefix("namespaced_").removeprefix("collection_")
    status = rest.endswith("_status")
    rest = rest.removesuffix("_status")
    if rest in ("custom_object", "cluster_custom_object"):
        return _VERBS[verb], None, status
    return _VERBS[verb], rest.replace("_", "") + "s", status


class _Module:
    """A source file's syntax tree, and the module itself, imported only when needed."""

    def __init__(self, name: str, path: Path) -> None:
        self.__name__ = name
        self.tree = ast.parse(path.read_text())

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self.__name__), attr)


def _modules(folder: str, package: str):
    for path in sorted((ROOT / folder).glob("*.py")):
        if path.stem != "__init__":
            module = _Module(f"{package}.{path.stem}", path)
            yield module, module.tree


def _classes_defining(modules, attr: str) -> set[str]:
    values = set()
    for lazy, _ in modules:
        module = importlib.import_module(lazy.__name__)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            value = cls.__dict__.get(attr)
            if isinstance(value, str) and cls.__module__ == module.__name__:
                values.add(value)
    return values


def _resolve(node: ast.expr, module, modules) -> set[str]:
    """The possible string values of an argument expression at a call site."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.Name) and isinstance(getattr(module, node.id, None), str):
        return {getattr(module, node.id)}
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
            and node.value.id in ("self", "cls"):
        # A launcher base class reads self.group; every concrete class sets it.
        return _classes_defining(modules, node.attr)
    raise AssertionError(f"{module.__name__}: cannot resolve {ast.unparse(node)}; "
                         "extend tests/chart/test_rbac.py")


def _custom_call(verb: str, status: bool, groups: set[str], plurals: set[str]) -> set[Call]:
    suffix = "/status" if status else ""
    return {(verb, g, p + suffix) for g in groups for p in plurals}


def _units(tree: ast.Module):
    """(name, node) of each top-level function and method, and ("", rest) for module code."""
    rest = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield item.name, item
                else:
                    rest.append(item)
        else:
            rest.append(node)
    yield "", ast.Module(body=rest, type_ignores=[])


def _referenced(node: ast.AST) -> set[str]:
    return {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node)
            if isinstance(n, ast.Name | ast.Attribute)}


def _live_calls(modules):
    """(module, call) of every call in code that can run.

    A function or method counts as reachable from module-level code, from `register`
    (the CLI's entry into the package) and from any reachable function that mentions its
    name; nested functions (kopf handlers) belong to their enclosing function. Matching by
    bare name over-approximates, which can only grant more, never less. A method nothing
    mentions (say a launcher's `delete`) makes no calls.
    """
    units = [(module, name, node) for module, tree in modules for name, node in _units(tree)]
    live = {"", "register"} | {n for n in ("__init__", "__call__", "__enter__", "__exit__")}
    while True:
        mentioned = set().union(*(_referenced(node) for _, name, node in units if name in live))
        if mentioned <= live:
            break
        live |= mentioned
    for module, name, node in units:
        if name in live:
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
                    yield module, call


def _direct_calls(modules) -> set[Call]:
    """Client calls made directly (not through a wrapper's parameters)."""
    calls: set[Call] = set()
    for module, node in _live_calls(modules):
        found = _client_call(node.func.attr)
        if found is None:
            continue
        verb, resource, status = found
        if resource is not None:
            calls.add((verb, "", resource + ("/status" if status else "")))
            continue
        group_arg, plural_arg = (node.args[i] if len(node.args) > i else None
                                 for i in _CUSTOM_ARGS)
        if isinstance(group_arg, ast.Name) and isinstance(plural_arg, ast.Name) \
                and not hasattr(module, group_arg.id):
            continue  # a wrapper passing its own parameters on; see _wrapped_calls
        calls |= _custom_call(verb, status, _resolve(group_arg, module, modules),
                              _resolve(plural_arg, module, modules))
    return calls


def _wrapped_calls(modules, wrapper_module: str) -> set[Call]:
    """Calls through operator/kube.py's Kube methods, resolved at every call site."""
    kube_module, kube_tree = next((m, t) for m, t in modules if m.__name__ == wrapper_module)
    wrappers: dict[str, tuple[list[str], list[tuple[str, str | None, bool, int, int]]]] = {}
    for cls in (n for n in kube_tree.body if isinstance(n, ast.ClassDef)):
        for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
            params = [a.arg for a in fn.args.args][1:]
            inner = []
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    found = _client_call(node.func.attr)
                    if found is None or found[1] is not None:
                        continue
                    g, p = (node.args[i] for i in _CUSTOM_ARGS)
                    inner.append((*found, params.index(g.id), params.index(p.id)))
            if inner:
                wrappers[fn.name] = (params, inner)
    calls: set[Call] = set()
    for module, node in _live_calls(modules):
        if module is not kube_module and node.func.attr in wrappers:
            _, inner = wrappers[node.func.attr]
            for verb, _, status, gi, pi in inner:
                calls |= _custom_call(verb, status, _resolve(node.args[gi], module, modules),
                                      _resolve(node.args[pi], module, modules))
    return calls


def _posts_events(modules) -> bool:
    for _, tree in modules:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "kopf" and node.attr in ("info", "warn", "event",
                                                                  "exception"):
                return True
    return False


def _kopf_calls() -> set[Call]:
    from evaclip.operator.handlers import build_registry
    from evaclip.operator.metrics import OperatorMetrics
    from evaclip.operator.settings import OperatorConfig

    registry = build_registry(OperatorConfig(), OperatorMetrics())
    calls: set[Call] = set()
    for handlers, verbs in (
        (registry._watching.get_all_handlers(), ("list", "watch")),
        (registry._changing.get_all_handlers(), ("list", "watch", "patch")),
        (registry._spawning.get_all_handlers(), ("list", "watch", "patch")),
        (registry._indexing.get_all_handlers(), ("list", "watch")),
    ):
        for handler in handlers:
            selector = handler.selector
            plural = selector.plural or selector.any_name
            assert selector.group is not None and plural, f"{handler.id}: fuzzy selector"
            calls |= {(verb, selector.group, plural) for verb in verbs}
    return calls


def kopf_optional_calls(namespaced: bool) -> set[Call]:
    """Calls kopf makes only to notice new CRDs and namespaces, and goes on without.

    Unless `settings.scanning.disabled`, kopf lists and watches CRDs, and in namespaced
    mode namespaces; on 403 it logs a warning and serves the configured namespaces and
    the CRDs present at start (kopf/_core/reactor/observation.py). The chart grants none
    of them: the CRD is installed before the operator starts, the watched namespaces are
    fixed by the values, and granting them would need cluster-scoped permissions.
    """
    import kopf

    from evaclip.operator.handlers import configure_kopf
    from evaclip.operator.settings import OperatorConfig

    settings = kopf.OperatorSettings()
    configure_kopf(settings, OperatorConfig())
    if settings.scanning.disabled:
        return set()
    calls = {("list", "apiextensions.k8s.io", "customresourcedefinitions"),
             ("watch", "apiextensions.k8s.io", "customresourcedefinitions")}
    if namespaced:
        calls |= {("list", "", "namespaces"), ("watch", "", "namespaces")}
    return calls


def operator_calls() -> set[Call]:
    """The calls the operator needs, the same in cluster-wide and namespaced mode."""
    modules = list(_modules("operator", "evaclip.operator"))
    calls = _direct_calls(modules) | _wrapped_calls(modules, "evaclip.operator.kube")
    calls |= _kopf_calls()
    if _posts_events(modules):
        calls.add(("create", "", "events"))
    return calls


def trainer_calls() -> set[Call]:
    return _direct_calls(list(_modules("trainer", "evaclip.trainer")))


def _granted(rules: list[dict]) -> set[Call]:
    return {(verb, group, resource) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def _kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def test_the_derivation_reads_the_code() -> None:
    """Guards the tests below: the scan finds the calls the operator is known to need."""
    calls = operator_calls()
    assert ("create", "kubeflow.org", "pytorchjobs") in calls
    assert ("patch", "training.evaclip.io", "evaclipfinetunes/status") in calls
    assert ("watch", "training.evaclip.io", "evaclipfinetunes") in calls
    assert ("create", "", "configmaps") in calls
    assert _client_call("read_namespaced_config_map") == ("get", "configmaps", False)
    assert _client_call("patch_namespaced_custom_object_status") == ("patch", None, True)


def test_cluster_wide_rules_are_exactly_the_operator_calls(render) -> None:
    objects = render()
    (role,) = _kind(objects, "ClusterRole")
    assert _granted(role["rules"]) == operator_calls()
    assert not _granted(role["rules"]) & kopf_optional_calls(namespaced=False)
    (binding,) = _kind(objects, "ClusterRoleBinding")
    (account,) = [a for a in _kind(objects, "ServiceAccount")
                  if a["metadata"]["name"] == binding["subjects"][0]["name"]]
    deployment = _kind(objects, "Deployment")[0]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == \
        account["metadata"]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_watched_namespaces_get_roles_and_no_cluster_permissions(render) -> None:
    watched = ["ml-team-a", "ml-team-b"]
    objects = render({"watchNamespaces": watched})
    assert not _kind(objects, "ClusterRole") and not _kind(objects, "ClusterRoleBinding")
    operator_roles = [r for r in _kind(objects, "Role")
                      if not r["metadata"]["name"].endswith("-trainer")]
    assert sorted(r["metadata"]["namespace"] for r in operator_roles) == watched
    for role in operator_roles:
        assert _granted(role["rules"]) == operator_calls()
    bindings = [b for b in _kind(objects, "RoleBinding")
                if not b["metadata"]["name"].endswith("-trainer")]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == watched
    for binding in bindings:
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": operator_roles[0]["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "evaclip-operator",
                                        "namespace": "evaclip-system"}]
    env = {e["name"]: e["value"] for e in
           _kind(objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["EVACLIP_WATCH_NAMESPACES"] == ",".join(watched)


@pytest.mark.parametrize("values,namespaces", [
    ({}, ["evaclip-system"]),
    ({"trainer": {"namespaces": ["ml-team-a", "ml-team-b"]}}, ["ml-team-a", "ml-team-b"]),
    ({"watchNamespaces": ["ml-team-c"]}, ["ml-team-c"]),
])
def test_trainer_pods_get_only_their_status_calls(render, values, namespaces) -> None:
    objects = render(values)
    roles = [r for r in _kind(objects, "Role") if r["metadata"]["name"].endswith("-trainer")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == namespaces
    expected = trainer_calls()
    assert ("patch", "training.evaclip.io", "evaclipfinetunes/status") in expected
    for role in roles:
        assert _granted(role["rules"]) == expected
    accounts = {(a["metadata"]["namespace"], a["metadata"]["name"])
                for a in _kind(objects, "ServiceAccount")}
    for binding in (b for b in _kind(objects, "RoleBinding")
                    if b["metadata"]["name"].endswith("-trainer")):
        (subject,) = binding["subjects"]
        assert (subject["namespace"], subject["name"]) in accounts
        assert subject["namespace"] == binding["metadata"]["namespace"]


def test_no_role_grants_secrets_or_wildcards(render) -> None:
    for values in ({}, {"watchNamespaces": ["ml-team-a"]}):
        for role in _kind(render(values), "Role") + _kind(render(values), "ClusterRole"):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
                assert "secrets" not in rule["resources"]
