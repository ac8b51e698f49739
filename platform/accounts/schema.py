"""Teaches drf-spectacular our credential schemes (a customer's API token, a node's secret), so
the OpenAPI schema says how to authenticate."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiTokenScheme(OpenApiAuthenticationExtension):
    target_class = "accounts.authentication.ApiTokenAuthentication"
    name = "apiToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API token from /api/v1/tokens: `Authorization: Bearer vtpu_...`.",
        }


class NodeSecretScheme(OpenApiAuthenticationExtension):
    target_class = "api.views.NodeSecretAuthentication"
    name = "nodeSecret"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A node's own secret (from enrollment or provisioning), for its"
            " agent's heartbeats: `Authorization: Bearer <node secret>`.",
        }
