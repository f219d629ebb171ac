"""fedlora.simulations: thin glue over fedlora and strategies."""
