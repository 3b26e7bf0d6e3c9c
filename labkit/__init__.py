"""Real parts for tests and benches, outside tests/ so that benches never import a test module:
a federation of real processes on loopback (dcnet.py), hostile load against it (load.py,
budgets.py), a seeded registry (seed.py) and the NAT lab of network namespaces (lab/)."""
