"""Terminal rendering shared by the CLI commands and the wizard: the consoles, messages, previews and progress.

It sits below both (cli → display, wizard → display), so the two never import each other for a view.
"""
