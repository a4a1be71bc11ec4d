"""`keepsrc demo`: the talk's scenarios on real Envoys, and the backends that report what they saw."""
