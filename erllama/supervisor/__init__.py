"""The root supervisor: spawns children by module name, watches and restarts them.

``daemon.serve(config)`` runs the daemon (``daemon.Root`` is its loop and carries
out effects); ``rundir`` owns the run directory; ``tree`` holds the pure restart
policy; ``table`` the slot table and its load / unload decisions, ``sleeping`` the
sleep and wake decisions (both pure, returning ``effects``); ``boot`` the start
order; ``stopping`` the stop stages and the daemon's stop order; ``child`` wraps one
OS process; ``entry`` is the first code a child runs; ``control`` is the channel on
``control.sock``; ``events`` the lifecycle PUB socket; ``payloads`` what ``Init``
carries.
"""
