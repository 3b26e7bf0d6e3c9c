"""The chain adapter: the NodeRegistry client on web3 (registry.py) and its compiled artifact."""
