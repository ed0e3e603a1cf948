"""Preprocessing++: Fisher analysis of the DiT, module selection, rank allocation and the map file."""
