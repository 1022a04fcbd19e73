"""The HTTP gateway: OpenAI, Anthropic and Ollama APIs and ``/metrics`` over the router.

A supervised child of the root (role ``gateway``), its own OS process so that HTTP
parsing and slow clients never share a process with the router or a model. It talks to
the router exactly as ``erllama.AsyncClient`` does (the router's ipc client endpoint);
never to workers or meta. The API shapes live here only:

* ``process``: the child's main (handshake, uvicorn on its own socket, stop).
* ``app``: the Starlette application, limits, API keys, ``/health``, ``/metrics``.
* ``openai_api``, ``anthropic_api``, ``ollama_api``: one module per API.
* ``common``: request options, a generation run to completion or as a stream.
* ``errors``: error codes -> HTTP status and each API's error body.
* ``metrics``: the Prometheus collectors.
"""
