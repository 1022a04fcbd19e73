"""The router process: client-facing ROUTER, routes requests to model workers.

``router.main(run_dir, child_id)`` is started by the root supervisor (by
module name); ``table`` holds its pure model table.
"""
