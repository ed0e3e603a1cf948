"""The `sidestep` command line: one Typer app; each command builds a config and calls one library function."""
