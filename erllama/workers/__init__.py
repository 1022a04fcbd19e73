"""Workers: one process per model, serving completions from a llama.cpp (or stub) backend.

``worker`` is the process main and ``iothread`` its socket thread;
``engine`` runs requests on the compute thread (``request`` validates
them, ``sequence`` fills sequence 0 from the live KV or the cache and saves
it, ``textstream`` turns tokens into text and applies stop sequences);
``cachelink`` is the engine's view of the cache and ``saver`` its
asynchronous writer; ``backend`` is the model protocol, implemented by
``llama`` (llama-cpp-python) and ``stub`` (deterministic, for tests).
"""
