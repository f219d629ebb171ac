"""fedlora.server: thin glue over fedlora and strategies."""
