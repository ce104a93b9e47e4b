"""What every HTTP surface needs and none of them owns: the running server's context, the
observing middleware, request parsing, error responses and the clock. Imported by
``gateway/``, ``api/`` and ``web/``; imports none of them."""
