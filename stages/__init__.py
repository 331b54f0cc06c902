"""DVC stage entry points (`python -m stages.<name>`); shared modules live in `stages.lib`."""
