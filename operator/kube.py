"""A thin layer over the synchronous `kubernetes` client that speaks plain dicts.

The operator reads and writes a handful of object kinds; every call goes through here,
with an explicit request timeout and JSON merge patches, and comes back as the JSON the
API server sent (no generated model classes), so tests see exactly what is on the wire.
Handlers that use it are synchronous: kopf runs them in its thread pool, so a slow API
call never blocks the operator's event loop.
"""

from __future__ import annotations

import json
from typing import Any

MERGE_PATCH = "application/merge-patch+json"
TIMEOUT = (5.0, 30.0)  # connect, read: no call waits forever


class Kube:
    """Dict-in, dict-out access to the API, sharing one connection pool."""

    def __init__(self, api_client: Any | None = None, *, pool_size: int | None = None) -> None:
        """`pool_size`: HTTP connections kept open; at least the number of handler threads.

        The client's default (5 per CPU) is smaller than the operator's thread pool on
        small nodes: under a burst, every thread beyond it opened and dropped a connection
        per request, which costs both sides a TCP handshake each time.
        """
        import kubernetes.client

        if api_client is None:
            configuration = kubernetes.client.Configuration.get_default_copy()
            if pool_size:
                configuration.connection_pool_maxsize = max(
                    configuration.connection_pool_maxsize or 0, pool_size
                )
            api_client = kubernetes.client.ApiClient(configuration)
        self.client = api_client
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        data = response.data
        return json.loads(data) if data else {}

    # --- discovery ------------------------------------------------------------------------

    def serves(self, group: str, version: str, plural: str) -> bool:
        """Whether the cluster serves this resource (a 404 on its group/version: no)."""
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.custom.get_api_resources(
                group, version, _preload_content=False, _request_timeout=TIMEOUT
            )
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        names = {r.get("name") for r in self._json(response).get("resources", [])}
        return plural in names

    # --- custom objects -------------------------------------------------------------------

    def get_custom(
        self, group: str, version: str, plural: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._json(
                self.custom.get_namespaced_custom_object(
                    group, version, namespace, plural, name,
                    _preload_content=False, _request_timeout=TIMEOUT,
                )
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def create_custom(
        self, group: str, version: str, plural: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        namespace = body["metadata"]["namespace"]
        return self._json(
            self.custom.create_namespaced_custom_object(
                group, version, namespace, plural, body,
                _preload_content=False, _request_timeout=TIMEOUT,
            )
        )

    def patch_custom(
        self, group: str, version: str, plural: str, namespace: str, name: str,
        patch: dict[str, Any],
    ) -> dict[str, Any]:
        return self._json(
            self.custom.patch_namespaced_custom_object(
                group, version, namespace, plural, name, patch,
                _content_type=MERGE_PATCH, _preload_content=False, _request_timeout=TIMEOUT,
            )
        )

    def patch_custom_status(
        self, group: str, version: str, plural: str, namespace: str, name: str,
        status: dict[str, Any],
    ) -> dict[str, Any]:
        return self._json(
            self.custom.patch_namespaced_custom_object_status(
                group, version, namespace, plural, name, {"status": status},
                _content_type=MERGE_PATCH, _preload_content=False, _request_timeout=TIMEOUT,
            )
        )

    def delete_custom(
        self, group: str, version: str, plural: str, namespace: str, name: str
    ) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.delete_namespaced_custom_object(
                group, version, namespace, plural, name,
                _preload_content=False, _request_timeout=TIMEOUT,
            )
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    # --- config maps ----------------------------------------------------------------------

    def get_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._json(
                self.core.read_namespaced_config_map(
                    name, namespace, _preload_content=False, _request_timeout=TIMEOUT
                )
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def create_config_map(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._json(
            self.core.create_namespaced_config_map(
                body["metadata"]["namespace"], body,
                _preload_content=False, _request_timeout=TIMEOUT,
            )
        )

    def patch_config_map(
        self, namespace: str, name: str, patch: dict[str, Any]
    ) -> dict[str, Any]:
        return self._json(
            self.core.patch_namespaced_config_map(
                name, namespace, patch,
                _content_type=MERGE_PATCH, _preload_content=False, _request_timeout=TIMEOUT,
            )
        )

    def delete_config_map(self, namespace: str, name: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_namespaced_config_map(
                name, namespace, _preload_content=False, _request_timeout=TIMEOUT
            )
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True
