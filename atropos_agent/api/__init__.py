"""The previous release's module path for the executor app, kept for deployments that serve it."""
