"""The root supervisor: spawns children by module name, watches and restarts them.

``daemon.serve(config)`` runs the daemon; ``tree`` holds the pure restart
policy; ``child`` wraps one OS process; ``entry`` is the first code a child
runs; ``control`` is the root's end of ``control.sock``; ``events`` the
lifecycle PUB socket.
"""
