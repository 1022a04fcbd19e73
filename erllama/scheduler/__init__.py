"""The memory-pressure scheduler: samplers, a pure hysteresis policy, the supervised process."""
