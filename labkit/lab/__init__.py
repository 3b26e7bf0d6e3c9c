"""The NAT lab: network namespaces with real NATs (topology.py), a federation in them (fed.py),
real `ntm up` daemons (upnode.py), and the scenarios the lab tests assert on and the benches
print (roam_*.py, subnet.py, onpath.py); the rest are scripts run inside the namespaces."""
