"""Shared, sans-I/O protocol core of NTMobile: identities, records, wire formats, tunnel crypto.

Nothing in this package opens a socket or reads the clock on its own; the DC, RS and node
adapters (dc/, rs/, node/) do the I/O and pass bytes and times in.
"""
