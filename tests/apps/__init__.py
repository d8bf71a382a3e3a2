"""Test apps (``def build(ssc)``) run by the integration and fault suites on real fleets."""
