"""`recipe-dist bench ...`: measurements that print figures (never asserted timings)."""
