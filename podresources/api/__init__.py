"""Generated PodResources API stubs (see podresources/regenerate.py)."""
