"""The JSON API beside the gateway: customer billing routes, the operator's admin API,
notifications and the OpenAPI document."""
