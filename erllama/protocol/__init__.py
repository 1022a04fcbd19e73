"""The wire contract: messages, codec, error codes, socket factory (a leaf package)."""
