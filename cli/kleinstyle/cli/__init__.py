"""The `kleinstyle` command (main.py)."""
