"""Post-processing of the OpenAPI schema (SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"])."""


def require_polymorphic_bodies(result: dict, generator, request, public) -> dict:
    """drf-spectacular cannot tell that a body made of `oneOf` shapes (PolymorphicProxySerializer,
    e.g. an alert channel by its `kind`) is required; every one of ours is."""
    schemas = result.get("components", {}).get("schemas", {})
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            body = operation.get("requestBody") if isinstance(operation, dict) else None
            if not body or body.get("required"):
                continue
            for media in body.get("content", {}).values():
                ref = media.get("schema", {}).get("$ref", "")
                if "oneOf" in schemas.get(ref.rsplit("/", 1)[-1], {}):
                    body["required"] = True
    return result
