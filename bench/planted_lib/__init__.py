"""The planted-change benchmark's parts: the plant (a base with a known concentrated change) and the arms' runner."""
