"""Process plumbing shared by every command: settings, logs and metrics, the worker runner, extras."""
