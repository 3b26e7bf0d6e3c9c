"""I/O at the edge shared by every role's process: process plumbing (service.py), key files (keystore.py)."""
