"""The gateway's route table: every metered route, each a plain ASGI endpoint."""

from __future__ import annotations

from starlette.routing import BaseRoute, Route

from tollway.gateway.apis import ApiRoute
from tollway.gateway.count_tokens import CountTokensRoute
from tollway.gateway.images import ImagesRoute
from tollway.gateway.llm import LLMRoute
from tollway.gateway.messages import MessagesRoute
from tollway.gateway.models import ModelsRoute
from tollway.gateway.responses import ResponsesRoute

gateway_routes: list[BaseRoute] = [
    Route("/v1/chat/completions", LLMRoute("chat"), methods=["POST"]),
    Route("/v1/completions", LLMRoute("completions"), methods=["POST"]),
    Route("/v1/embeddings", LLMRoute("embeddings"), methods=["POST"]),
    Route("/v1/messages", MessagesRoute(), methods=["POST"]),
    Route("/v1/messages/count_tokens", CountTokensRoute(), methods=["POST"]),
    Route("/v1/responses", ResponsesRoute(), methods=["POST"]),
    Route("/v1/images/generations", ImagesRoute(), methods=["POST"]),
    Route("/v1/models", ModelsRoute(), methods=["GET"]),
    Route("/v1/models/{model_id:path}", ModelsRoute(), methods=["GET"]),
    Route("/apis/v1/{path:path}", ApiRoute(), methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
]
