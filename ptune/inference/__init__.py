"""Using trained adapters: KV-cached generation, the adapter bank (many tasks on one frozen base) and the server."""
