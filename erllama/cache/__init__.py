"""KV-state cache: keys, KVC files, tiers, publish protocol and the cache-meta process."""
