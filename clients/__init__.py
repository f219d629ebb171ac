"""fedlora.clients: thin glue over fedlora and strategies."""
